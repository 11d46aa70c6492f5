"""Process settings that the loader, malloc, libgomp and OpenBLAS read only at start-up.

They pay only for the CPU backend (prvr.backends.cpu), whose fused nodes allocate large fresh
tensors every step and run two BLAS thread pools. The train stage's `__main__` calls
`setup_process()` before any work: when the run will use the CPU backend on the CPU and
`cpu.process_setup` is on, the process restarts itself once (same pid, same command line) with
its CPU allocator (a preloaded tcmalloc, jemalloc or mimalloc, else glibc under ALLOCATOR_ENV)
and the thread-pool waits of THREAD_ENV. On CUDA, with `backend: reference`, or with
`cpu.process_setup: false` nothing is changed. Nothing here imports torch, so the decision and
the restart come before the heavy imports.
"""
from __future__ import annotations

import os
import platform
import sys
import sysconfig
from importlib import metadata


# glibc malloc gives every block above its mmap threshold (at most 32 MiB) its own mapping and
# unmaps it on free, so each large fresh tensor of a training step page-faults all its pages
# again, every step (benchmarks/README.md, "Training epoch": allocator settings). Served from
# the heap and never trimmed, the pages of one step are reused by the next. Read at process
# start only.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                 "MALLOC_TOP_PAD_": str(64 << 20)}
ALLOCATOR_SWITCH = "PRVR_MALLOC"  # auto | tcmalloc | jemalloc | mimalloc | glibc | system

