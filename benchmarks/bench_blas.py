"""Does `prvr.backends.cpu.kernels.matmul` on numpy's OpenBLAS pay on this machine? Two figures:

    python benchmarks/bench_blas.py                 # GEMM rates + 10 interleaved B=128 steps
    python benchmarks/bench_blas.py --steps 0       # GEMM rates only

1. GFLOP/s of the six matmuls of GMMFormer v2's FFN (9922 frame tokens, 384 <-> 1536), torch
   (oneMKL in the CPU wheel) against numpy (its OpenBLAS), same arrays, twice each.
2. Whole training steps (forward, losses, backward, optimiser) at the TVR configuration, B=128
   synthetic videos (bench_train_step's batch), in ONE process with the `numpy_blas` switch
   flipped every step, so both arms see the same heap and the same machine load; the first two
   steps are warm-up. The process re-executes itself under the train stage's settings
   (ALLOCATOR_ENV, THREAD_ENV), as `stages/train.py` does.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

from prvr.backends.cpu.kernels import SWITCHES, numpy_blas_active
from prvr.procenv import reexec_with_allocator_env


def gemm_rates(reps: int = 6) -> list[str]:
    N, H, F = 9922, 384, 1536
    g = torch.Generator().manual_seed(0)
    y, g_ = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    w_in, w_out, h = torch.randn(F, H, generator=g), torch.randn(H, F, generator=g), torch.randn(N, F, generator=g)
    cases = {"h = y W_in^T": (y, w_in.t()), "out = h W_out^T": (h, w_out.t()), "dW_out = g^T h": (g_.t(), h),
             "dh = g W_out": (g_, w_out), "dW_in = dh^T y": (h.t(), y), "dy = dh W_in": (h, w_in)}
    lines = ["| matmul | torch GFLOP/s | numpy GFLOP/s |", "| --- | --- | --- |"]
    flop = 2 * N * H * F
    for name, (a, b) in cases.items():
        out = torch.empty(a.shape[0], b.shape[1])
        rates = []
        for fn in (lambda: torch.mm(a, b, out=out),
                   lambda: np.matmul(a.numpy(), b.numpy(), out=out.numpy())):
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            rates.append(flop * reps / (time.perf_counter() - t) / 1e9)
        lines.append(f"| {name} | {rates[0]:.0f} | {rates[1]:.0f} |")
    return lines


def interleaved_steps(steps: int, seed: int) -> list[str]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_step import METHOD, Ours, make_batch

    torch.manual_seed(0)
    cfg = METHOD.config({}, {"visual_dim": 3072, "text_dim": 768})
    batch = make_batch(128, cfg, seed)
    ours = Ours(cfg, torch.device("cpu"))
    res = {True: [], False: []}
    for i in range(2 + steps):
        SWITCHES.numpy_blas = i % 2 == 0
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        ours.update(ours.forward(batch))
        dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        if i >= 2:
            res[SWITCHES.numpy_blas].append((dt, r1.ru_utime - r0.ru_utime))
        print(f"step {i}: numpy_blas={SWITCHES.numpy_blas} {dt:.2f} s", flush=True)
    SWITCHES.numpy_blas = True
    lines = ["| matmuls on | steps | wall median s | wall mean s | user CPU median s |", "| --- | --- | --- | --- | --- |"]
    for on, v in res.items():
        w, u = [x[0] for x in v], [x[1] for x in v]
        lines.append(f"| {'numpy OpenBLAS' if on else 'torch (oneMKL)'} | {len(v)} | {statistics.median(w):.2f} "
                     f"| {statistics.mean(w):.2f} | {statistics.median(u):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="interleaved timed steps (0: rates only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=9527)
    args = ap.parse_args()
    reexec_with_allocator_env()
    torch.set_num_threads(args.threads)
    if not numpy_blas_active(torch.empty(1)):
        raise SystemExit("bench_blas: numpy's OpenBLAS was not found; kernels.matmul uses torch's BLAS here")
    print("\n".join(gemm_rates()))
    if args.steps:
        print("\n".join(interleaved_steps(args.steps, args.seed)))


if __name__ == "__main__":
    main()
