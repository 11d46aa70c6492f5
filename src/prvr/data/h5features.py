"""Per-video HDF5 frame features (the CLIP ViT-B/32 files of DL-DKD), behind FeatureStore's
interface.

The file holds one dataset per video id, shaped (frames, D), frames in time order (its row
order; no video2frames.txt is involved). `H5FeatureStore` takes every video's shape, and where
a contiguous float32 video's bytes lie, from the file's offset index (`h5index.load_index`:
what HDF5 reports for each dataset, cached under data/<dataset>/h5index/ so that a process
does not open every dataset through HDF5 again), and then:

* reads a contiguous, uncompressed little-endian float32 video with ONE `os.preadv` at its
  offset, into a buffer it reuses; the first such read of each process is checked against
  HDF5's own read (on a mismatch every later read goes through HDF5);
* reads anything else (chunked, compressed, float16/float64, big-endian) through HDF5,
  which converts to float32.

`apply(video_id, fn)` hands fn the video's (n, D) rows and returns fn's result, as
`FeatureStore.apply` does, so the datasets bin (32 clips), cap (128 frames) and normalise
them with the same code. The file is opened lazily in each process and never pickled.
A video that cannot be used (not a 2-d float dataset, 0 frames, another width) stays known
(`in`) with its problem (`problem(video_id)`), and reading it raises DataError naming the
file and the video.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .h5index import H5Index, load_index
from .layout import DataError


def _h5():
    import h5py

    return h5py


def open_h5(path: Path):
    """h5py.File(path, 'r'), or DataError (one line) for a missing, truncated or non-HDF5 file."""
    h5py = _h5()
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None


LINK_PROBLEM = "is an external link to another file, not a dataset (never followed)"


def is_external_link(fid, bname: bytes) -> bool:
    """Whether the root member `bname` is an external link (which HDF5 would follow into a
    file named by the data; it is never opened). False for a name that is not there."""
    h5py = _h5()
    try:
        return fid.links.get_info(bname).type == h5py.h5l.TYPE_EXTERNAL
    except (KeyError, RuntimeError, ValueError):
        return False


def describe(node) -> tuple[tuple[int, int] | None, str | None]:
    """((frames, D), None) for a usable video dataset (low-level h5d id), else (None, why)."""
    shape, dtype = node.shape, node.dtype
    if len(shape) != 2:
        return None, f"has shape {shape}, expected (frames, D)"
    if dtype.kind != "f":
        return None, f"has dtype {dtype}, expected floats"
    if shape[0] == 0:
        return None, "has 0 frames"
    return (int(shape[0]), int(shape[1])), None


class H5FeatureStore:
    """Frame features of the videos in one per-video HDF5 file.

    `get(video_id)` -> float32 array (n_frames, D), frames in time order (row order)."""

    def __init__(self, feature_file: str | os.PathLike, index_dir: str | os.PathLike | None = None):
        """Index the file's videos: from the offset index cached in `index_dir` (the
        dataset's data/<dataset>/h5index, see h5index.index_dir) when it is current, else
        built (and cached there when index_dir is given)."""
        self.feature_file = Path(feature_file)
        self.index_file = self.feature_file
        index = load_index(self.feature_file, index_dir)
        self._shape: dict[str, tuple[int, int]] = {}
        self._offset: dict[str, int] = {}
        self._problem: dict[str, str] = {}
        self._from_index(index)
        widths = Counter(d for _, d in self._shape.values())
        if not widths:
            raise DataError(f"{self.feature_file}: no usable video features"
                            + (f" (first problem: {self._first_problem()})" if self._problem else ""))
        self.dim = widths.most_common(1)[0][0]
        for vid, (_, d) in list(self._shape.items()):
            if d != self.dim:
                self._problem[vid] = f"has width {d}, the other videos {self.dim}"
                del self._shape[vid]
                self._offset.pop(vid, None)
        self._file = self._fd = self._pid = None
        self._fast, self._checked = sys.byteorder == "little", False
        self._scratch = np.empty(0, dtype=np.float32)

    def _from_index(self, index: H5Index) -> None:
        """Shapes and offsets of the videos readable in place, straight from the index (no
        HDF5 call); every other member is described through HDF5 (its shape, dtype, why it
        cannot be used) and read through HDF5."""
        plain = index.in_place((2,))
        names = np.array(index.names, dtype=object)
        rows, cols = index.shape[plain].T.tolist()
        self._shape.update(zip(names[plain].tolist(), zip(rows, cols)))
        self._offset.update(zip(names[plain].tolist(), index.offset[plain].tolist()))
        rest = names[~plain].tolist()
        if rest:
            with open_h5(self.feature_file) as f:
                for name in rest:
                    self._describe(f.id, name)

    def _describe(self, fid, name: str) -> None:
        h5py = _h5()
        bname = name.encode("utf-8", "surrogateescape")
        if is_external_link(fid, bname):
            self._problem[name] = LINK_PROBLEM
            return
        try:
            node = h5py.h5d.open(fid, bname)
        except (KeyError, ValueError, TypeError):
            self._problem[name] = "is not a dataset"
            return
        shape, why = describe(node)
        if why:
            self._problem[name] = why
        else:
            self._shape[name] = shape

    def _first_problem(self) -> str:
        vid, why = next(iter(self._problem.items()))
        return f"video '{vid}' {why}"

    # ----------------------------------------------------------------- pickling / processes
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_file=None, _fd=None, _pid=None, _scratch=np.empty(0, dtype=np.float32))
        return state

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open_h5(self.feature_file)   # a forked worker opens its own
            self._fd = os.open(self.feature_file, os.O_RDONLY) if hasattr(os, "preadv") else None
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
            if self._fd is not None:
                os.close(self._fd)
        self._file = self._fd = self._pid = None

    # ----------------------------------------------------------------- access
    def __contains__(self, video_id: str) -> bool:
        return video_id in self._shape or video_id in self._problem

    def __len__(self) -> int:
        return len(self._shape) + len(self._problem)

    @property
    def video_ids(self) -> list[str]:
        return [*self._shape, *self._problem]

    def problem(self, video_id: str) -> str | None:
        """Why a video of the file cannot be read (None when it can)."""
        return self._problem.get(video_id)

    def num_frames(self, video_id: str) -> int:
        return self._lookup(video_id)[0]

    def _lookup(self, video_id: str) -> tuple[int, int]:
        shape = self._shape.get(video_id)
        if shape is None:
            why = self._problem.get(video_id, "has no features here")
            raise DataError(f"{self.feature_file}: video '{video_id}' {why}")
        return shape

    def _read_h5(self, video_id: str, out: np.ndarray) -> np.ndarray:
        h5py = _h5()
        node = h5py.h5d.open(self._handle().id, video_id.encode("utf-8"))
        try:
            node.read(h5py.h5s.ALL, h5py.h5s.ALL, out)   # HDF5 converts to float32
        except OSError as exc:
            raise DataError(f"{self.feature_file}: video '{video_id}' cannot be read "
                            f"({str(exc).splitlines()[0]})") from None
        return out

    def _read_into(self, video_id: str, out: np.ndarray) -> np.ndarray:
        """The video's (n, D) float32 rows written into `out` (shape (n, D), C-contiguous)."""
        self._handle()
        offset = self._offset.get(video_id) if self._fast and self._fd is not None else None
        if offset is None:
            return self._read_h5(video_id, out)
        if os.preadv(self._fd, [out], offset) != out.nbytes:
            raise DataError(f"{self.feature_file}: video '{video_id}' runs past the end of "
                            "the file (truncated?)")
        if not self._checked:      # trust the offsets only once one reads what HDF5 reads
            self._checked = True
            if not np.array_equal(out, self._read_h5(video_id, np.empty_like(out)), equal_nan=True):
                self._fast = False
                return self._read_h5(video_id, out)
        return out

    def get(self, video_id: str) -> np.ndarray:
        """(n_frames, D) float32, a copy (safe to modify)."""
        return self._read_into(video_id, np.empty(self._lookup(video_id), dtype=np.float32))

    def apply(self, video_id: str, fn):
        """fn(frames) with frames the video's (n_frames, D) float32 rows in time order, in a
        buffer this store reuses: fn must not keep it (nor a view of it)."""
        n, d = self._lookup(video_id)
        if self._scratch.size < n * d:
            self._scratch = np.empty(max(n * d, 2 * self._scratch.size), dtype=np.float32)
        frames = self._read_into(video_id, self._scratch[:n * d].reshape(n, d))
        try:
            return fn(frames)
        finally:
            del frames


