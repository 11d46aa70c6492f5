"""One data epoch: the memory-mapped FeatureStore vs a frame-by-frame seeking reader.

Generates (once) a tvr-shaped corpus at a given scale with prvr.data.demo, then runs one
training epoch of the data pipeline (TrainVideoDataset -> collate_train -> batches of 128
videos with all their captions) in a fresh process per reader, so each reader's peak RSS is
its own:

* ``mmap``: prvr.data.features.FeatureStore (one slice of a per-process memmap per video).
* ``seek``: the release's access pattern (its BigFile.read_one): for every frame, open
  feature.bin, seek to the frame's row, read D floats, close.

Both readers feed the same binning/normalisation/caption/collate code (the datasets'
batched path, through the readers' num_frames/apply), so the difference is the feature
access alone. A third run, ``features``, times FeatureStore.get over the epoch's
videos without the rest of the pipeline, and ``seek-features`` the same for the seeking reader.

    python benchmarks/bench_data.py --root /tmp/prvr_bench --scale 0.1

The figures are printed and written to --out (default benchmarks/results/bench_data.json).
"""
from __future__ import annotations

import argparse
import array
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


class SeekingStore:
    """Frame-by-frame reader like the release's BigFile.read_one (open + seek + read per frame)."""

    def __init__(self, feature_dir: Path):
        from prvr.data.layout import read_ids, read_shape, read_video2frames

        self.feature_file = Path(feature_dir) / "feature.bin"
        self.num_rows, self.dim = read_shape(Path(feature_dir) / "shape.txt")
        self.row_of = {f: i for i, f in enumerate(read_ids(Path(feature_dir) / "id.txt"))}
        self.video2frames = read_video2frames(Path(feature_dir) / "video2frames.txt")

    def __contains__(self, vid):
        return vid in self.video2frames

    def read_one(self, frame_id: str) -> list[float]:
        res = array.array("f")
        with open(self.feature_file, "rb") as fh:
            fh.seek(self.row_of[frame_id] * self.dim * 4)
            res.fromfile(fh, self.dim)
        return res.tolist()

    def get(self, vid: str) -> np.ndarray:
        return np.array([self.read_one(f) for f in self.video2frames[vid]], dtype=np.float32)

    # The interface the datasets' batched path uses (FeatureStore's), so that both readers run
    # the same binning, normalisation, caption and collate code: only the reads differ.
    def num_frames(self, vid: str) -> int:
        return len(self.video2frames[vid])

    def apply(self, vid: str, fn):
        return fn(self.get(vid))


def _rss_now_kib() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process in KiB, from /proc (0 where unavailable)."""
    out = {"RssAnon": 0, "RssFile": 0}
    try:
        for line in open("/proc/self/status"):
            k = line.split(":")[0]
            if k in out:
                out[k] = int(line.split()[1])
    except OSError:
        pass
    return out["RssAnon"], out["RssFile"]


def run_reader(collection_dir: Path, feature: str, reader: str, batch_size: int,
               num_workers: int, seed: int) -> dict:
    import torch

    from prvr.data.datasets import Corpus, make_train_loader
    from prvr.data.features import FeatureStore

    torch.set_num_threads(1)
    corpus = Corpus(collection_dir, feature)
    t0 = time.perf_counter()
    store = SeekingStore(corpus.paths.feature_dir) if reader.startswith("seek") \
        else FeatureStore(corpus.paths.feature_dir)
    corpus._features = store
    setup_s = time.perf_counter() - t0
    anon_peak = 0
    n_videos = n_frames = n_queries = n_batches = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    if reader.endswith("features"):
        for vid in corpus.split("train").video_ids:
            x = store.get(vid)
            n_videos += 1
            n_frames += len(x)
            if n_videos % 100 == 0:
                anon_peak = max(anon_peak, _rss_now_kib()[0])
    else:
        loader = make_train_loader(corpus, batch_size=batch_size, num_workers=num_workers, seed=seed)
        for batch in loader:
            n_batches += 1
            n_videos += len(batch["video_ids"])
            n_frames += int(batch["frame_mask"].sum())
            n_queries += len(batch["query_ids"])
            anon_peak = max(anon_peak, _rss_now_kib()[0])
    epoch_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # DataLoader workers, once they exit
    if not reader.endswith("features"):
        del loader, batch  # let persistent workers exit so their CPU time is counted
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
             + c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
    anon_peak = max(anon_peak, _rss_now_kib()[0])
    return {"reader": reader, "setup_s": round(setup_s, 2), "epoch_s": round(epoch_s, 2),
            "epoch_cpu_s": round(cpu_s, 2),
            "videos": n_videos, "frame_rows": n_frames, "queries": n_queries, "batches": n_batches,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_anon_mib": round(anon_peak / 1024, 1)}


def parse_args(argv):
    from results_io import default_out

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/prvr_bench", help="where the corpus is (generated if absent)")
    ap.add_argument("--out", default=default_out("bench_data"), help="the figures, JSON (default: %(default)s)")
    ap.add_argument("--preset", default="tvr-shaped")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--readers", default="mmap,seek,features,seek-features")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from prvr.data import demo

    p = demo.PRESETS[args.preset]
    root = Path(args.root) / f"{args.preset}-s{args.scale:g}-seed{args.seed}"
    collection_dir = root / p.collection
    if args._child:
        print(json.dumps(run_reader(collection_dir, p.feature, args._child, args.batch_size,
                                    args.num_workers, args.seed)))
        return 0

    results = {"preset": args.preset, "scale": args.scale, "batch_size": args.batch_size,
               "num_workers": args.num_workers}
    if not collection_dir.is_dir():
        t0 = time.perf_counter()
        code = ("import resource, sys; from prvr.data import demo; "
                f"demo.generate_corpus({str(root)!r}, {args.preset!r}, {args.seed}, {args.scale}); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        proc = subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results["generate_s"] = round(time.perf_counter() - t0, 1)
        results["generate_peak_rss_mib"] = round(int(proc.stderr.strip().splitlines()[-1]) / 1024, 1)
    fbin = collection_dir / "FeatureData" / p.feature / "feature.bin"
    results["feature_bin_mib"] = round(fbin.stat().st_size / 2**20, 1)
    # Warm the page cache the same way for every reader (both are measured on a warm cache).
    with open(fbin, "rb") as fh:
        while fh.read(1 << 24):
            pass
    for reader in args.readers.split(","):
        cmd = [sys.executable, __file__, "--root", args.root, "--preset", args.preset,
               "--scale", str(args.scale), "--seed", str(args.seed), "--batch-size",
               str(args.batch_size), "--num-workers", str(args.num_workers), "--_child", reader]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        results[reader] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[reader]), flush=True)
    for fast, slow, name in (("mmap", "seek", "epoch"), ("features", "seek-features", "feature_read")):
        if fast in results and slow in results:
            for key in ("epoch_s", "epoch_cpu_s"):
                results[f"{name}_speedup_{key[6:]}"] = round(
                    results[slow][key] / max(results[fast][key], 1e-3), 1)
    print(json.dumps(results, indent=1))
    from results_io import write_results

    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
