"""Training survives a crash: it resumes after the last finished epoch and ends exactly where an
uninterrupted run ends (CPU), and it never resumes a run whose settings differ."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, edit_params, make_workdir, run, tool_env

TRAIN = [sys.executable, str(REPO / "stages" / "train.py"), "--no-progress"]
CKPT = Path("runs/demo/gmmformer_v2/checkpoints")
HISTORY = Path("metrics/demo/gmmformer_v2/train_history.csv")


def _kill_after_first_checkpoint(work: Path, **env: str) -> None:
    """Start training and SIGKILL it as soon as its first last.pt exists (a crash mid-run)."""
    proc = subprocess.Popen(TRAIN, cwd=work, env=tool_env(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (work / CKPT / "last.pt").exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"parameter {name} differs"


def _history(work: Path) -> list[dict]:
    with open(work / HISTORY, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r.pop("epoch_time_s")
    return rows


def test_epoch_order_is_a_function_of_seed_and_epoch():
    from prvr.training import EpochShuffleSampler

    a, b = EpochShuffleSampler(50, seed=9527), EpochShuffleSampler(50, seed=9527)
    orders = []
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        orders.append(list(a))
    b.set_epoch(2)  # a fresh sampler jumping straight to epoch 2 (a resumed run)
    assert list(b) == orders[2]
    assert sorted(orders[0]) == list(range(50))
    assert orders[0] != orders[1] != orders[2]
    c = EpochShuffleSampler(50, seed=1)
    c.set_epoch(0)
    assert list(c) != orders[0]


def test_rng_state_round_trip():
    import random

    import numpy as np

    from prvr.training import rng_state, set_rng_state

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = rng_state(gen)
    draws = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
    set_rng_state(state, gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all()
    assert draws[2] == again[2] and torch.equal(draws[3], again[3])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_demo_corpus: Path) -> Path:
    """An uninterrupted 3-epoch run (shared: tests copy it before changing anything)."""
    ref = make_workdir(tmp_path_factory.mktemp("reference") / "work", tiny_demo_corpus)
    run([*TRAIN, "--no-mlflow"], cwd=ref, timeout=300)
    return ref


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_run(reference: Path, tiny_workdir: Path):
    work = tiny_workdir
    db = work / "mlflow.db"
    uri = f"sqlite:///{db}"
    # Killed from outside right after its first checkpoint (like a crash).
    _kill_after_first_checkpoint(work, MLFLOW_TRACKING_URI=uri)
    state = _load(work / CKPT / "last.pt")
    finished = state["epoch"]
    assert finished < 2, "the kill came after the last epoch; nothing was interrupted"
    run_id = state["extra"]["run_id"]
    assert run_id, "the MLflow run id is part of the resume state"
    assert not (work / "metrics/demo/gmmformer_v2/train.json").exists()

    resumed = run(TRAIN, cwd=work, timeout=300, MLFLOW_TRACKING_URI=uri)
    assert f"resuming after epoch {finished}" in resumed.stderr
    assert "training from scratch" not in resumed.stderr

    ref_last, new_last = _load(reference / CKPT / "last.pt"), _load(work / CKPT / "last.pt")
    assert new_last["epoch"] == ref_last["epoch"] == 2
    _assert_same_weights(ref_last["state_dict"], new_last["state_dict"])
    _assert_same_weights(_load(reference / CKPT / "best.pt")["state_dict"],
                         _load(work / CKPT / "best.pt")["state_dict"])
    assert _history(work) == _history(reference)

    # The resumed training logged into the same MLflow run: one value per epoch, no duplicates.
    from mlflow.tracking import MlflowClient

    import json
    assert json.loads((work / "runs/demo/gmmformer_v2/run.json").read_text())["mlflow_run_id"] == run_id
    hist = MlflowClient(uri).get_metric_history(run_id, "val_sumr")
    assert sorted(m.step for m in hist) == [0, 1, 2]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume(reference: Path, tiny_workdir: Path):
    work = tiny_workdir
    _kill_after_first_checkpoint(work)
    finished = _load(work / CKPT / "last.pt")["epoch"]
    assert finished < 2, "the kill came after the last epoch; nothing was interrupted"
    resumed = run([*TRAIN, "--no-mlflow"], cwd=work, timeout=300)
    assert f"resuming after epoch {finished}" in resumed.stderr
    _assert_same_weights(_load(reference / CKPT / "last.pt")["state_dict"],
                         _load(work / CKPT / "last.pt")["state_dict"])
    assert _history(work) == _history(reference)

    # Once finished, a rerun with the same settings does not train again.
    before = _load(work / CKPT / "last.pt")
    again = run([*TRAIN, "--no-mlflow"], cwd=work, timeout=300)
    assert "training already finished" in again.stderr
    _assert_same_weights(before["state_dict"], _load(work / CKPT / "last.pt")["state_dict"])
    assert _history(work) == _history(reference)


@pytest.mark.slow
def test_changed_settings_start_fresh(reference: Path, tmp_path: Path):
    work = _copy(reference, tmp_path / "changed")
    edit_params(work / "params.yaml", **{"methods.gmmformer_v2.demo.lr": 5.0e-4,
                                         "methods.gmmformer_v2.demo.epochs": 1})
    again = run([*TRAIN, "--no-mlflow"], cwd=work, timeout=300)
    assert "NOT resuming" in again.stderr and "different settings" in again.stderr
    assert "training from scratch" in again.stderr
    assert _load(work / CKPT / "last.pt")["epoch"] == 0
    assert len(_history(work)) == 1


# ------------------------------------------------------------------------- fingerprint: its code


def _package_copy(tmp_path: Path) -> Path:
    src = REPO / "src" / "prvr"
    dest = tmp_path / "prvr"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_hash_covers_the_runs_method_not_the_others_nor_the_report(tmp_path):
    from prvr.training import code_files, code_hash

    root = _package_copy(tmp_path)
    rel = {p.relative_to(root).as_posix() for p in code_files("gmmformer_v2", root)}
    assert {"training.py", "methods/base.py", "methods/gmmformer_v2/model.py"} <= rel
    assert not [f for f in rel if f.startswith(("methods/msssl/", "methods/meanpool/", "methods/gmmformer_v1/"))]
    assert "report.py" not in rel and "compare.py" not in rel
    before = code_hash("gmmformer_v2", root)
    for other in ("methods/msssl/loss.py", "report.py"):
        with open(root / other, "a", encoding="utf-8") as fh:
            fh.write("\n# an edit elsewhere\n")
        assert code_hash("gmmformer_v2", root) == before, other
    with open(root / "methods/gmmformer_v2/loss.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit of the run's method\n")
    assert code_hash("gmmformer_v2", root) != before
    with open(root / "optim.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit of the training's core\n")
    assert code_hash("msssl", root) != code_hash("msssl", _package_copy(tmp_path / "fresh"))


def test_code_hash_of_a_method_covers_the_method_it_builds_on(tmp_path):
    from prvr.training import code_files, code_hash

    root = _package_copy(tmp_path)
    rel = {p.relative_to(root).as_posix() for p in code_files("holmes", root)}
    assert {"methods/holmes/loss.py", "methods/gmmformer_v2/model.py"} <= rel
    before = {m: code_hash(m, root) for m in ("holmes", "msssl")}
    with open(root / "methods/gmmformer_v2/model.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit of the encoder Holmes builds on\n")
    assert code_hash("holmes", root) != before["holmes"]
    assert code_hash("msssl", root) == before["msssl"]


def test_code_hash_is_the_same_in_another_process():
    from prvr.training import code_hash

    child = subprocess.run([sys.executable, "-c", "from prvr.training import code_hash; print(code_hash('msssl'))"],
                           capture_output=True, text=True, timeout=120, check=True, env=tool_env())
    assert child.stdout.strip() == code_hash("msssl")


def test_code_paths_hold_every_module_the_training_imports():
    """CODE_PATHS is static; it must cover what prvr/training.py reaches through its imports
    but the two modules left out on purpose, which never change what a run computes: tracking
    (MLflow logging) and procenv (allocator and thread-pool waits of the process)."""
    from test_config import _closure

    from prvr.training import code_files

    root = REPO / "src" / "prvr"
    hashed = set(code_files("meanpool"))
    reached = _closure(root / "training.py", root / "methods" / "meanpool" / "__init__.py") | {root / "training.py"}
    missing = sorted(str(p.relative_to(root)) for p in reached - hashed if p.name not in ("tracking.py", "procenv.py"))
    assert not missing, f"prvr.training.CODE_PATHS lacks {missing}"


# --------------------------------------------------------------------- stale checkpoints


def _checkpoints(ckpt: Path, tag: str) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "last.pt").write_text(f"last {tag}")
    (ckpt / "best.pt").write_text(f"best {tag}")


def test_stale_checkpoints_are_moved_aside_and_the_last_three_kept(tmp_path):
    from prvr.training import set_aside

    ckpt = tmp_path / "runs" / "demo" / "meanpool" / "checkpoints"
    moved = []
    for i in range(5):
        _checkpoints(ckpt, str(i))
        moved.append(set_aside(ckpt))
        assert not (ckpt / "last.pt").exists() and not (ckpt / "best.pt").exists()
        assert (moved[-1] / "last.pt").read_text() == f"last {i}" and (moved[-1] / "best.pt").read_text() == f"best {i}"
    stale = ckpt.parent / "stale"
    assert sorted(stale.iterdir()) == moved[2:]          # the newest three, in time order
    assert all(p.parent == stale and p.name.endswith("Z") for p in moved)
    assert set_aside(ckpt) is None                        # nothing to move: nothing happens
    (stale / "keep-me").mkdir()                           # not ours: never deleted
    _checkpoints(ckpt, "5")
    set_aside(ckpt)
    assert (stale / "keep-me").is_dir() and len([p for p in stale.iterdir() if p.name.endswith("Z")]) == 3


def test_a_run_that_cannot_resume_moves_its_checkpoints_and_says_why(tmp_path, caplog):
    from types import SimpleNamespace

    from prvr.checkpoint import save_checkpoint
    from prvr.training import STATE_VERSION, restore

    ckpt = tmp_path / "runs" / "demo" / "meanpool" / "checkpoints"
    old_fp = {"settings_hash": "a" * 64, "data_hash": "d" * 64, "code_hash": "c" * 64}
    save_checkpoint(ckpt / "last.pt", torch.nn.Linear(2, 2), "meanpool", epoch=0,
                    extra={"state_version": STATE_VERSION, "fingerprint": old_fp})
    save_checkpoint(ckpt / "best.pt", torch.nn.Linear(2, 2), "meanpool", epoch=0)
    run = SimpleNamespace(ctx=SimpleNamespace(is_main=True, distributed=False), ckpt_dir=ckpt,
                          fp={**old_fp, "settings_hash": "b" * 64})
    with caplog.at_level("WARNING", logger="prvr.training"):
        restore(run)
    (folder,) = (ckpt.parent / "stale").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]
    assert not (ckpt / "last.pt").exists() and not (ckpt / "best.pt").exists()
    (line,) = [r.getMessage() for r in caplog.records if "NOT resuming" in r.getMessage()]
    assert "different settings" in line and str(folder) in line and "\n" not in line