# Allocators preloaded in place of glibc's (LD_PRELOAD), best first by the peak RSS each gave
# on the TVR-shaped epoch benchmark (benchmarks/README.md, "fourth round"). glibc's heap, never
# trimmed, still grows step by step as blocks of new sizes miss the holes of old ones, and
# every page of the peak is a first-touch fault. tcmalloc and jemalloc come from the system (Debian:
# libtcmalloc-minimal4, libjemalloc2; conda: gperftools, jemalloc); mimalloc from the
# cmeel-mimalloc wheel, a dependency on Linux. Each is told to keep freed memory instead of
# handing it back to the OS, as ALLOCATOR_ENV tells glibc; mimalloc also not to use huge
# pages, which raised its first epoch's system time (same section).
PRELOAD_ALLOCATORS = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
                 {"TCMALLOC_RELEASE_RATE": "0", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}),
    "jemalloc": (("libjemalloc.so.2",), {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"}),
    "mimalloc": (("libmimalloc.so",), {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_THP": "0"}),
}

# every variable that sets malloc's options: glibc's, or those of a preloadable allocator
ALLOCATOR_OPTIONS = frozenset({*ALLOCATOR_ENV, "GLIBC_TUNABLES",
                               *(k for _, opts in PRELOAD_ALLOCATORS.values() for k in opts)})


class AllocatorError(RuntimeError):
    pass


def _library_dirs() -> list[str]:
    """Where find_allocator looks: this Python's prefix (a venv's or conda's), $CONDA_PREFIX,
    then the system's library directories."""
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [f"{sys.prefix}/lib", f"{os.environ['CONDA_PREFIX']}/lib" if os.environ.get("CONDA_PREFIX") else "",
            "/usr/local/lib", f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib"]
    return list(dict.fromkeys(d for d in dirs if d))


def find_allocator(name: str) -> str | None:
    """The path of the `name` allocator's shared library (PRELOAD_ALLOCATORS), or None."""
    files, _ = PRELOAD_ALLOCATORS[name]
    if name == "mimalloc":
        try:
            dist = metadata.distribution("cmeel-mimalloc")
        except metadata.PackageNotFoundError:
            pass
        else:
            for f in dist.files or ():
                if f.name in files and os.path.isfile(path := str(dist.locate_file(f))):
                    return path
    for d in _library_dirs():
        for f in files:
            if os.path.isfile(path := os.path.join(d, f)):
                return path
    return None


def _preloaded_malloc(env) -> bool:
    """True when LD_PRELOAD already names a *malloc* library."""
    return any("malloc" in os.path.basename(p) for p in env.get("LD_PRELOAD", "").replace(":", " ").split())


def _callers_allocator(env) -> bool:
    """True when the caller chose malloc's settings: a preloaded *malloc* library, a glibc
    tunable, or an option of one of the preloadable allocators."""
    return _preloaded_malloc(env) or any(k in env for k in ALLOCATOR_OPTIONS)


def allocator_env_needed(env=None) -> dict[str, str]:
    """The variables to start this process with for its CPU allocator; {} off glibc Linux,
    under PRVR_MALLOC=system, or when LD_PRELOAD already names a *malloc* library.

    PRVR_MALLOC=auto (the default): unless the caller chose malloc's settings
    (`_callers_allocator`), the first of PRELOAD_ALLOCATORS found (LD_PRELOAD plus its options),
    else glibc under ALLOCATOR_ENV. A name: that allocator (AllocatorError when it is not
    found); glibc: ALLOCATOR_ENV. Options the caller set are kept."""
    env = os.environ if env is None else env
    choice = env.get(ALLOCATOR_SWITCH, "auto") or "auto"
    if choice not in ("auto", "glibc", "system", *PRELOAD_ALLOCATORS):
        raise AllocatorError(f"{ALLOCATOR_SWITCH}={choice!r}: expected one of auto, "
                             f"{', '.join(PRELOAD_ALLOCATORS)}, glibc, system")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" \
            or _preloaded_malloc(env) or (choice == "auto" and _callers_allocator(env)):
        return {}
    names = list(PRELOAD_ALLOCATORS) if choice == "auto" else [] if choice == "glibc" else [choice]
    for name in names:
        path = find_allocator(name)
        if path is None and choice != "auto":
            raise AllocatorError(f"{ALLOCATOR_SWITCH}={name}: no {' or '.join(PRELOAD_ALLOCATORS[name][0])} "
                                 f"found (looked in {', '.join(_library_dirs())}"
                                 f"{' and the cmeel-mimalloc package' if name == 'mimalloc' else ''})")
        if path is not None:
            preload = ":".join(p for p in (path, env.get("LD_PRELOAD", "").strip()) if p)
            return {"LD_PRELOAD": preload, **{k: v for k, v in PRELOAD_ALLOCATORS[name][1].items() if k not in env}}
    return {k: v for k, v in ALLOCATOR_ENV.items() if k not in env}


def allocator_in_use() -> str:
    """Which allocator this process runs: a PRELOAD_ALLOCATORS name (its library is mapped),
    'glibc (ALLOCATOR_ENV)', or 'glibc' / 'system' (neither)."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        maps = ""
    for name, (files, _) in PRELOAD_ALLOCATORS.items():
        if any(f"/{f.split('.so')[0]}.so" in maps for f in files):  # the file, under any version
            return name
    if all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return "glibc (ALLOCATOR_ENV)"
    return "glibc" if maps else "system"


# Thread waits, when both torch's OpenMP pool and numpy's OpenBLAS pool (see `matmul`) run on
# the same cores: by default each pool's idle workers spin after a call (libgomp ~300k
# iterations, OpenBLAS up to 2^28 cycles) and steal the cores from the other pool's next call.
# Short waits make the shared cores pay off (benchmarks/README.md, third round). Read at
# process start only; a variable the caller set (or OMP_WAIT_POLICY) is left as it is.
THREAD_ENV = {"GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "4"}


def thread_env_needed(env=None) -> dict[str, str]:
    """The THREAD_ENV entries missing from `env` (os.environ)."""
    env = os.environ if env is None else env
    missing = {k: v for k, v in THREAD_ENV.items() if k not in env}
    if "OMP_WAIT_POLICY" in env:
        missing.pop("GOMP_SPINCOUNT", None)
    return missing


def reexec_with_allocator_env() -> None:
    """Re-execute this process (same pid, same command line) once with its allocator
    (allocator_env_needed: a preloaded allocator, or glibc under ALLOCATOR_ENV) and THREAD_ENV
    set, when any of them is missing (thread_env_needed); otherwise return. For a stage's
    `__main__`, before any work: the loader, malloc, libgomp and OpenBLAS read these variables
    only at start-up. A bad PRVR_MALLOC exits with its one-line error."""
    try:
        missing = {**allocator_env_needed(), **thread_env_needed()}
    except AllocatorError as exc:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {exc}")
    if not missing or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})


# ----------------------------------------------------------------------------- the decision

def startup_env() -> dict[str, str]:
    """The environment this process was started with (/proc/self/environ), not os.environ as
    other code may have changed it since; os.environ where /proc is not readable."""
    try:
        raw = open("/proc/self/environ", "rb").read()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def short_openblas_waits(env=None) -> bool:
    """True when OpenBLAS's idle workers wait briefly (OPENBLAS_THREAD_TIMEOUT <= 8) in the
    start-up environment: OpenBLAS reads it once, when numpy loads it."""
    env = startup_env() if env is None else env
    try:
        return int(env.get("OPENBLAS_THREAD_TIMEOUT", "")) <= 8
    except ValueError:
        return False


def cuda_visible(env=None) -> bool:
    """Whether torch would see a CUDA device, judged without importing torch: an NVIDIA driver
    is loaded and CUDA_VISIBLE_DEVICES does not hide every device."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def cpu_backend_run(backend: str, device: str, env=None) -> bool:
    """True when a run with these settings (backend auto|reference|cpu, device auto|cpu|cuda[:N])
    will compute on the CPU backend's kernels: on the CPU, with backend auto or cpu."""
    device = str(device or "auto").lower()
    on_cpu = device == "cpu" or (device == "auto" and not cuda_visible(env))
    return on_cpu and str(backend or "auto").lower() in ("auto", "cpu")


def setup_process(backend: str, device: str, enabled: bool) -> str:
    """The train stage's start-up: restart once under the CPU allocator and thread waits when
    the run uses the CPU backend (`cpu_backend_run`) and `enabled` (params cpu.process_setup);
    returns the reason when it does nothing (the stage logs it after the restart, too)."""
    if not enabled:
        return "off (cpu.process_setup: false)"
    if not cpu_backend_run(backend, device):
        return f"none (backend {backend} on device {device}: not the CPU backend)"
    reexec_with_allocator_env()
    return "CPU backend: allocator and thread waits set at start-up"
