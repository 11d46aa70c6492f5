"""DVC stage `evaluate`: R@1/5/10/100 and SumR of the best checkpoint on the test split.

    python stages/evaluate.py [--params params.yaml] [--dataset NAME] [--method NAME]
    python stages/evaluate.py --checkpoint FILE [--method NAME] [--split test]
                              [--save-scores FILE.h5] [--out FILE.json]

Pipeline mode (no --checkpoint): evaluates runs/<ds>/<method>/checkpoints/best.pt on
`evaluate.split`, writes metrics/<ds>/<method>/test.json (DVC metric) and recall_at_k.json (DVC
plot), and logs the test metrics to the training's MLflow run (its id is in run.json).
By hand (--checkpoint): evaluates any checkpoint on the current dataset: ours (it records its
method) or a public release's (its method from --method, else recognised by its layout); prints
the metrics, and writes only what --out / --save-scores ask for.
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


def outputs(dataset: str, method: str) -> dict[str, Path]:
    from prvr import paths

    return {"best": paths.ckpt_dir(dataset, method) / "best.pt", "run": paths.run_json(dataset, method),
            "metrics": paths.test_json(dataset, method), "recall": paths.recall_json(dataset, method)}


def _load(args, settings, device):
    """(model, info) of --checkpoint or the pipeline's best checkpoint."""
    from prvr.checkpoint import load_model
    from prvr.config import load_settings

    backend = settings["backend"]
    if args.checkpoint is None:
        return load_model(outputs(settings["dataset"], settings["method"])["best"], device,
                          method=settings["method"], backend=backend)
    base_method = args.method or settings["method"]
    try:
        base = load_settings(args.params, args.dataset, base_method)["model"]
    except ConfigError:
        base = None
    return load_model(Path(args.checkpoint), device, method=args.method,
                      base_config=base if args.method else None, backend=backend)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, mlflow=True)
    parser.add_argument("--checkpoint", default=None,
                        help="evaluate this checkpoint (ours or the release's) instead of the pipeline's")
    parser.add_argument("--split", default=None, help="split to evaluate (default: evaluate.split)")
    parser.add_argument("--save-scores", default=None, metavar="FILE.h5",
                        help="also write the (queries x videos) score matrix to this HDF5 file")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the metrics here")
    parser.add_argument("--device", default=None, help="override evaluate.device (auto|cpu|cuda[:N])")
    parser.add_argument("--backend", default=None, help="override backend (auto|reference|cpu)")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()

    from prvr.checkpoint import CheckpointError
    from prvr.config import check_backend, resolve_device
    from prvr.data.datasets import Corpus
    from prvr.data.layout import DataError
    from prvr.evaluation import evaluate, save_scores_h5
    from prvr.atomic import write_json_atomic
    from prvr.metrics import KS, METRIC_KEYS

    try:
        settings = load_settings(args.params, args.dataset, args.method)
        if args.backend is not None:
            settings["backend"] = check_backend(args.backend, "--backend", "command line")
        ds, ev = settings["dataset"], settings["evaluate"]
        by_hand = args.checkpoint is not None
        split = args.split or str(ev["split"])
        device = resolve_device(args.device or ev["device"])
        model, info = _load(args, settings, device)
        method = info["method"]
        out = outputs(ds, method)
        log.info("read %s: dataset %s, split %s, %s checkpoint %s of %s (epoch %s), device %s",
                 args.params, ds, split, info["kind"], info["path"], method, info.get("epoch"), device)
        corpus = Corpus.from_settings(settings)
        vloader, qloader = _loaders(corpus, split, ev, info, device)
        metrics, result = evaluate(model, vloader, qloader, device, ks=KS, progress=not args.no_progress,
                                   **_accel(ev))
        extra = _extra_metrics(model, corpus, list(ev["extra_splits"]), ev, info, device, not args.no_progress)
    except (ConfigError, DataError, CheckpointError, ValueError, KeyError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1

    record = {**_record(metrics, result, info), **extra}
    if args.save_scores:
        save_scores_h5(args.save_scores, result, {k: record[k] for k in METRIC_KEYS})
        log.info("wrote %s", args.save_scores)
    if by_hand:
        record.update(dataset=ds, method=method, split=split, checkpoint=info["path"],
                      checkpoint_kind=info["kind"])
        if args.out:
            write_json_atomic(args.out, record)
            log.info("wrote %s", args.out)
        log.info("done in %.1f s", time.time() - t0)
        return 0
    _write_pipeline(out, record, args, ds, split, info, list(ev["extra_splits"]))
    log.info("wrote %s and %s (%.1f s)", args.out or out["metrics"], out["recall"], time.time() - t0)
    return 0


def _loaders(corpus, split: str, ev: dict, info: dict, device):
    """(video loader, query loader) of a split at the evaluate batch sizes (pinned for CUDA)."""
    from prvr.accel import use_pin_memory
    from prvr.training import eval_loaders

    return eval_loaders(corpus, split, int(ev["video_batch_size"]), int(ev["query_batch_size"]), 0,
                        info["model_config"], pin_memory=use_pin_memory("auto", device))


def _accel(ev: dict) -> dict:
    """evaluate()'s precision and memory budget from the `evaluate` settings."""
    return {"precision": str(ev["precision"]), "memory_budget_mb": ev["memory_budget_mb"]}


def _record(metrics: dict, result, info: dict) -> dict:
    """The test record (numbers only: a DVC metric), printed as one line."""
    from prvr.metrics import METRIC_KEYS

    record = {**{k: float(metrics[k]) for k in METRIC_KEYS}, "n_queries": len(result.query_ids),
              "n_videos": len(result.video_ids), "checkpoint_epoch": info.get("epoch")}
    record.update({k: float(metrics[k]) for k in ("medr", "meanr") if k in metrics})
    print(" ".join(f"{k.upper() if k != 'sumr' else 'SumR'}={record[k]:.2f}" for k in METRIC_KEYS))
    return record


def _extra_metrics(model, corpus, names: list[str], ev: dict, info: dict, device, progress: bool
                   ) -> dict[str, float]:
    """`<name>_<metric>` of each dense split (evaluate.extra_splits): its queries against its
    videos with the same model; a query is a hit at k when any of its videos ranks within k."""
    from prvr.data.splits import dense_split_data, read_dense_split
    from prvr.evaluation import encode_videos, score_queries
    from prvr.metrics import KS, METRIC_KEYS, retrieval_metrics

    out: dict[str, float] = {}
    for name in names:
        dense = read_dense_split(corpus.paths, name)
        corpus.add_split(dense_split_data(dense))
        vloader, qloader = _loaders(corpus, name, ev, info, device)
        kw = _accel(ev)
        bank = encode_videos(model, vloader, device, progress=progress, **kw)
        result = score_queries(model, bank, qloader, device, progress=progress, **kw)
        gt = dict(zip(dense.query_ids, dense.gt_video_ids))
        m = retrieval_metrics(result.scores, [gt[q] for q in result.query_ids], result.video_ids, ks=KS,
                              query_ids=result.query_ids, absent="miss")
        out.update({f"{name}_{k}": float(m[k]) for k in METRIC_KEYS})
        out.update({f"{name}_n_queries": len(result.query_ids), f"{name}_n_videos": len(result.video_ids),
                    f"{name}_multi_gt_queries": dense.multi})
        print(f"{name}: " + " ".join(f"{k.upper() if k != 'sumr' else 'SumR'}={m[k]:.2f}" for k in METRIC_KEYS))
    return out


def _write_pipeline(out: dict, record: dict, args, ds: str, split: str, info: dict,
                    extra: list[str] = ()) -> None:
    """test.json, recall_at_k.json, and the test metrics on the training's MLflow run."""
    from prvr.atomic import write_json_atomic
    from prvr.metrics import KS, METRIC_KEYS

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
            keys = [*METRIC_KEYS, *(f"{n}_{k}" for n in extra for k in METRIC_KEYS)]
            tracker.log_metrics({f"test_{k}": record[k] for k in keys},
                                step=int(info.get("epoch") or 0))
            tracker.set_tags({"test_split": split})


if __name__ == "__main__":
    sys.exit(main())
