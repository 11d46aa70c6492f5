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


def _run(code: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, check=check)


def _clean_env(**extra) -> dict:
    """os.environ without any allocator or thread-wait setting, plus `extra`."""
    from prvr.procenv import ALLOCATOR_OPTIONS, THREAD_ENV

    drop = {*ALLOCATOR_OPTIONS, *THREAD_ENV, "OMP_WAIT_POLICY", "LD_PRELOAD", "PRVR_MALLOC"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


# the train stage's __main__ under `env`: 'start' once per exec, then the variables and the allocator
_STAGE = ("import atexit, os, runpy, sys; print('start', flush=True); "
          "from prvr.procenv import allocator_in_use; "
          "atexit.register(lambda: print('ENV', *(os.environ.get(k) for k in %r), 'IN_USE', allocator_in_use()));"
          "sys.argv = ['stages/train.py', '--help']; runpy.run_path('stages/train.py', run_name='__main__')")
_glibc = pytest.mark.skipif(not (sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"),
                            reason="the allocator settings are for glibc Linux")


@_glibc
def test_train_stage_restarts_itself_once_under_mimalloc_by_default():
    # CI's case: no tcmalloc or jemalloc on the system, mimalloc from the cmeel-mimalloc dependency
    from prvr.procenv import PRELOAD_ALLOCATORS, THREAD_ENV, find_allocator

    if find_allocator("tcmalloc") or find_allocator("jemalloc"):
        pytest.skip("a system allocator ranks before mimalloc here")
    assert find_allocator("mimalloc"), "cmeel-mimalloc (a dependency on Linux) is not installed"
    keys = ["LD_PRELOAD", *PRELOAD_ALLOCATORS["mimalloc"][1], *THREAD_ENV]
    out = _run(_STAGE % (keys,), _clean_env()).stdout
    assert out.count("start") == 2  # one re-exec, no loop
    env_line = out.split("ENV ", 1)[1].split()
    assert env_line[0] == find_allocator("mimalloc")
    assert env_line[1:-2] == [*PRELOAD_ALLOCATORS["mimalloc"][1].values(), *THREAD_ENV.values()]
    assert env_line[-1] == "mimalloc"  # the library is mapped into the restarted process


@_glibc
def test_train_stage_restarts_itself_once_with_the_glibc_settings():
    from prvr.procenv import ALLOCATOR_ENV, THREAD_ENV

    keys = sorted(ALLOCATOR_ENV) + sorted(THREAD_ENV)
    out = _run(_STAGE % (keys,), _clean_env(PRVR_MALLOC="glibc")).stdout
    assert out.count("start") == 2
    assert f"ENV {' '.join({**ALLOCATOR_ENV, **THREAD_ENV}[k] for k in keys)} IN_USE glibc (ALLOCATOR_ENV)" in out
    # opted out, or settings of the caller's own: no restart, nothing changed
    threads = " ".join(THREAD_ENV[k] for k in sorted(THREAD_ENV))
    for env, expect in ((_clean_env(PRVR_MALLOC="system", **THREAD_ENV), f"ENV None None None {threads} IN_USE glibc"),
                        (_clean_env(MALLOC_MMAP_MAX_="7", **THREAD_ENV), f"ENV 7 None None {threads}")):
        out = _run(_STAGE % (keys,), env).stdout  # (MMAP_MAX, TOP_PAD, TRIM, GOMP_SPINCOUNT, OPENBLAS_THREAD_TIMEOUT)
        assert out.count("start") == 1
        assert expect in out
    # thread waits of the caller's own (OMP_WAIT_POLICY stands for GOMP_SPINCOUNT): kept
    out = _run(_STAGE % (keys,), _clean_env(PRVR_MALLOC="system", OMP_WAIT_POLICY="PASSIVE",
                                             OPENBLAS_THREAD_TIMEOUT="9")).stdout
    assert out.count("start") == 1 and "ENV None None None None 9" in out


@_glibc
@pytest.mark.parametrize("value", ["tcmalloc-2", "jemalloc"])
def test_train_stage_refuses_a_bad_or_missing_allocator_in_one_line(value):
    from prvr.procenv import find_allocator

    if value == "jemalloc" and find_allocator("jemalloc"):
        pytest.skip("jemalloc is installed here")
    proc = _run(_STAGE % ([],), _clean_env(PRVR_MALLOC=value), check=False)
    assert proc.returncode != 0 and proc.stdout.count("start") == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: PRVR_MALLOC=") and value in err[0]


@pytest.fixture
def fake_libs(tmp_path, monkeypatch):
    """A library directory holding the files named, which find_allocator searches alone."""
    import platform

    from prvr import procenv

    monkeypatch.setattr(procenv, "_library_dirs", lambda: [str(tmp_path)])
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))

    def make(*names):
        for n in names:
            (tmp_path / n).write_bytes(b"")
        return tmp_path
    return make


