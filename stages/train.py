"""DVC stage `train`: train the method `model.name` on the current dataset (resumable).

    python stages/train.py [--params params.yaml] [--dataset NAME] [--method NAME]
                           [--no-progress] [--no-mlflow]

Reads params.yaml (`dataset`, `model.name`, `train`, `datasets.<ds>`, `methods.<method>`) and
data/<dataset>/source.json. Writes (prvr.paths):
  runs/<ds>/<method>/checkpoints/last.pt   resume state after every epoch (atomic)
  runs/<ds>/<method>/checkpoints/best.pt   best validation SumR
  metrics/<ds>/<method>/train.json         best epoch, its validation metrics, parameter count
  runs/<ds>/<method>/run.json              MLflow run id, device, settings hash
  metrics/<ds>/<method>/train_history.csv  one row per epoch: loss terms, lr, validation R@k, time
Rerun after a crash: it resumes after the last finished epoch when the settings, data source and
training code are unchanged, and starts fresh (saying why) otherwise.
`train.nproc > 1` relaunches this script through torchrun (DistributedDataParallel).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, load_settings

log = logging.getLogger("prvr.stages.train")


def outputs(dataset: str, method: str) -> dict[str, Path]:
    from prvr import paths

    return {"ckpt_dir": paths.ckpt_dir(dataset, method), "summary": paths.train_json(dataset, method),
            "run": paths.run_json(dataset, method), "history": paths.history_csv(dataset, method)}


def main(argv: list[str] | None = None, setup_note: str = "not run (main called directly)") -> int:
    parser = stage_parser(__doc__, mlflow=True)
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    try:
        settings = load_settings(args.params, args.dataset, args.method)
    except ConfigError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1

    from prvr.distributed import DistContext, DistError, maybe_relaunch

    try:
        maybe_relaunch(int(settings["train"]["nproc"]), sys.argv if argv is None
                       else [sys.argv[0], *argv])
    except DistError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1

    from prvr.checkpoint import CheckpointError
    from prvr.data.layout import DataError, read_source, source_file
    from prvr.procenv import allocator_in_use
    from prvr.tracking import Tracker
    from prvr.training import TrainingError, train

    ds, method = settings["dataset"], settings["method"]
    out = outputs(ds, method)
    try:
        ctx = DistContext.from_env(settings["train"]["device"])
    except (DistError, RuntimeError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    tracker = None
    try:
        src_path = source_file(settings)
        source = read_source(src_path) if src_path.is_file() else None
        log.info("read %s (dataset %s, method %s) and %s", args.params, ds, method,
                 src_path if source else "no source.json (default corpus location)")
        log.info("process setup: %s; CPU allocator: %s", setup_note, allocator_in_use())
        if ctx.is_main:
            tracker = Tracker(ds, enabled=not args.no_mlflow)
        result = train(settings, out["ckpt_dir"], out["history"], ctx=ctx, tracker=tracker,
                       source=source, progress=not args.no_progress)
        if ctx.is_main:
            _write_outputs(out, settings, result, tracker, ctx)
            log.info("wrote %s, %s, %s, %s (best epoch %d, val SumR %.2f; %.1f s)", out["ckpt_dir"],
                     out["summary"], out["run"], out["history"], result.best_epoch, result.best_val["sumr"],
                     time.time() - t0)
    except (ConfigError, DataError, CheckpointError, TrainingError, ValueError) as exc:
        if tracker is not None:
            tracker.end("FAILED")
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    return 0


def _write_outputs(out: dict[str, Path], settings: dict, result, tracker, ctx) -> None:
    """train.json, run.json and the MLflow artifacts of a finished training."""
    from prvr.atomic import write_json_atomic
    from prvr.checkpoint import load_model

    ds, method = settings["dataset"], settings["method"]
    best = out["ckpt_dir"] / "best.pt"
    model, _ = load_model(best, "cpu", method=method)
    write_json_atomic(out["summary"], {  # numbers only: a DVC metric
        "best_epoch": result.best_epoch,
        "val": result.best_val,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "n_parameters": sum(p.numel() for p in model.parameters()),
    })
    write_json_atomic(out["run"], {
        "dataset": ds,
        "method": method,
        "mlflow_run_id": result.run_id,
        "mlflow_tracking_uri": tracker.tracking_uri if tracker is not None else None,
        "experiment": f"prvr-{ds}",
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "settings_hash": result.fingerprint.get("settings_hash"),
        "val_split": str(settings["train"]["val_split"]),  # the report's selection sentence
        "resumed_after_epoch": result.resumed_from,
    })
    if tracker is not None and tracker.active and result.epochs_trained_now > 0:
        tracker.log_artifact(best, "checkpoints")
        tracker.log_artifact(out["history"], "metrics")
        tracker.log_metrics({f"best_val_{k}": v for k, v in result.best_val.items()}, step=result.best_epoch)
        tracker.log_model(model)
    if tracker is not None:
        tracker.end("FINISHED")


def process_setup(argv: list[str]) -> str:
    """Restart under the CPU backend's allocator and thread waits where they pay (prvr.procenv),
    decided from params.yaml before torch is imported; returns what was decided. A params.yaml
    that cannot be read decides nothing here: main() reports it."""
    from prvr.config import process_settings
    from prvr.procenv import setup_process

    import argparse

    pre = argparse.ArgumentParser(add_help=False)  # --help is main()'s to answer, after the restart
    pre.add_argument("--params", default="params.yaml")
    args, _ = pre.parse_known_args(argv)
    try:
        backend, device, enabled = process_settings(args.params)
    except ConfigError:
        return "none (params not readable)"
    return setup_process(backend, device, enabled)


if __name__ == "__main__":
    sys.exit(main(setup_note=process_setup(sys.argv[1:])))
