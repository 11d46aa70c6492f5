"""Time the retrieval-metric pass at TVR test-split size (10,895 queries x 2,179 videos).

Usage:
    python benchmarks/bench_metrics.py [--threads 2] [--repeats 5] [--device cpu|cuda|all]
                                       [--release PATH] [--queries 10895 --videos 2179]

Structure like TVR: every video has the same number of captions (10,895 / 2,179 = 5) and each
query's ground truth is its video id. Scores are random with a bonus on the ground-truth
column, so recalls land in a realistic range.

--release PATH times the public release's metric code (get_gt + eval_q2m) from a checkout (a
work tree, or a bare git directory read with `git show HEAD:...`). Its file is copied to a
temporary folder and patched there (no ipdb, device instead of .cuda()); nothing of it enters
this repository. The release's ranks are compared with ours.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prvr.metrics import query_ranks, retrieval_metrics


def make_problem(n_q: int, n_v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video_ids = [f"tvr_video_{j:05d}" for j in range(n_v)]
    gt = torch.arange(n_q) % n_v
    query_video_ids = [video_ids[j] for j in gt.tolist()]
    scores = torch.randn(n_q, n_v, generator=g)
    scores[torch.arange(n_q), gt] += 2.5
    return scores, query_video_ids, video_ids, gt


def timed(fn, repeats: int, sync=None):
    """(result, [(wall seconds, process CPU seconds)] per run)."""
    times = []
    out = None
    for _ in range(repeats):
        if sync:
            sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return out, times


def fmt(times):
    wall = [w for w, _ in times]
    cpu = [c for _, c in times]
    return (f"wall min {min(wall):.3f} s / median {statistics.median(wall):.3f} s, "
            f"process CPU min {min(cpu):.3f} s, over {len(times)} runs")


def load_release(path: str, device: str):
    src = Path(path) / "src" / "Validations" / "validations.py"
    if src.is_file():
        text = src.read_text()
    else:
        text = subprocess.run(["git", "-C", path, "show", "HEAD:src/Validations/validations.py"],
                              check=True, capture_output=True, text=True).stdout
    text = text.replace("import ipdb", "").replace("from Utils.utils import gpu", "gpu = None")
    text = text.replace(".cuda()", f".to('{device}')")
    tmp = Path(tempfile.mkdtemp(prefix="release_metrics_")) / "release_validations.py"
    tmp.write_text(text)
    spec = importlib.util.spec_from_file_location("release_validations", tmp)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10895)
    ap.add_argument("--videos", type=int, default=2179)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--release", default=None, help="release checkout (work tree or bare git dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    scores, qvids, vids, gt = make_problem(args.queries, args.videos)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    print(f"problem: {args.queries} queries x {args.videos} videos, float32")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        s = scores.to(dev)
        sync = torch.cuda.synchronize if dev == "cuda" else None
        retrieval_metrics(s, qvids, vids)  # warm-up
        m, times = timed(lambda: retrieval_metrics(s, qvids, vids), args.repeats, sync)
        print(f"prvr.metrics.retrieval_metrics [{dev}]: {fmt(times)}")
        _, times = timed(lambda: query_ranks(s, gt.to(dev)), args.repeats, sync)
        print(f"prvr.metrics.query_ranks (column indices) [{dev}]: {fmt(times)}")
        print("  " + ", ".join(f"{k}={v:.2f}" for k, v in m.items()))

    if args.release:
        dev = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
        rel = load_release(args.release, dev)
        qids = [f"{v}#enc#{i}" for i, v in enumerate(qvids)]
        (_, t2v_gt), t_gt = timed(lambda: rel.get_gt(vids, qids), 1)
        s = (-scores).to(dev)
        sync = torch.cuda.synchronize if dev == "cuda" else None
        res, times = timed(lambda: rel.eval_q2m(s, t2v_gt), 1, sync)
        print(f"release get_gt (ground-truth lists) [{dev}]: {fmt(t_gt)}")
        print(f"release eval_q2m [{dev}]: {fmt(times)}")
        m = retrieval_metrics(scores, qvids, vids)
        same = all(abs(a - m[k]) < 1e-9 for a, k in zip(res, ("r1", "r5", "r10", "r100")))
        print(f"  release r1/r5/r10/r100 = {', '.join(f'{x:.2f}' for x in res)}; equal to ours: {same}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