def test_auto_takes_the_best_allocator_found(fake_libs):
    from prvr.procenv import ALLOCATOR_ENV, PRELOAD_ALLOCATORS, allocator_env_needed

    d = fake_libs("libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    assert allocator_env_needed({}) == {"LD_PRELOAD": f"{d}/libtcmalloc_minimal.so.4",
                                        **PRELOAD_ALLOCATORS["tcmalloc"][1]}
    assert allocator_env_needed({"PRVR_MALLOC": "jemalloc"})["LD_PRELOAD"] == f"{d}/libjemalloc.so.2"
    assert allocator_env_needed({"PRVR_MALLOC": "glibc"}) == ALLOCATOR_ENV
    assert allocator_env_needed({"PRVR_MALLOC": "system"}) == {}
    # a preload of the caller's that is not an allocator is kept, after ours
    assert allocator_env_needed({"LD_PRELOAD": "/opt/libfoo.so"})["LD_PRELOAD"] == \
        f"{d}/libtcmalloc_minimal.so.4:/opt/libfoo.so"
    # an allocator asked for by name is preloaded, and the caller's options for it kept
    assert allocator_env_needed({"PRVR_MALLOC": "tcmalloc", "TCMALLOC_RELEASE_RATE": "1"}) == {
        "LD_PRELOAD": f"{d}/libtcmalloc_minimal.so.4", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    assert allocator_env_needed({"PRVR_MALLOC": "glibc", "MALLOC_TOP_PAD_": "0"}) == {
        k: v for k, v in ALLOCATOR_ENV.items() if k != "MALLOC_TOP_PAD_"}
    assert allocator_env_needed({"PRVR_MALLOC": "jemalloc", "LD_PRELOAD": "/opt/libmimalloc.so"}) == {}
    # under auto, the caller's own allocator or allocator options: left alone
    for env in ({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, {"MALLOC_CONF": "narenas:1"},
                {"TCMALLOC_RELEASE_RATE": "1"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
                {"MALLOC_TRIM_THRESHOLD_": "0"}):
        assert allocator_env_needed(env) == {}, env


def test_no_allocator_found_falls_back_to_glibc_or_names_what_is_missing(fake_libs, monkeypatch):
    from prvr import procenv
    from prvr.procenv import ALLOCATOR_ENV, AllocatorError, allocator_env_needed

    d = fake_libs()
    real = procenv.find_allocator
    monkeypatch.setattr(procenv, "find_allocator", lambda n: None if n == "mimalloc" else real(n))
    assert allocator_env_needed({}) == ALLOCATOR_ENV
    with pytest.raises(AllocatorError, match=f"PRVR_MALLOC=tcmalloc: no libtcmalloc_minimal.so.4 or "
                                             f"libtcmalloc.so.4 found .*{d}"):
        allocator_env_needed({"PRVR_MALLOC": "tcmalloc"})
    with pytest.raises(AllocatorError, match="PRVR_MALLOC='tc': expected one of auto, tcmalloc"):
        allocator_env_needed({"PRVR_MALLOC": "tc"})
