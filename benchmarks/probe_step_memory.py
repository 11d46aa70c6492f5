"""Where a GMMFormer v2 training step's memory goes (the tool behind the epoch's peak RSS).

    python benchmarks/probe_step_memory.py                    # B=128 TVR-shaped batch, 4 steps
    python benchmarks/probe_step_memory.py --set-to-none      # gradients freed between steps

Same batch and model as bench_train_step.py (`make_batch`, TVR configuration), run under the
train stage's malloc settings (it re-executes itself with them, as the stage does). Prints:

1. saved tensors: the distinct storages autograd keeps after one forward, in total;
2. live peak: the most bytes alive during one whole step (forward, backward, optimiser),
   above what was alive before it, from torch.profiler's memory timeline;
3. per step: wall time, the process's peak RSS so far, and glibc's heap (mallinfo2: its
   size, the bytes in use, the bytes free inside it), so heap growth from fragmentation shows.
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prvr.procenv import reexec_with_allocator_env  # noqa: E402

GIB = 2 ** 30


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap() -> str:
    """glibc's heap in GiB (size / in use / free inside), or '' off glibc."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return ""
    fn.restype = _MallInfo2
    m = fn()
    return f"; heap {m.arena / GIB:.2f} GiB, in use {m.uordblks / GIB:.2f}, free {m.fordblks / GIB:.2f}"


def saved_bytes(forward) -> int:
    """Bytes of the distinct storages autograd saves during forward()."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values())


def live_peak_bytes(step) -> int:
    """Most bytes alive during step() above the start, from the profiler's memory timeline."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(1).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=9527)
    ap.add_argument("--set-to-none", action="store_true",
                    help="free the gradients between steps (the stage zeroes them in place)")
    args = ap.parse_args(argv)
    reexec_with_allocator_env()

    import torch
    from bench_train_step import METHOD, Ours, make_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = METHOD.config({}, {"visual_dim": 3072, "text_dim": 768})
    batch = make_batch(args.videos, cfg, args.seed)
    ours = Ours(cfg, torch.device("cpu"))

    def step():
        loss = ours.forward(batch)
        loss.backward()
        ours.opt.step()
        ours.opt.zero_grad(set_to_none=args.set_to_none)

    print(f"{args.videos} videos, {len(batch['query_labels'])} queries, {int(batch['frame_mask'].sum())} "
          f"real frames; torch {torch.__version__}, {torch.get_num_threads()} threads{heap()}", flush=True)
    for i in range(args.steps):
        t0 = time.perf_counter()
        step()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"step {i}: {time.perf_counter() - t0:.2f} s, peak RSS {rss:.2f} GiB{heap()}", flush=True)
    print(f"saved tensors of one forward: {saved_bytes(lambda: ours.forward(batch)) / GIB:.3f} GiB")
    print(f"live peak of one step: {live_peak_bytes(step) / 2 ** 20:,.0f} MiB above its start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
