"""Convert an MS-SL BigFile feature folder to feature_format bigfile_hdf5.

    python -m prvr.data.convert_bigfile <collection>/FeatureData/<feature> [--force] [--no-progress]

Reads FeatureData/<feature>/{feature.bin, shape.txt, id.txt, video2frames.txt} and writes
FeatureData/<feature>/feature.hdf5 in the same folder: one contiguous, uncompressed float32
(n_frames, D) dataset per video id, rows in the order video2frames.txt lists the frames
(exactly what FeatureStore.get returns). Videos are streamed one at a time into a temporary
file next to the output, which is renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .features import FeatureStore
from .layout import FRAMES_H5, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Converted:
    output: Path
    videos: int
    frames: int
    dim: int
    bytes: int
    seconds: float


def _dataset_name(vid: str, source: Path) -> str:
    """The video id as an HDF5 dataset name; ids HDF5 would read as a path are refused."""
    if not vid or vid in (".", "..") or "/" in vid:
        raise DataError(f"{source}: video id '{vid[:60]}' cannot be an HDF5 dataset name")
    return vid


def convert_bigfile(feature_dir: str | os.PathLike, output: str | os.PathLike | None = None,
                    force: bool = False, progress: bool = True) -> Converted:
    """Write the BigFile folder's videos to `output` (default feature_dir/feature.hdf5)."""
    import h5py
    from tqdm import tqdm

    from ..atomic import atomic_path

    t0 = time.time()
    feature_dir = Path(feature_dir)
    output = Path(output) if output is not None else feature_dir / FRAMES_H5
    if output.exists() and not force:
        raise DataError(f"{output}: already exists (--force replaces it)")
    store = FeatureStore(feature_dir)
    log.info("read %s: %d videos, %d frame rows x %d float32", feature_dir, len(store),
             store.num_rows, store.dim)
    frames = 0
    with atomic_path(output, suffix=".hdf5") as tmp:
        with h5py.File(tmp, "w") as h5:
            for vid in tqdm(store.video_ids, desc=f"convert {feature_dir.name}", unit="video",
                            disable=not progress):
                name = _dataset_name(vid, store.video2frames_file)
                store.apply(vid, lambda x: h5.create_dataset(name, data=x, track_times=False))
                frames += store.num_frames(vid)
    size = output.stat().st_size
    out = Converted(output, len(store), frames, store.dim, size, time.time() - t0)
    log.info("wrote %s: %d videos, %d frames x %d, %.1f MB in %.1f s", output, out.videos,
             out.frames, out.dim, size / 1e6, out.seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prvr.data.convert_bigfile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("feature_dir", help="FeatureData/<feature> folder of a BigFile collection")
    ap.add_argument("--output", default=None, help=f"default: FEATURE_DIR/{FRAMES_H5}")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        convert_bigfile(args.feature_dir, args.output, args.force, not args.no_progress)
    except (DataError, OSError) as exc:
        print(f"convert_bigfile: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
