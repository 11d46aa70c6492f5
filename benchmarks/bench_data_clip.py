"""One data epoch on CLIP-layout features: our pipeline (H5FeatureStore) vs the releases' loader.

Generates (once) a CLIP-layout corpus (prvr.data.demo preset tvr-clip: 512-d frames in one
per-video HDF5 file, each caption's 512-d token rows in a query HDF5 file) at a given scale,
then runs training epochs of the data pipeline (batches of 128 videos with all their captions,
num_workers=0, torch 1 thread) in a fresh process per reader, so each peak RSS is its own:

* ``store``: ours: make_train_loader -> TrainVideoDataset.__getitems__ -> collate_train over
  prvr.data.h5features.H5FeatureStore (one preadv per video at HDF5's offset).
* ``release``: what the releases' training loader does, written here (not copied): per video
  ``file[video_id][...]`` with h5py (DL-DKD's read), the 32 clips binned bin by bin
  (torch.mean of each bin's frames, torch.stack), the frame stream capped at 128 rows bin by
  bin in numpy, each stream L2-normalised in numpy; per caption ``file[cap_id][...]`` (on a
  KeyError the DL-DKD alias key), normalised, cut to 30 tokens; collate into torch.zeros
  batches row by row (MS-SL / GMMFormer / DL-DKD collate). Same sampler and seed, so the same
  batches: the parent checks that its first batch equals ours (allclose, 1e-5).
* ``h5py``: h5py per-video reads (``file[video_id][...]``) fed into OUR batched binning /
  caption / collate code (through num_frames / apply): only the video reads differ from
  ``store``.

``features`` / ``h5py-features`` time the video reads alone over the epoch's videos. Each
reader runs ``--epochs`` epochs (epoch 1 includes every lazy first-use cost; later epochs
are the steady state of a training run); setup (building the store's index) is timed apart.

    python benchmarks/bench_data_clip.py --root /tmp/prvr_bench_clip --scale 0.1

The summary is printed; every run's figures go to --out (default
benchmarks/results/bench_data_clip.json).
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import _rss_now_kib  # noqa: E402


class H5pyReader:
    """Per-video h5py reads as the releases do (`clip_vid_feat[video_id][...]`)."""

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


# ------------------------------------------------------------------ the releases' loader

def _l2(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5)


def _edges(n: int, n_bins: int) -> np.ndarray:
    return np.minimum(np.round(np.arange(n_bins + 1) / n_bins * n), n - 1).astype(np.int64)


def _clips_bin_by_bin(frames: np.ndarray, n_bins: int) -> np.ndarray:
    """The releases' clip stream: a torch loop over the bins (mean of [e_i, e_i+1), else e_i)."""
    import torch

    x, e = torch.from_numpy(frames), _edges(len(frames), n_bins)
    out = [x[a:b].mean(dim=0) if a < b else x[a] for a, b in zip(e[:-1].tolist(), e[1:].tolist())]
    return torch.stack(out).numpy()


def _rows_bin_by_bin(frames: np.ndarray, max_len: int) -> np.ndarray:
    """The releases' frame stream: the frames, or max_len bins (a numpy loop) when longer."""
    if len(frames) <= max_len:
        return frames
    e = _edges(len(frames), max_len)
    return np.asarray([frames[a:b].mean(axis=0) if a < b else frames[a]
                       for a, b in zip(e[:-1].tolist(), e[1:].tolist())])


class ReleaseTrainData:
    """A torch Dataset doing per item what the releases' training dataset does (see the module
    docstring); the HDF5 files are opened on first use, as theirs are."""

    def __init__(self, corpus, n_clips: int = 32, max_frames: int = 128, max_len: int = 30):
        split = corpus.split("train")
        self.video_ids = split.video_ids
        self.caps = {v: [split.query_ids[i] for i in split.video_queries[v]] for v in self.video_ids}
        self.paths = (corpus.paths.video_feat_file, corpus.paths.query_feat_file)
        self.n_clips, self.max_frames, self.max_len = n_clips, max_frames, max_len
        self.files = None

    def __len__(self) -> int:
        return len(self.video_ids)

    def _caption(self, cap_id: str) -> np.ndarray:
        from prvr.data.layout import caption_key_alias

        try:
            return self.files[1][cap_id][...]
        except KeyError:
            return self.files[1][caption_key_alias(cap_id)][...]

    def __getitem__(self, index: int):
        import h5py
        import torch

        if self.files is None:
            self.files = [h5py.File(p, "r") for p in self.paths]
        vid = self.video_ids[index]
        frames = self.files[0][vid][...]
        clips = torch.from_numpy(_l2(_clips_bin_by_bin(frames, self.n_clips))).unsqueeze(0)
        rows = torch.from_numpy(_l2(_rows_bin_by_bin(frames, self.max_frames)))
        caps = [torch.from_numpy(_l2(self._caption(c)))[:self.max_len] for c in self.caps[vid]]
        return clips, rows, caps, vid, self.caps[vid]


