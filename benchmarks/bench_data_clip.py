"""One data epoch on CLIP-layout features: H5FeatureStore vs a per-video h5py reader.

Generates (once) a CLIP-layout corpus (prvr.data.demo preset tvr-clip: 512-d frames in one
per-video HDF5 file) at a given scale, then runs one training epoch of the data pipeline
(TrainVideoDataset -> collate_train, batches of 128 videos with all their captions) in a fresh
process per reader, so each peak RSS is its own:

* ``store``: prvr.data.h5features.H5FeatureStore (one preadv per video at HDF5's offset).
* ``h5py``: the releases' access (DL-DKD, prvr-ea): ``file[video_id][...]`` with h5py per
  video, the file opened once per process.

Both feed the same binning/normalisation/caption/collate code (the datasets' batched path,
through num_frames/apply), so only the video reads differ. ``features`` / ``h5py-features``
time the reads alone over the epoch's videos.

    python benchmarks/bench_data_clip.py --root /tmp/prvr_bench_clip --scale 0.1
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import _rss_now_kib  # noqa: E402


class H5pyReader:
    """Per-video h5py reads as the releases do (`clip_vid_feat[video_id][:]`)."""

    def __init__(self, path: Path):
        import h5py

        self.f = h5py.File(path, "r")
        self.shapes = {k: self.f[k].shape for k in self.f}   # for the batched path's padding
        self.dim = next(iter(self.shapes.values()))[1]

    def __contains__(self, vid):
        return vid in self.shapes

    def num_frames(self, vid: str) -> int:
        return self.shapes[vid][0]

    def get(self, vid: str):
        return self.f[vid][...]

    def apply(self, vid: str, fn):
        return fn(self.get(vid))


def run_reader(collection_dir: Path, video_file: str, reader: str, batch_size: int) -> dict:
    import torch

    from prvr.data.datasets import Corpus, make_train_loader
    from prvr.data.h5features import H5FeatureStore

    torch.set_num_threads(1)
    corpus = Corpus(collection_dir, video_file, feature_format="hdf5")
    t0 = time.perf_counter()
    store = H5pyReader(corpus.paths.video_feat_file) if reader.startswith("h5py") \
        else H5FeatureStore(corpus.paths.video_feat_file)
    corpus._features = store
    setup_s = time.perf_counter() - t0
    anon_peak = n_videos = n_frames = n_batches = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if reader.endswith("features"):
        for vid in corpus.split("train").video_ids:
            n_frames += len(store.get(vid))
            n_videos += 1
    else:
        for batch in make_train_loader(corpus, batch_size=batch_size, seed=0):
            n_batches += 1
            n_videos += len(batch["video_ids"])
            n_frames += int(batch["frame_mask"].sum())
            anon_peak = max(anon_peak, _rss_now_kib()[0])
    epoch_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    anon_peak = max(anon_peak, _rss_now_kib()[0])
    return {"reader": reader, "setup_s": round(setup_s, 3), "epoch_s": round(epoch_s, 3),
            "epoch_cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3),
            "videos": n_videos, "frame_rows": n_frames, "batches": n_batches,
            "peak_rss_mib": round(r1.ru_maxrss / 1024, 1), "peak_rss_anon_mib": round(anon_peak / 1024, 1)}


def _generate(root: Path, preset: str, seed: int, scale: float) -> dict:
    t0 = time.perf_counter()
    code = ("import resource, sys; from prvr.data import demo; "
            f"demo.generate_corpus({str(root)!r}, {preset!r}, {seed}, {scale}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return {"generate_s": round(time.perf_counter() - t0, 1),
            "generate_peak_rss_mib": round(int(proc.stderr.strip().splitlines()[-1]) / 1024, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/prvr_bench_clip", help="where the corpus is (generated if absent)")
    ap.add_argument("--preset", default="tvr-clip")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--readers", default="store,h5py,features,h5py-features")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from prvr.data import demo
    from prvr.data.layout import default_h5_feature

    p = demo.PRESETS[args.preset]
    root = Path(args.root) / f"{args.preset}-s{args.scale:g}-seed{args.seed}"
    collection_dir, video_file = root / p.collection, default_h5_feature(p.collection)
    if args._child:
        print(json.dumps(run_reader(collection_dir, video_file, args._child, args.batch_size)))
        return 0
    results = {"preset": args.preset, "scale": args.scale, "batch_size": args.batch_size}
    if not collection_dir.is_dir():
        results.update(_generate(root, args.preset, args.seed, args.scale))
    h5 = collection_dir / "FeatureData" / video_file
    results["video_hdf5_mib"] = round(h5.stat().st_size / 2**20, 1)
    with open(h5, "rb") as fh:   # the same warm page cache for every reader
        while fh.read(1 << 24):
            pass
    for reader in args.readers.split(","):
        cmd = [sys.executable, __file__, "--root", args.root, "--preset", args.preset, "--scale",
               str(args.scale), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
               "--_child", reader]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        results[reader] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[reader]), flush=True)
    for fast, slow, name in (("store", "h5py", "epoch"), ("features", "h5py-features", "feature_read")):
        if fast in results and slow in results:
            for key in ("epoch_s", "epoch_cpu_s"):
                results[f"{name}_speedup_{key[6:]}"] = round(
                    results[slow][key] / max(results[fast][key], 1e-3), 1)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