def scan_videos(path: Path, split_videos: dict[str, list[str]], progress: bool = True) -> dict:
    """Read every video of the splits once, for the validate stage. Returns
    {"error": str | None (the file cannot be opened), "widths": {video: D},
     "frames": {split: [frame counts]}, "counts": {video: frames}, "absent" / "bad" / "non_finite": {split: [(video, why)]}}.
    """
    from tqdm import tqdm

    out = {"error": None, "widths": {}, "frames": {}, "counts": {}, "absent": {}, "bad": {},
           "non_finite": {}}
    try:
        f = open_h5(path)
    except DataError as exc:
        out["error"] = str(exc).split(": ", 1)[-1]
        return out
    h5py = _h5()
    total = sum(len(v) for v in split_videos.values())
    with f, tqdm(total=total, desc="scan video features", unit="video",
                 disable=not progress or total < 2000) as bar:
        for split, videos in split_videos.items():
            frames, absent, bad, non_finite = [], [], [], []
            for vid in videos:
                bar.update(1)
                if is_external_link(f.id, vid.encode("utf-8")):
                    bad.append((vid, LINK_PROBLEM))
                    continue
                try:
                    node = h5py.h5d.open(f.id, vid.encode("utf-8"))
                except (KeyError, ValueError, TypeError):
                    if vid in f:
                        bad.append((vid, "is not a dataset"))
                    else:
                        absent.append((vid, "is not in the file"))
                    continue
                shape, why = describe(node)
                if why:
                    bad.append((vid, why))
                    continue
                frames.append(shape[0])
                out["counts"][vid] = shape[0]
                out["widths"][vid] = shape[1]
                values = np.empty(shape, dtype=np.float32)
                try:
                    node.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
                except OSError as exc:
                    bad.append((vid, f"cannot be read ({str(exc).splitlines()[0]})"))
                    continue
                if not np.isfinite(values).all():
                    non_finite.append((vid, "holds NaN or Inf"))
            out["frames"][split], out["absent"][split] = frames, absent
            out["bad"][split], out["non_finite"][split] = bad, non_finite
    return out


