"""What every stage script in stages/ shares: its common options and its log format."""
from __future__ import annotations

import argparse
import logging
import sys


def stage_parser(doc: str, *, data_dir: bool = False, progress: bool = True,
                 mlflow: bool = False) -> argparse.ArgumentParser:
    """An argument parser with the options common to the stages (`--params`, `--dataset`,
    `--method`, and on request `--data-dir`, `--no-progress`, `--no-mlflow`); `doc`'s first line is
    its description."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--dataset", default=None, help="dataset section (default: params 'dataset')")
    parser.add_argument("--method", default=None, help="method (default: params 'model.name')")
    if data_dir:
        parser.add_argument("--data-dir", default="data", help="where data/<dataset>/ lives (default: data)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if mlflow:
        parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return parser


def setup_logging() -> None:
    """INFO and above to stderr, with time, level and logger name."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