def release_collate(data):
    """The releases' collate_train: zero-filled batches, one row copied at a time."""
    import torch

    clips, rows, caps, vids, cap_ids = zip(*data)
    lens = [len(r) for r in rows]
    frames, fmask = torch.zeros(len(rows), max(lens), rows[0].shape[-1]), torch.zeros(len(rows), max(lens))
    for i, r in enumerate(rows):
        frames[i, :lens[i]] = r
        fmask[i, :lens[i]] = 1.0
    flat = [c for cs in caps for c in cs]
    qlens = [len(c) for c in flat]
    queries, qmask = torch.zeros(len(flat), max(qlens), flat[0].shape[-1]), torch.zeros(len(flat), max(qlens))
    for i, c in enumerate(flat):
        queries[i, :qlens[i]] = c
        qmask[i, :qlens[i]] = 1.0
    labels = [b for b, cs in enumerate(caps) for _ in cs]
    return {"clip_feats": torch.cat(clips, dim=0).float(), "frame_feats": frames, "frame_mask": fmask,
            "query_feats": queries, "query_mask": qmask, "query_labels": torch.tensor(labels),
            "video_ids": list(vids), "query_ids": [c for cs in cap_ids for c in cs]}


def _release_loader(corpus, batch_size: int, seed: int):
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(ReleaseTrainData(corpus), batch_size=batch_size, shuffle=True,
                      collate_fn=release_collate, generator=torch.Generator().manual_seed(seed))


_COMPARED = ("clip_feats", "frame_feats", "frame_mask", "query_feats", "query_mask", "query_labels")


def _dump(batch: dict, path: str) -> None:
    np.savez(path, **{k: batch[k].numpy() for k in _COMPARED},
             ids=np.array(batch["video_ids"] + batch["query_ids"]))


def _same_first_batch(a: str, b: str) -> bool:
    x, y = np.load(a), np.load(b)
    return bool(np.array_equal(x["ids"], y["ids"]) and all(
        x[k].shape == y[k].shape and np.allclose(x[k].astype(np.float32), y[k].astype(np.float32),
                                                 rtol=1e-5, atol=1e-6) for k in _COMPARED))


def _epoch(make_loader, seed: int, dump: str | None) -> dict:
    n_videos = n_frames = n_batches = anon_peak = 0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for batch in make_loader(seed):
        if dump and not n_batches:
            _dump(batch, dump)
        n_batches += 1
        n_videos += len(batch["video_ids"])
        n_frames += int(batch["frame_mask"].sum())
        anon_peak = max(anon_peak, _rss_now_kib()[0])
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"s": round(wall, 3), "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3),
            "sys_s": round(r1.ru_stime - r0.ru_stime, 3), "minflt": r1.ru_minflt - r0.ru_minflt,
            "videos": n_videos, "frame_rows": n_frames, "batches": n_batches,
            "anon_peak_kib": anon_peak}   # the batches' RSS (RssAnon), sampled after each


def run_reader(collection_dir: Path, video_file: str, reader: str, batch_size: int,
               epochs: int = 2, dump: str | None = None) -> dict:
    import h5py  # noqa: F401  (imported before any timing, for every reader alike)
    import torch

    from prvr.data.datasets import Corpus, make_train_loader
    from prvr.data.h5features import H5FeatureStore

    torch.set_num_threads(1)
    corpus = Corpus(collection_dir, video_file, feature_format="hdf5")
    t0 = time.perf_counter()
    if reader == "release":
        make = functools.partial(_release_loader, corpus, batch_size)
    else:
        corpus._features = (H5pyReader(corpus.paths.video_feat_file) if reader.startswith("h5py")
                            else H5FeatureStore(corpus.paths.video_feat_file))
        make = functools.partial(make_train_loader, corpus, batch_size)
        make = functools.partial(lambda m, seed: m(seed=seed), make)
    setup_s = time.perf_counter() - t0
    if reader.endswith("features"):   # the reads alone, as one "batch" of every video
        store, vids = corpus._features, corpus.split("train").video_ids

        def make(seed):
            rows = sum(len(store.get(v)) for v in vids)
            yield {"video_ids": vids, "frame_mask": torch.ones(rows)}

        epochs, dump = 1, None
    runs = [_epoch(make, seed, dump if seed == 0 else None) for seed in range(epochs)]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {"reader": reader, "setup_s": round(setup_s, 3),
           **{k: runs[0][k] for k in ("videos", "frame_rows", "batches")},
           "epoch_s": [r["s"] for r in runs], "epoch_cpu_s": [r["cpu_s"] for r in runs],
           "epoch_sys_s": [r["sys_s"] for r in runs], "epoch_minflt": [r["minflt"] for r in runs],
           "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
           "peak_rss_anon_mib": round(max(max(r["anon_peak_kib"] for r in runs), _rss_now_kib()[0]) / 1024, 1)}
    return out


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


