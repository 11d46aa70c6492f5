"""Time whole training epochs of the train stage, as a user runs it, against the release's loop.

    python benchmarks/bench_epoch.py --root /tmp/prvr_epoch                 # ours only
    python benchmarks/bench_epoch.py --root /tmp/prvr_epoch --release /tmp/GMMFormer_v2 --repeats 2

1. Generates (once; reused while its settings match) a TVR-shaped corpus in the MS-SL layout
   under ROOT/data with `prvr.data.demo` (default: 512 train / 128 val / 256 test videos,
   3072-d frames, 20-200 frames and 1-6 captions per video, 768-d tokens).
2. `ours`: runs `stages/train.py` (its `__main__`, so whatever the stage sets up for itself,
   the allocator settings included, is in the figure) in a fresh process on that corpus with
   the TVR recipe (batch 128, hidden 384) and `--epochs` epochs (the only change to the
   recipe: a params file under ROOT differs from params.yaml in data_root, dataset, epochs and
   backend).
   The epoch is the stage's own loop: data, forward, losses, backward, optimiser, validation.
   `ours` is the stage as shipped (`backend: auto`, the CPU fast path on this machine);
   `reference` the same stage with `backend: reference`, the plain PyTorch network (skip it
   with --no-reference).
3. `release` (with --release DIR, a copy of the GMMFormer v2 release): a patched copy of its
   `src` is written to ROOT/release_patched (never into this repository) that reads the same
   corpus on CPU (`.cuda()` a no-op, num_workers 0, no pinned memory, `n_epoch` = --epochs);
   its `main.main()` then runs `train_one_epoch` + validation as the release does.
Runs alternate (ours, reference, release, ours, ...) so all see the same machine load. For each run the
parent reads the child's rusage (os.wait4: wall, user, sys, minor + major faults, peak RSS;
the same numbers /usr/bin/time -v prints); the child also records getrusage deltas per phase
(setup, train epochs, validations) into ROOT/<impl>-<n>.json. Every run's figures go to --out
(default benchmarks/results/bench_epoch.json).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import default_out, write_results

REPO = Path(__file__).resolve().parents[1]
PHASES = ("setup", "train", "validation", "rest")
# ours: the train stage as shipped (backend: auto, the CPU fast path here); reference: the same
# stage with backend: reference (the plain PyTorch network); release: the public release's loop.
IMPLS = ("ours", "reference", "release")


# ------------------------------------------------------------------------------ the corpus

def corpus_args(args) -> dict:
    return {"preset": "tvr-shaped", "seed": args.seed, "videos": args.videos, "frames": args.frames,
            "captions": args.captions}


def ensure_corpus(root: Path, spec: dict) -> Path:
    """ROOT/data/tvr, generated unless a corpus of the same spec is there."""
    data = root / "data"
    stamp = data / "bench_corpus.json"
    spec = json.loads(json.dumps(spec))  # tuples as the lists the stamp holds
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and (data / "tvr").is_dir():
        return data
    from prvr.data.demo import custom_preset, generate_corpus

    t0 = time.perf_counter()
    preset = custom_preset(spec["preset"], tuple(spec["videos"]), tuple(spec["frames"]), tuple(spec["captions"]))
    generate_corpus(data, preset, seed=spec["seed"], progress=False)
    stamp.write_text(json.dumps(spec))
    print(f"generated the corpus under {data} in {time.perf_counter() - t0:.1f} s", flush=True)
    return data


def write_params(root: Path, data: Path, epochs: int, backend: str = "auto") -> Path:
    """params.yaml of the repository with data_root, dataset tvr, the epoch count and the
    backend changed."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data_root"] = str(data)
    params["dataset"] = "tvr"
    params["model"] = {"name": "gmmformer_v2"}
    params["methods"]["gmmformer_v2"]["tvr"]["epochs"] = int(epochs)
    params["backend"] = backend
    path = root / f"params-{backend}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ child side

