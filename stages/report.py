"""DVC stage `report`: Markdown report with figures for the current dataset.

    python stages/report.py [--params params.yaml] [--dataset NAME] [--no-mlflow]

Reads metrics/<dataset>/{test.json, train.json, train_history.csv}, runs/<dataset>/run.json
and data/<dataset>/validation.json; writes reports/<dataset>/{report.md, training_curves.png,
recall_at_k.png} and logs the report folder to the training's MLflow run.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, load_params

log = logging.getLogger("prvr.stages.report")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (run the {what} stage first)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, mlflow=True, progress=False)
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    from prvr.report import build_report, read_history

    try:
        ds = args.dataset or load_params(args.params).get("dataset")
        if not ds:
            raise ConfigError(f"{args.params}: missing key 'dataset'")
        mdir = Path("metrics") / ds
        test = _read_json(mdir / "test.json", "evaluate")
        train = _read_json(mdir / "train.json", "train")
        rpath = Path("runs") / ds / "run.json"
        run = _read_json(rpath, "train") if rpath.is_file() else {}
        vpath = Path("data") / ds / "validation.json"
        validation = _read_json(vpath, "validate") if vpath.is_file() else None
        hpath = mdir / "train_history.csv"
        history = read_history(hpath) if hpath.is_file() else []
        split = load_params(args.params).get("evaluate", {}).get("split", "test")
        test["split"] = split
        files = build_report(ds, test, {**train, **run}, validation, history, Path("reports") / ds)
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    run_id = run.get("mlflow_run_id")
    if run_id and not args.no_mlflow:
        from prvr.tracking import Tracker

        tracker = Tracker(ds)
        if tracker.attach(run_id):
            for path in files.values():
                tracker.log_artifact(path, "report")
    log.info("read %s, %s, %s; wrote %s (%.1f s)", mdir / "test.json", mdir / "train.json", vpath,
             ", ".join(str(p) for p in files.values()), time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