class FramesH5Store(H5FeatureStore):
    """feature_format bigfile_hdf5: FeatureData/<feature>/feature.hdf5 (one (n_frames, D)
    dataset per video, rows in video2frames order) next to video2frames.txt.

    Read as H5FeatureStore reads its file (offset index, one preadv per contiguous float32
    video, the file opened lazily in each process); video2frames.txt says which videos there
    are and how many frames each has. A listed video without a dataset, a dataset whose frame
    count disagrees with the listing, or a dataset of a video not listed, stays known (`in`)
    with its problem, like every other unusable dataset."""

    def __init__(self, feature_dir: str | os.PathLike, index_dir: str | os.PathLike | None = None):
        from .layout import FRAMES_H5, read_video2frames

        self.feature_dir = Path(feature_dir)
        self.video2frames_file = self.feature_dir / "video2frames.txt"
        listed = {vid: len(frames) for vid, frames in read_video2frames(self.video2frames_file).items()}
        super().__init__(self.feature_dir / FRAMES_H5, index_dir)
        v2f = self.video2frames_file.name
        for vid, (n, _) in list(self._shape.items()):
            if vid not in listed:
                self._problem[vid] = f"is not listed in {v2f}"
            elif listed[vid] != n:
                self._problem[vid] = f"has {n} frames, {v2f} lists {listed[vid]}"
            else:
                continue
            del self._shape[vid]
            self._offset.pop(vid, None)
        for vid, n in listed.items():
            if vid not in self._shape and vid not in self._problem:
                self._problem[vid] = f"has no dataset here ({v2f} lists {n} frames)"