class PhaseClock:
    """getrusage(RUSAGE_SELF) deltas per named phase, in the child."""

    def __init__(self):
        self.t, self.ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        self.phases = {p: {"wall": 0.0, "user": 0.0, "sys": 0.0, "minflt": 0, "majflt": 0} for p in PHASES}
        self.current = "setup"
        self.epochs: list[dict] = []  # each train call (one epoch) on its own

    def switch(self, phase: str) -> None:
        t, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        delta = {"wall": t - self.t, "user": ru.ru_utime - self.ru.ru_utime, "sys": ru.ru_stime - self.ru.ru_stime,
                 "minflt": ru.ru_minflt - self.ru.ru_minflt, "majflt": ru.ru_majflt - self.ru.ru_majflt}
        for k, v in delta.items():
            self.phases[self.current][k] += v
        if self.current == "train":
            self.epochs.append(delta)
        self.t, self.ru, self.current = t, ru, phase

    def wrap(self, fn, phase: str):
        def timed(*a, **k):
            self.switch(phase)
            try:
                return fn(*a, **k)
            finally:
                self.switch("rest")
        return timed

    def dump(self, path: Path) -> None:
        self.switch("rest")
        status = Path("/proc/self/status").read_text()
        peak = re.search(r"VmHWM:\s+(\d+) kB", status)
        out = {"phases": self.phases, "train_epochs": self.epochs, "vm_hwm_kb": int(peak.group(1)) if peak else None,
               "env": {k: v for k, v in os.environ.items()
                       if k.startswith(("MALLOC_", "PRVR_", "GOMP_", "OPENBLAS_", "OMP_", "LD_PRELOAD", "MIMALLOC_",
                                     "TCMALLOC_"))}}
        path.write_text(json.dumps(out, indent=1))


def child_ours(args) -> int:
    """Run stages/train.py as __main__ with its epochs and validations timed by phase."""
    import atexit
    import runpy

    import prvr.evaluation
    import prvr.training

    clock = PhaseClock()
    atexit.register(clock.dump, Path(args.phase_file))
    prvr.training.train_epoch = clock.wrap(prvr.training.train_epoch, "train")
    prvr.evaluation.evaluate = clock.wrap(prvr.evaluation.evaluate, "validation")
    os.chdir(args.workdir)
    sys.argv = [str(REPO / "stages" / "train.py"), "--params", args.params, "--no-progress", "--no-mlflow"]
    runpy.run_path(sys.argv[0], run_name="__main__")  # the stage ends with sys.exit(main())
    return 0


def _shim_release_imports() -> None:
    from release_shim import cuda_as_noop, shim_missing

    shim_missing("ipdb", "easydict", "seaborn", "matplotlib", "matplotlib.pyplot")  # imported, unused
    cuda_as_noop(modules=True)  # the release hard-codes .cuda()


def child_release(args) -> int:
    """The patched release's main.main(), its train_one_epoch / val_one_epoch timed by phase."""
    import atexit

    clock = PhaseClock()
    atexit.register(clock.dump, Path(args.phase_file))
    _shim_release_imports()
    src = Path(args.release_src)
    sys.path.insert(0, str(src))
    os.chdir(args.workdir)
    sys.argv = [str(src / "main.py"), "-d", "tvr"]
    import main as release_main

    release_main.train_one_epoch = clock.wrap(release_main.train_one_epoch, "train")
    release_main.val_one_epoch = clock.wrap(release_main.val_one_epoch, "validation")
    release_main.main()
    return 0


# ------------------------------------------------------------------------------ the release copy

def patch_release(release: Path, root: Path, data: Path, epochs: int) -> Path:
    """ROOT/release_patched/src: the release's src, reading `data` on CPU for `epochs` epochs."""
    src = release / "src"
    if not (src / "main.py").is_file() or not (src / "Configs" / "tvr.py").is_file():
        raise SystemExit(f"--release {release}: no src/main.py and src/Configs/tvr.py there")
    dst = root / "release_patched" / "src"
    shutil.rmtree(dst.parent, ignore_errors=True)
    shutil.copytree(src, dst)
    cfg = dst / "Configs" / "tvr.py"
    text = cfg.read_text()
    subs = {r"cfg\['root'\] = .*": f"cfg['root'] = {str(root / 'release_out')!r}",
            r"cfg\['data_root'\] = .*": f"cfg['data_root'] = {str(data)!r}",
            r"cfg\['num_workers'\] = 32": "cfg['num_workers'] = 0",
            r"cfg\['no_pin_memory'\] = False": "cfg['no_pin_memory'] = True",
            r"cfg\['n_epoch'\] = .*": f"cfg['n_epoch'] = {int(epochs)}"}
    for pattern, repl in subs.items():
        text, n = re.subn(pattern, lambda _m, r=repl: r, text)
        if n != 1:
            raise SystemExit(f"{cfg}: expected one line matching {pattern!r}, found {n}")
    cfg.write_text(text)
    return dst


# ------------------------------------------------------------------------------ parent side