def _summary(runs: list[dict]) -> dict:
    """min / median over the repeats of: epoch 1 plus setup (the reads alone for the
    *features readers), the later epochs (wall and CPU)."""
    setup = [0.0 if r["reader"].endswith("features") else r["setup_s"] for r in runs]
    first = [s + r["epoch_s"][0] for s, r in zip(setup, runs)]
    first_cpu = [s + r["epoch_cpu_s"][0] for s, r in zip(setup, runs)]   # setup: ~all CPU
    later = [e for r in runs for e in r["epoch_s"][1:]]
    later_cpu = [e for r in runs for e in r["epoch_cpu_s"][1:]]
    out = {}
    for name, xs in (("first_s", first), ("first_cpu_s", first_cpu), ("later_s", later),
                     ("later_cpu_s", later_cpu)):
        if xs:
            out[name] = {"min": round(min(xs), 3), "median": round(float(np.median(xs)), 3)}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["peak_rss_anon_mib"] = max(r["peak_rss_anon_mib"] for r in runs)
    return out


def _speedups(results: dict, fast: str, slow: str) -> dict:
    a, b = results[fast]["summary"], results[slow]["summary"]
    return {f"{k}_{stat}": round(b[k][stat] / max(a[k][stat], 1e-3), 1)
            for k in a if k in b and isinstance(a[k], dict) for stat in ("min", "median")}


def _child(args, reader: str, dump: str | None) -> dict:
    cmd = [sys.executable, __file__, "--root", args.root, "--preset", args.preset, "--scale",
           str(args.scale), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--_child", reader] + (["--_dump", dump] if dump else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv):
    from results_io import default_out

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/prvr_bench_clip", help="where the corpus is (generated if absent)")
    ap.add_argument("--out", default=default_out("bench_data_clip"),
                    help="every run's figures, JSON (default: %(default)s)")
    ap.add_argument("--preset", default="tvr-clip")
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per process (>= 2: a steady one)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each runs every reader once, in turn")
    ap.add_argument("--readers", default="store,release,h5py,features,h5py-features")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dump", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from prvr.data import demo
    from prvr.data.layout import default_h5_feature

    p = demo.PRESETS[args.preset]
    root = Path(args.root) / f"{args.preset}-s{args.scale:g}-seed{args.seed}"
    collection_dir, video_file = root / p.collection, default_h5_feature(p.collection)
    if args._child:
        print(json.dumps(run_reader(collection_dir, video_file, args._child, args.batch_size,
                                    args.epochs, args._dump)))
        return 0
    results = {"preset": args.preset, "scale": args.scale, "batch_size": args.batch_size,
               "epochs": args.epochs, "repeat": args.repeat}
    if not collection_dir.is_dir():
        results.update(_generate(root, args.preset, args.seed, args.scale))
    h5 = collection_dir / "FeatureData" / video_file
    results["video_hdf5_mib"] = round(h5.stat().st_size / 2**20, 1)
    for path in (h5, *sorted((collection_dir / "TextData").glob("*.hdf5"))):
        with open(path, "rb") as fh:   # the same warm page cache for every reader
            while fh.read(1 << 24):
                pass
    readers = args.readers.split(",")
    runs: dict[str, list] = {r: [] for r in readers}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeat):
            for reader in readers:      # alternating, so load changes hit every reader alike
                dump = f"{tmp}/{reader}.npz" if rnd == 0 and reader in ("store", "release") else None
                runs[reader].append(_child(args, reader, dump))
                print(json.dumps(runs[reader][-1]), flush=True)
        if "store" in runs and "release" in runs:
            results["release_first_batch_equals_ours"] = _same_first_batch(
                f"{tmp}/store.npz", f"{tmp}/release.npz")
    for reader in readers:
        results[reader] = {"summary": _summary(runs[reader]), "runs": runs[reader]}
    for fast, slow in (("store", "release"), ("store", "h5py"), ("features", "h5py-features")):
        if fast in results and slow in results:
            results[f"speedup_{fast}_vs_{slow}"] = _speedups(results, fast, slow)
    print(json.dumps({k: (v["summary"] if isinstance(v, dict) and "summary" in v else v)
                      for k, v in results.items()}, indent=1))
    from results_io import write_results

    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
