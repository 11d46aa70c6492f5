"""The epoch benchmark's corpus options (prvr.data.demo sizes) and the stage's allocator settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prvr.data import demo

REPO = Path(__file__).resolve().parents[1]


def test_custom_preset_without_options_is_the_preset():
    assert demo.custom_preset("demo") is demo.PRESETS["demo"]


def test_custom_sizes_reach_the_corpus(tmp_path):
    p = demo.custom_preset("demo", videos=(6, 3, 4), frames=(20, 25), captions=(1, 2))
    out = demo.generate_corpus(tmp_path, p, seed=3, progress=False)
    caps = {s: (out / "TextData" / f"demo{s}.caption.txt").read_text().splitlines() for s in demo.SPLITS}
    videos = {s: {line.split("#", 1)[0] for line in lines} for s, lines in caps.items()}
    assert [len(videos[s]) for s in demo.SPLITS] == [6, 3, 4]
    per_video = [sum(1 for line in caps["train"] if line.startswith(v + "#")) for v in videos["train"]]
    assert min(per_video) >= 1 and max(per_video) <= 2
    from prvr.data.features import FeatureStore

    store = FeatureStore(out / "FeatureData" / "demo_feats")
    assert len(store.video_ids) == 13
    assert all(20 <= len(store.get(v)) <= 25 for v in store.video_ids)


@pytest.mark.parametrize("bad", [dict(videos=(1, 2)), dict(frames=(5, 2)), dict(captions=(0, 3))])
def test_custom_preset_refuses_bad_sizes(bad):
    with pytest.raises(ValueError):
        demo.custom_preset("demo", **bad)


def test_demo_cli_takes_the_size_flags(tmp_path):
    assert demo.main(["--out", str(tmp_path), "--preset", "demo", "--seed", "1", "--videos", "4,2,2",
                      "--frames", "20,30", "--captions", "1,3"]) == 0
    lines = (tmp_path / "demo" / "TextData" / "demotest.caption.txt").read_text().splitlines()
    assert len({line.split("#", 1)[0] for line in lines}) == 2


def _run(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=True).stdout


def _clean_env(**extra) -> dict:
    from prvr.kernels import THREAD_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PRVR_MALLOC"))
           and k not in THREAD_ENV and k != "OMP_WAIT_POLICY"}
    env.pop("GLIBC_TUNABLES", None)
    return {**env, **extra}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_train_stage_restarts_itself_once_with_the_allocator_settings():
    from prvr.kernels import ALLOCATOR_ENV, THREAD_ENV, allocator_env_needed

    if not allocator_env_needed(_clean_env()):
        pytest.skip("not glibc")
    keys = sorted(ALLOCATOR_ENV) + sorted(THREAD_ENV)
    code = ("import atexit, os, runpy, sys; print('start', flush=True); "
            "atexit.register(lambda: print('ENV', *(os.environ.get(k) for k in %r)));"
            "sys.argv = ['stages/train.py', '--help']; runpy.run_path('stages/train.py', run_name='__main__')"
            % (keys,))
    out = _run(code, _clean_env())
    assert out.count("start") == 2  # one re-exec, no loop
    assert f"ENV {' '.join({**ALLOCATOR_ENV, **THREAD_ENV}[k] for k in keys)}" in out
    # opted out, or settings of the caller's own: no restart, nothing changed
    threads = " ".join(THREAD_ENV[k] for k in sorted(THREAD_ENV))
    for env, expect in ((_clean_env(PRVR_MALLOC="system", **THREAD_ENV), f"ENV None None None {threads}"),
                        (_clean_env(MALLOC_MMAP_MAX_="7", **THREAD_ENV), f"ENV 7 None None {threads}")):
        out = _run(code, env)  # (MMAP_MAX, TOP_PAD, TRIM, then GOMP_SPINCOUNT, OPENBLAS_THREAD_TIMEOUT)
        assert out.count("start") == 1
        assert expect in out
    # thread waits of the caller's own (OMP_WAIT_POLICY stands for GOMP_SPINCOUNT): kept
    out = _run(code, _clean_env(PRVR_MALLOC="system", OMP_WAIT_POLICY="PASSIVE", OPENBLAS_THREAD_TIMEOUT="9"))
    assert out.count("start") == 1 and "ENV None None None None 9" in out
