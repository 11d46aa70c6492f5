"""The train stage's start-up (prvr.procenv.setup_process): the allocator and thread waits are
set only where the run computes on the CPU backend, decided from params.yaml before torch."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from prvr import procenv

# the train stage's __main__ with `params`: 'start' once per exec; the allocator in use at exit
_STAGE = ("import atexit, runpy, sys; print('start', flush=True); "
          "from prvr.procenv import allocator_in_use; "
          "atexit.register(lambda: print('IN_USE', allocator_in_use()));"
          "sys.argv = ['stages/train.py', '--params', %r, '--help']; "
          "runpy.run_path('stages/train.py', run_name='__main__')")


def _starts(params_path, env) -> int:
    out = subprocess.run([sys.executable, "-c", _STAGE % str(params_path)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120, check=True).stdout
    return out.count("start")


def _params(tmp_path, **top) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in top.items():
        section, _, name = key.rpartition(".")
        (params.setdefault(section, {}) if section else params)[name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def _clean_env() -> dict:
    import os

    drop = {*procenv.ALLOCATOR_OPTIONS, *procenv.THREAD_ENV, "OMP_WAIT_POLICY", "LD_PRELOAD", "PRVR_MALLOC"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("settings, restarts", [
    ({}, True),                                      # auto on a CPU-only machine: the CPU backend
    ({"backend": "reference"}, False),
    ({"backend": "cpu", "train.device": "cuda"}, False),
    ({"cpu.process_setup": False}, False),
])
def test_the_train_stage_restarts_only_for_the_cpu_backend(tmp_path, settings, restarts):
    if restarts and not procenv.allocator_env_needed(_clean_env()) and not procenv.thread_env_needed(_clean_env()):
        pytest.skip("nothing to set up on this system")
    assert _starts(_params(tmp_path, **settings), _clean_env()) == (2 if restarts else 1)


def test_the_decision_needs_no_torch():
    code = ("import sys; from prvr.config import process_settings; from prvr.procenv import cpu_backend_run; "
            "b, d, on = process_settings('params.yaml'); cpu_backend_run(b, d); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_backend_run():
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    assert procenv.cpu_backend_run("auto", "auto", no_gpu) and procenv.cpu_backend_run("cpu", "cpu", no_gpu)
    assert not procenv.cpu_backend_run("reference", "cpu", no_gpu)
    assert not procenv.cpu_backend_run("cpu", "cuda:0", no_gpu)
    assert not procenv.cuda_visible({"CUDA_VISIBLE_DEVICES": "-1"})
    assert procenv.setup_process("auto", "auto", False).startswith("off")
    assert "not the CPU backend" in procenv.setup_process("reference", "cpu", True)


def test_a_bad_cpu_setting_is_a_one_line_error(tmp_path):
    from prvr.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"cpu\.process_setup"):
        load_settings(_params(tmp_path, **{"cpu.process_setup": "yes"}))
    with pytest.raises(ConfigError, match=r"cpu\.numpy_blas"):
        load_settings(_params(tmp_path, **{"cpu.numpy_blas": 3}))
    assert load_settings(_params(tmp_path))["cpu"] == {"process_setup": True, "numpy_blas": True}
