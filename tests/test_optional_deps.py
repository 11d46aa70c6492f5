"""Tracking off needs neither MLflow nor DVC: the train and evaluate stages run, start to end,
in a process where importing either fails, and never try to import them. Tracking asked for
without mlflow installed is one warning line, and the run goes on."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO, edit_params, make_workdir, tool_env

BLOCKED = ("mlflow", "dvc")


def _blocking_path(tmp_path):
    """A folder of packages `mlflow` and `dvc` whose import leaves a marker file, then fails."""
    blocked = tmp_path / "blocked"
    for name in BLOCKED:
        (blocked / name).mkdir(parents=True)
        marker = tmp_path / f"imported-{name}"
        (blocked / name / "__init__.py").write_text(
            f"open({str(marker)!r}, 'w').close()\n"
            f"raise ImportError('{name} is blocked in this test')\n", encoding="utf-8")
    return blocked


def _stage(work, env, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / script), "--no-progress", "--no-mlflow", *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_train_and_evaluate_with_tracking_off_import_neither_mlflow_nor_dvc(tmp_path, tiny_demo_corpus):
    work = make_workdir(tmp_path / "work", tiny_demo_corpus)
    edit_params(work / "params.yaml", **{"methods.gmmformer_v2.demo.epochs": 1})
    pythonpath = os.pathsep.join([str(_blocking_path(tmp_path)), str(REPO / "src")])
    env = tool_env(PYTHONPATH=pythonpath)
    probe = subprocess.run([sys.executable, "-c", "import mlflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr  # the blocker works
    (tmp_path / "imported-mlflow").unlink()
    for script in ("train.py", "evaluate.py"):
        proc = _stage(work, env, script)
        assert proc.returncode == 0, f"{script}:\n{proc.stderr[-4000:]}"
    test = json.loads((work / "metrics/demo/gmmformer_v2/test.json").read_text())
    assert 0.0 <= test["sumr"] <= 400.0
    tried = [name for name in BLOCKED if (tmp_path / f"imported-{name}").exists()]
    assert tried == [], f"with tracking off the stages tried to import {tried}"


def test_tracking_without_mlflow_is_one_warning_line_and_tracking_off(monkeypatch, caplog):
    from prvr.tracking import Tracker, mlflow_installed

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails; find_spec says None
    assert not mlflow_installed()
    with caplog.at_level(logging.WARNING, logger="prvr.tracking"):
        tracker = Tracker("demo", enabled=True, tracking_uri="sqlite:///unused.db")
        run_id = tracker.start(run_name="x")
        tracker.log_metrics({"a": 1.0})
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "mlflow is not installed" in warnings[0] and "--no-mlflow" in warnings[0]
    assert not tracker.enabled and run_id is None and not tracker.active


def test_the_seeds_comparison_without_mlflow_is_a_one_line_error(monkeypatch):
    from prvr.compare import load_runs

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match=r"^mlflow is not installed: the seeds comparison reads the MLflow store") as err:
        load_runs("demo", tracking_uri="sqlite:///unused.db")
    assert "\n" not in str(err.value)
