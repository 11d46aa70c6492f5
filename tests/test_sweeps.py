"""Queued and temporary DVC experiments log to the repository's MLflow store, not to their copy."""
from __future__ import annotations

from pathlib import Path

from prvr.tracking import Tracker, default_tracking_uri, tracking_root


def test_the_store_of_a_queued_copy_is_the_original_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    assert tracking_root(repo) == repo
    assert tracking_root(copy) == repo                  # the path layout DVC uses
    assert tracking_root(copy / "stages") == repo
    assert default_tracking_uri(copy) == f"sqlite:///{repo.as_posix()}/mlflow.db"
    # DVC sets DVC_ROOT to the original repository for --queue / --temp runs: it wins
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking_root(elsewhere) == repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_tracking_uri(copy) == "http://tracking:5000"


def test_a_run_started_in_a_queued_copy_keeps_its_artifacts_in_the_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / "runs").mkdir(parents=True)
    ckpt = copy / "runs" / "best.pt"
    ckpt.write_bytes(b"weights")
    tracker = Tracker("demo", root=copy)
    run_id = tracker.start(run_name="queued")
    assert run_id and tracker.tracking_uri == f"sqlite:///{repo.as_posix()}/mlflow.db"
    tracker.log_metrics({"val_sumr": 1.5}, step=0)
    tracker.log_artifact(ckpt, "checkpoints")
    tracker.end()
    assert tracker.enabled  # nothing failed
    assert (repo / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    kept = list((repo / "mlartifacts").rglob("best.pt"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"weights"
    assert not (copy / "mlartifacts").exists()