def run_child(impl: str, n: int, args, root: Path, extra: list[str]) -> dict:
    workdir = root / f"work-{impl}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    phase_file = root / f"{impl}-{n}.json"
    phase_file.unlink(missing_ok=True)
    child = "release" if impl == "release" else "ours"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--workdir", str(workdir),
           "--phase-file", str(phase_file), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log = open(root / f"{impl}-{n}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (root / f"{impl}-{n}.log").read_text()[-3000:]
        raise SystemExit(f"{impl} run {n} failed (exit {proc.returncode}); log {root}/{impl}-{n}.log:\n{tail}")
    phases = json.loads(phase_file.read_text())
    return {"impl": impl, "wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "minflt": ru.ru_minflt,
            "majflt": ru.ru_majflt, "peak_rss_mb": ru.ru_maxrss / 1024, **phases}


def summarize(results: list[dict]) -> str:
    lines = ["| impl | run | wall s | train s | validation s | user s | sys s | sys share | minor faults "
             "| major faults | peak RSS MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(results):
        ph = r["phases"]
        cpu = r["user"] + r["sys"]
        lines.append(f"| {r['impl']} | {i} | {r['wall']:.1f} | {ph['train']['wall']:.1f} | "
                     f"{ph['validation']['wall']:.1f} | {r['user']:.1f} | {r['sys']:.1f} | "
                     f"{100 * r['sys'] / max(cpu, 1e-9):.1f}% | {r['minflt'] / 1e6:.2f} M | {r['majflt']} | "
                     f"{r['peak_rss_mb']:,.0f} |")
    by = {impl: [r for r in results if r["impl"] == impl] for impl in IMPLS}
    for key, label in (("wall", "wall"), ("train", "train phase"), ("epoch", "train + validation"),
                       ("cpu", "user + sys"), ("peak_rss_mb", "peak RSS")):
        vals = {impl: [_value(r, key) for r in rs] for impl, rs in by.items() if rs}
        text = "; ".join(f"{impl} min {min(v):.1f} median {statistics.median(v):.1f}" for impl, v in vals.items())
        for other in ("release", "reference"):
            if other in vals and "ours" in vals:
                text += (f"; {other}/ours (medians) "
                         f"x{statistics.median(vals[other]) / statistics.median(vals['ours']):.2f}")
        lines.append(f"{label}: {text}")
    for i, r in enumerate(results):  # the first epoch pays the heap's first touch, later ones reuse it
        if len(r.get("train_epochs", [])) > 1:
            lines.append(f"{r['impl']} run {i} train epochs: " + "; ".join(
                f"{e['wall']:.1f} s, sys {100 * e['sys'] / max(e['user'] + e['sys'], 1e-9):.1f}%, "
                f"{e['minflt'] / 1e6:.2f} M faults" for e in r["train_epochs"]))
    return "\n".join(lines)


def _value(r: dict, key: str) -> float:
    ph = r["phases"]
    if key == "train":
        return ph["train"]["wall"]
    if key == "epoch":
        return ph["train"]["wall"] + ph["validation"]["wall"]
    if key == "cpu":
        return r["user"] + r["sys"]
    return r[key]


def _pair(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/prvr_epoch"), help="corpus, params and logs")
    ap.add_argument("--out", type=Path, default=default_out("bench_epoch"), help="the runs' figures, JSON (default: %(default)s)")
    ap.add_argument("--videos", type=_pair, default=(512, 128, 256), help="TRAIN,VAL,TEST videos")
    ap.add_argument("--frames", type=_pair, default=(20, 200), help="LO,HI frames per video")
    ap.add_argument("--captions", type=_pair, default=(1, 6), help="LO,HI captions per video")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per implementation (alternating)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP threads of each run")
    ap.add_argument("--release", type=Path, help="a copy of the GMMFormer v2 release (holds src/main.py)")
    ap.add_argument("--only", choices=IMPLS, help="run one implementation only")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference backend's run (backend: reference on the CPU)")
    ap.add_argument("--child", choices=("ours", "release"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--phase-file", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--release-src", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "ours":   # either backend: the params file says which
        return child_ours(args)
    if args.child == "release":
        return child_release(args)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = ensure_corpus(root, corpus_args(args))
    impls = [("ours", ["--params", str(write_params(root, data, args.epochs, "auto"))])]
    if not args.no_reference:
        impls.append(("reference", ["--params", str(write_params(root, data, args.epochs, "reference"))]))
    if args.release is not None:
        impls.append(("release", ["--release-src", str(patch_release(args.release.resolve(), root, data,
                                                                      args.epochs))]))
    if args.only:
        impls = [i for i in impls if i[0] == args.only]
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} load {os.getloadavg()[0]:.2f}; corpus {corpus_args(args)}; "
          f"{args.epochs} epoch(s), {args.threads} threads", flush=True)
    results = []
    for n in range(args.repeats):
        for impl, extra in impls:
            r = run_child(impl, n, args, root, extra)
            results.append(r)
            print(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f} {impl} run {n}: wall {r['wall']:.1f} s, "
                  f"user {r['user']:.1f} s, sys {r['sys']:.1f} s, faults {r['minflt']:,} + {r['majflt']}, "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MiB; phases "
                  + ", ".join(f"{p} {v['wall']:.1f} s/{v['sys']:.1f} sys/{v['minflt']:,} flt"
                              for p, v in r["phases"].items()), flush=True)
    write_results(args.out, results)
    print(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
