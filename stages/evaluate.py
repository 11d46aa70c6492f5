"""DVC stage `evaluate`: R@1/5/10/100 and SumR of the best checkpoint on the test split.

    python stages/evaluate.py [--params params.yaml] [--dataset NAME] [--no-progress] [--no-mlflow]
    python stages/evaluate.py --checkpoint FILE [--split test] [--save-scores FILE.h5] [--out FILE.json]

Pipeline mode (no --checkpoint): evaluates runs/<dataset>/checkpoints/best.pt on
`evaluate.split`, writes metrics/<dataset>/test.json (DVC metric) and
metrics/<dataset>/recall_at_k.json (DVC plot), and logs the test metrics to the training's
MLflow run (its id is in runs/<dataset>/run.json).
By hand (--checkpoint): evaluates any checkpoint, ours or one of the public release, on the
current dataset, prints the metrics, and writes only what --out / --save-scores ask for
(the pipeline's outputs are left alone).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, load_settings

log = logging.getLogger("prvr.stages.evaluate")

KS = (1, 5, 10, 100)


def paths(dataset: str) -> dict[str, Path]:
    return {"best": Path("runs") / dataset / "checkpoints" / "best.pt",
            "run": Path("runs") / dataset / "run.json",
            "metrics": Path("metrics") / dataset / "test.json",
            "recall": Path("metrics") / dataset / "recall_at_k.json"}


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, mlflow=True)
    parser.add_argument("--checkpoint", default=None,
                        help="evaluate this checkpoint (ours or the release's) instead of the pipeline's")
    parser.add_argument("--split", default=None, help="split to evaluate (default: evaluate.split)")
    parser.add_argument("--save-scores", default=None, metavar="FILE.h5",
                        help="also write the (queries x videos) score matrix to this HDF5 file")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the metrics here")
    parser.add_argument("--device", default=None, help="override evaluate.device (auto|cpu|cuda[:N])")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()

    from prvr.checkpoint import CheckpointError, load_model
    from prvr.config import resolve_device
    from prvr.data.datasets import Corpus
    from prvr.data.layout import DataError
    from prvr.evaluation import evaluate, save_scores_h5
    from prvr.atomic import write_json_atomic
    from prvr.training import eval_loaders

    try:
        settings = load_settings(args.params, args.dataset)
        ds = settings["dataset"]
        ev = settings["evaluate"]
        out = paths(ds)
        by_hand = args.checkpoint is not None
        ckpt = Path(args.checkpoint) if by_hand else out["best"]
        split = args.split or str(ev.get("split", "test"))
        device = resolve_device(args.device or ev.get("device", "auto"))
        log.info("read %s: dataset %s, split %s, checkpoint %s, device %s", args.params, ds, split,
                 ckpt, device)
        model, info = load_model(ckpt, device, base_config=settings["model"] if by_hand else None)
        log.info("loaded %s checkpoint %s (epoch %s)", info["kind"], ckpt, info.get("epoch"))
        corpus = Corpus.from_settings(settings)
        cfg = model.cfg
        stream = {"model": {"n_clips": cfg.n_clips, "max_frames": cfg.max_frames,
                            "max_query_len": cfg.max_query_len}}
        vloader, qloader = eval_loaders(corpus, split, int(ev["video_batch_size"]),
                                        int(ev["query_batch_size"]), 0, stream)
        metrics, result = evaluate(model, vloader, qloader, device, ks=KS, progress=not args.no_progress)
    except (ConfigError, DataError, CheckpointError, ValueError, KeyError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1

    record = {  # numbers only: a DVC metric
        **{k: float(metrics[k]) for k in ("r1", "r5", "r10", "r100", "sumr")},
        "n_queries": len(result.query_ids),
        "n_videos": len(result.video_ids),
        "checkpoint_epoch": info.get("epoch"),
    }
    for extra in ("medr", "meanr"):
        if extra in metrics:
            record[extra] = float(metrics[extra])
    print(" ".join(f"{k.upper() if k != 'sumr' else 'SumR'}={record[k]:.2f}"
                   for k in ("r1", "r5", "r10", "r100", "sumr")))
    if args.save_scores:
        save_scores_h5(args.save_scores, result, {k: record[k] for k in ("r1", "r5", "r10", "r100", "sumr")})
        log.info("wrote %s", args.save_scores)
    if by_hand:
        record.update(dataset=ds, split=split, checkpoint=str(ckpt), checkpoint_kind=info["kind"])
        if args.out:
            write_json_atomic(args.out, record)
            log.info("wrote %s", args.out)
        log.info("done in %.1f s", time.time() - t0)
        return 0

    write_json_atomic(args.out or out["metrics"], record)
    write_json_atomic(out["recall"], {"recall_at_k": [
        {"k": f"R@{k}", "recall": record[f"r{k}"]} for k in KS]})
    run_id = None
    if out["run"].is_file():
        run_id = json.loads(out["run"].read_text(encoding="utf-8")).get("mlflow_run_id")
    if run_id and not args.no_mlflow:
        from prvr.tracking import Tracker

        tracker = Tracker(ds)
        if tracker.attach(run_id):
            tracker.log_metrics({f"test_{k}": record[k] for k in ("r1", "r5", "r10", "r100", "sumr")},
                                step=int(info.get("epoch") or 0))
            tracker.set_tags({"test_split": split})
    log.info("wrote %s and %s (%.1f s)", args.out or out["metrics"], out["recall"], time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
