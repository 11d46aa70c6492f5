"""MLflow tracking: settings flattened into params, and a tracking store that fails (or a server
that dies mid-run) never stops training."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, edit_params, free_port, tool_env
from prvr.tracking import Tracker, default_tracking_uri, experiment_name, flatten, run_tags

TRAIN = [sys.executable, str(REPO / "stages" / "train.py"), "--no-progress"]


def test_flatten_nested_settings():
    flat = flatten({"dataset": "demo", "model": {"hidden_size": 128, "widths": [0.5, 1.0]},
                    "loss": {"neg_factor": [0.15, 32.0, 1.0]}, "archive": None})
    assert flat == {"dataset": "demo", "model.hidden_size": "128", "model.widths": "[0.5, 1.0]",
                    "loss.neg_factor": "[0.15, 32.0, 1.0]", "archive": "None"}


def test_default_store_is_sqlite_in_repo_root_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.absolute().as_posix()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri(tmp_path) == "http://tracking.example:5000"
    assert experiment_name("act") == "prvr-act"


def test_tags_name_the_dvc_experiment(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-fern")
    tags = run_tags("cha", "cpu", "msssl", REPO)
    assert tags["dataset"] == "cha" and tags["device"] == "cpu" and tags["method"] == "msssl"
    assert tags["dvc_exp_name"] == "brisk-fern"


def test_unreachable_server_warns_once_and_costs_little(caplog, monkeypatch):
    port = free_port()  # nothing listens here
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    tracker = Tracker("demo", tracking_uri=f"http://127.0.0.1:{port}")
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="prvr.tracking"):
        assert tracker.start(run_name="x") is None
        for step in range(5):
            tracker.log_metrics({"val_sumr": 1.0}, step=step)
        tracker.log_params({"a": 1})
        tracker.log_artifact(__file__)
        tracker.end()
    assert time.time() - t0 < 30
    warnings = [r for r in caplog.records if "tracking is off" in r.getMessage()]
    assert len(warnings) == 1
    assert not tracker.enabled and not tracker.active


def test_failure_mid_run_turns_tracking_off(tmp_path, caplog):
    tracker = Tracker("demo", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", root=tmp_path)
    assert tracker.start(run_name="x")
    tracker.log_metrics({"val_sumr": 1.0}, step=0)

    def broken(*_a, **_k):
        raise ConnectionError("server went away")

    tracker.client().log_batch = broken
    with caplog.at_level(logging.WARNING, logger="prvr.tracking"):
        tracker.log_metrics({"val_sumr": 2.0}, step=1)
        tracker.log_metrics({"val_sumr": 3.0}, step=2)
        tracker.set_tags({"x": "y"})
    warnings = [r.getMessage() for r in caplog.records if r.name == "prvr.tracking"
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "server went away" in warnings[0]
    assert not tracker.active


@pytest.mark.slow
def test_training_finishes_when_the_tracking_server_dies(tiny_workdir: Path, tmp_path: Path):
    work = tiny_workdir
    edit_params(work / "params.yaml", **{"methods.gmmformer_v2.demo.epochs": 5})
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    train = None
    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(0.5)

        train = subprocess.Popen(TRAIN, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=tool_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"))
        ckpt = work / "runs/demo/gmmformer_v2/checkpoints/last.pt"
        deadline = time.time() + 300
        while not ckpt.exists():  # epoch 0 is done and logged: now the server dies
            assert train.poll() is None, train.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        t_kill = time.time()
        stdout, stderr = train.communicate(timeout=600)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        if train is not None and train.poll() is None:
            train.kill()
    assert train.returncode == 0, stderr[-3000:]
    assert stderr.count("tracking is off for the rest of this run") == 1, stderr[-3000:]
    history = (work / "metrics/demo/gmmformer_v2/train_history.csv").read_text().splitlines()
    assert len(history) == 1 + 5  # header + every epoch, although tracking died after epoch 0
    assert (work / "runs/demo/gmmformer_v2/checkpoints/best.pt").is_file()
    assert time.time() - t_kill < 300

    # What reached the server before it died is in its store: the run, not every epoch.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    exp = client.get_experiment_by_name("prvr-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_sumr")]
    assert len(steps) < 5
