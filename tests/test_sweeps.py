"""Queued and temporary DVC experiments log to the repository's MLflow store, not to their copy."""
from __future__ import annotations


import pytest

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


@pytest.mark.slow
def test_two_queued_experiments_keep_their_mlflow_runs_and_checkpoints(tmp_path):
    """Two `dvc exp run --queue` demo experiments (tiny demo, 1 epoch), `dvc queue start`: the
    repository's mlflow.db holds both runs with per-epoch metrics and a checkpoint artifact, and
    stages/compare.py lists them."""
    import json
    import time

    from mlflow.tracking import MlflowClient

    from conftest import TINY_DEMO, copy_repo, edit_params, git_commit, run

    repo = copy_repo(tmp_path / "repo")
    edit_params(repo / "params.yaml", **{**TINY_DEMO, "methods.gmmformer_v2.demo.epochs": 1})
    git_commit(repo, "tiny demo")
    for seed in (1, 2):
        run(["dvc", "exp", "run", "--queue", "-S", f"methods.gmmformer_v2.all.seed={seed}"], repo)
    run(["dvc", "queue", "start", "-j", "1"], repo)
    deadline = time.time() + 900
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not any(s in status for s in ("Queued", "Running")):
            break
        assert time.time() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    client = MlflowClient(tracking_uri=f"sqlite:///{(repo / 'mlflow.db').as_posix()}")
    exp = client.get_experiment_by_name("prvr-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "val_sumr")) == 1   # one per epoch
        assert "test_sumr" in r.data.metrics
        assert [a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    run(["python", "stages/compare.py"], repo)
    listed = (repo / "reports" / "demo" / "compare.md").read_text(encoding="utf-8")
    assert all(r.info.run_id in listed for r in runs), listed
    assert json.loads((repo / "reports" / "demo" / "compare.json").read_text(encoding="utf-8"))
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
