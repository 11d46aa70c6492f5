"""DVC stage `report`: one Markdown report with figures for the current dataset, over every
method trained on it.

    python stages/report.py [--params params.yaml] [--dataset NAME] [--no-mlflow]

Reads, for every method with metrics/<dataset>/<method>/test.json, that folder's train.json and
train_history.csv and runs/<dataset>/<method>/run.json, plus data/<dataset>/validation.json;
writes reports/<dataset>/{report.md, training_curves.png, recall_at_k.png} and logs the report
folder to each method's MLflow run.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, evaluate_settings, load_params

log = logging.getLogger("prvr.stages.report")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (run the {what} stage first)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def method_result(ds: str, name: str, split: str):
    """A report.MethodResult from the method's pipeline outputs on `ds`."""
    from prvr import paths
    from prvr.methods import get_method
    from prvr.report import MethodResult, read_history

    test = {**_read_json(paths.test_json(ds, name), "evaluate"), "split": split}
    train = _read_json(paths.train_json(ds, name), "train")
    run_path = paths.run_json(ds, name)
    run = _read_json(run_path, "train") if run_path.is_file() else {}
    hist = paths.history_csv(ds, name)
    search_path = paths.search_json(ds, name)
    search = _read_json(search_path, "search_eval") if search_path.is_file() else None
    m = get_method(name)
    return MethodResult(name, m.title, test, {**train, **run}, read_history(hist) if hist.is_file() else [],
                        dict(m.paper[ds]) if ds in m.paper else None, m.paper_selection, search)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, mlflow=True, progress=False)
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    from prvr import paths
    from prvr.report import build_report

    try:
        params = load_params(args.params)
        ds = args.dataset or params.get("dataset")
        if not ds:
            raise ConfigError(f"{args.params}: missing key 'dataset'")
        split = evaluate_settings(params, args.params)["split"]
        methods = paths.trained_methods(ds)
        results = [method_result(ds, name, split) for name in methods]
        vpath = Path("data") / ds / "validation.json"
        validation = _read_json(vpath, "validate") if vpath.is_file() else None
        files = build_report(ds, results, validation, paths.report_dir(ds))
    except (ConfigError, ValueError, KeyError, OSError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    if not args.no_mlflow:
        from prvr.tracking import Tracker

        for r in results:
            tracker = Tracker(ds)
            if r.train.get("mlflow_run_id") and tracker.attach(r.train["mlflow_run_id"]):
                for path in files.values():
                    tracker.log_artifact(path, "report")
                if r.paper:   # the paper's row beside the run's own metrics in `mlflow ui`
                    tracker.log_metrics({f"paper_{k}": float(v) for k, v in r.paper.items()})
                    tracker.set_tags({"paper_selection": r.paper_selection})
    log.info("read the results of %s on %s and %s; wrote %s (%.1f s)", ", ".join(methods), ds, vpath,
             ", ".join(str(p) for p in files.values()), time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
