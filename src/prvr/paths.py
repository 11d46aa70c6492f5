"""Where every pipeline output lives: the one source for the paths the stages write and
dvc.yaml declares (tests/test_pipeline.py checks the two agree).

Per dataset and method, so training a second method keeps the first one's results:
    runs/<ds>/<method>/checkpoints/{last,best}.pt, runs/<ds>/<method>/run.json
    metrics/<ds>/<method>/{train.json, train_history.csv, test.json, recall_at_k.json, search.json}
    runs/<ds>/<method>/index/ (the search index of the best checkpoint)
and one report per dataset, over every method trained there: reports/<ds>/.
"""
from __future__ import annotations

from pathlib import Path

RUNS, METRICS, REPORTS = Path("runs"), Path("metrics"), Path("reports")


def ckpt_dir(dataset: str, method: str) -> Path:
    return RUNS / dataset / method / "checkpoints"


def run_json(dataset: str, method: str) -> Path:
    return RUNS / dataset / method / "run.json"


def metrics_dir(dataset: str, method: str) -> Path:
    return METRICS / dataset / method


def train_json(dataset: str, method: str) -> Path:
    return metrics_dir(dataset, method) / "train.json"


def history_csv(dataset: str, method: str) -> Path:
    return metrics_dir(dataset, method) / "train_history.csv"


def test_json(dataset: str, method: str) -> Path:
    return metrics_dir(dataset, method) / "test.json"


def recall_json(dataset: str, method: str) -> Path:
    return metrics_dir(dataset, method) / "recall_at_k.json"


def index_dir(dataset: str, method: str) -> Path:
    return RUNS / dataset / method / "index"


def search_json(dataset: str, method: str) -> Path:
    return metrics_dir(dataset, method) / "search.json"


def report_dir(dataset: str) -> Path:
    return REPORTS / dataset


def trained_methods(dataset: str) -> list[str]:
    """Methods with a test result on `dataset` (metrics/<ds>/<method>/test.json), sorted."""
    root = METRICS / dataset
    return sorted(p.parent.name for p in root.glob("*/test.json")) if root.is_dir() else []
