"""Shared helpers for the pipeline tests: copy the repository, shrink the demo, run commands."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH (so `dvc` and the
    `python` of dvc.yaml are this venv's), no inherited MLflow store, no test hooks."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for key in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME",
                "DVC_EXP_BASELINE_REV", "DVC_ROOT", "DVC_STAGE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 600, check: bool = True, **env: str
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def repo_files() -> list[str]:
    """Files of the repository: tracked plus untracked-but-not-ignored (a developer's new files)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})


def copy_repo(dest: Path) -> Path:
    """Copy the repository's files into dest and make it a fresh git repository (one commit)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


def git_commit(cwd: Path, message: str) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=cwd, check=True)
    subprocess.run([*git, "commit", "-q", "-m", message], cwd=cwd, check=True)


def edit_params(path: Path, **dotted) -> None:
    """Set dotted keys in a params.yaml, e.g. edit_params(p, **{"methods.gmmformer_v2.demo.epochs": 2})."""
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in dotted.items():
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


# A demo small enough for CI: 60 train / 15 val / 15 test videos, a narrow model (every method).
TINY_SCALE = 0.1
TINY_RECIPE = {"hidden_size": 32, "epochs": 3, "batch_size": 20, "hard_negative_start_epoch": 2}


def tiny_demo(params_path: Path = REPO / "params.yaml") -> dict:
    """edit_params keys that shrink the demo corpus and every method's demo recipe."""
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    keys = {"datasets.demo.generator.scale": TINY_SCALE}
    for method in params.get("methods", {}):
        keys.update({f"methods.{method}.demo.{k}": v for k, v in TINY_RECIPE.items()})
    return keys


TINY_DEMO = tiny_demo()


def assert_same_batches(a, b) -> None:
    """The two batch sequences (lists or loaders) are equal, tensor by tensor, bit for bit
    and dtype for dtype, and not empty."""
    a, b = list(a), list(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_demo_corpus(tmp_path_factory) -> Path:
    """The tiny demo corpus (generated once per session); returns the folder holding demo/."""
    from prvr.data.demo import generate_corpus

    root = tmp_path_factory.mktemp("tiny_demo_corpus")
    generate_corpus(root, preset="demo", seed=7, scale=TINY_SCALE, progress=False)
    return root


def make_workdir(work: Path, corpus_root: Path) -> Path:
    """A folder with params.yaml (tiny demo) and data/demo/corpus/ linked to the tiny corpus,
    for running stages/train.py directly (no DVC; no source.json: the default location)."""
    (work / "data" / "demo").mkdir(parents=True)
    shutil.copy2(REPO / "params.yaml", work / "params.yaml")
    edit_params(work / "params.yaml", **TINY_DEMO)
    (work / "data" / "demo" / "corpus").symlink_to(corpus_root, target_is_directory=True)
    return work


@pytest.fixture()
def tiny_workdir(tmp_path: Path, tiny_demo_corpus: Path) -> Path:
    return make_workdir(tmp_path / "work", tiny_demo_corpus)


@pytest.fixture(scope="session")
def text_search_work(tmp_path_factory, tiny_demo_corpus) -> Path:
    """A tiny-demo work folder with a GMMFormer v2 checkpoint, its test-split index (`index/`)
    and a tiny random RoBERTa encoder of the demo's text width (`encoder/`): the free-text
    and serve tests' shared fixture. The encoder stands in (the demo's features came from no
    encoder), so its hits test the path, not quality."""
    import torch

    from prvr.checkpoint import save_checkpoint
    from prvr.config import load_params, load_settings
    from prvr.data.layout import read_captions
    from prvr.methods import build_config, create_model
    from prvr.search import build_index
    from prvr.text.tiny import make_tiny_encoder

    w = make_workdir(tmp_path_factory.mktemp("text_search") / "work", tiny_demo_corpus)
    s = load_settings(w / "params.yaml", "demo", "gmmformer_v2")
    torch.manual_seed(0)
    save_checkpoint(w / "v2.pt", create_model("gmmformer_v2", build_config(s)), "gmmformer_v2", settings=s)
    build_index(w / "v2.pt", load_params(w / "params.yaml"), "demo", "test", w / "index", data_dir=w / "data",
                progress=False)
    caps = read_captions(tiny_demo_corpus / "demo" / "TextData" / "demotrain.caption.txt")
    make_tiny_encoder(w / "encoder", "roberta", int(s["text_dim"]), [c[2] for c in caps])
    return w
