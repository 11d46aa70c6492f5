"""Fast reader of an MS-SL feature folder (feature.bin + id.txt + shape.txt + video2frames.txt).

`FeatureStore` memory-maps feature.bin once per process and maps every video to its rows
when it is built, so reading a video is one slice of the map (one fancy-index when its frames
are not contiguous in row order): no open, seek or read per frame, unlike the release's
per-frame `BigFile.read_one`.

* The map is opened lazily, on first use in each process, and is never pickled, so a
  `FeatureStore` can be handed to DataLoader workers (fork or spawn).
* After copying a video out, the pages of the map it touched are dropped from this
  process (madvise DONTNEED; they stay in the OS page cache), so an epoch over a corpus much
  larger than RAM keeps the resident set small instead of growing to the file size.
* `apply(video_id, fn)` hands `fn` the video's rows in place (a view of the map, no copy,
  when they are contiguous) and drops the pages after `fn` returns: the datasets bin and
  normalise straight from the map, so a video's frames are copied once, into its result.
  The map is read-only (a private writable map would count the whole file against the
  kernel's overcommit limit, which refuses a map larger than RAM + swap).
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from .layout import DataError, read_ids, read_shape, read_video2frames

_PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class FeatureStore:
    """Frame features of the videos in one `FeatureData/<feature>/` folder.

    `get(video_id)` -> float32 array (n_frames, D), frames in time order (video2frames order).
    """

    def __init__(self, feature_dir: str | os.PathLike, release_pages: bool = True):
        self.feature_dir = Path(feature_dir)
        self.feature_file = self.feature_dir / "feature.bin"
        self.video2frames_file = self.feature_dir / "video2frames.txt"
        self.index_file = self.video2frames_file      # where a video's frames are listed
        self.release_pages = release_pages and _DONTNEED is not None
        n, d = read_shape(self.feature_dir / "shape.txt")
        self.num_rows, self.dim = n, d
        try:
            size = self.feature_file.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{self.feature_file}: not found") from None
        if size != n * d * 4:
            raise DataError(f"{self.feature_file}: {size} bytes, but shape.txt says {n} x {d} "
                            f"float32 = {n * d * 4} bytes")
        ids = read_ids(self.feature_dir / "id.txt")
        if len(ids) != n:
            raise DataError(f"{self.feature_dir / 'id.txt'}: {len(ids)} frame ids, but shape.txt "
                            f"says {n} rows")
        row_of = {fid: i for i, fid in enumerate(ids)}
        del ids
        video2frames = read_video2frames(self.video2frames_file)
        # video -> (start, stop) for a contiguous run of rows, else an int64 row array.
        self._rows: dict[str, tuple[int, int] | np.ndarray] = {}
        for vid, frames in video2frames.items():
            if not frames:
                raise DataError(f"{self.video2frames_file}: video '{vid}' has no frames")
            try:
                rows = np.fromiter((row_of[f] for f in frames), dtype=np.int64, count=len(frames))
            except KeyError as exc:
                raise DataError(f"{self.video2frames_file}: frame '{exc.args[0]}' of video '{vid}' "
                                f"is not in id.txt") from None
            start = int(rows[0])
            if rows[-1] - start + 1 == len(rows) and np.all(np.diff(rows) == 1):
                self._rows[vid] = (start, start + len(rows))
            else:
                self._rows[vid] = rows
        self._mm: np.memmap | None = None
        self._pid: int | None = None

    # ----------------------------------------------------------------- pickling / processes
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        state["_pid"] = None
        return state

    def _map(self) -> np.memmap:
        pid = os.getpid()
        if self._mm is None or self._pid != pid:
            # A forked worker must not share the parent's map object: open its own.
            if self.num_rows == 0:
                self._mm = np.zeros((0, self.dim), dtype="<f4")  # type: ignore[assignment]
            else:
                self._mm = np.memmap(self.feature_file, dtype="<f4", mode="r",
                                     shape=(self.num_rows, self.dim))
            self._pid = pid
        return self._mm  # type: ignore[return-value]

    # ----------------------------------------------------------------- access
    def __contains__(self, video_id: str) -> bool:
        return video_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def video_ids(self) -> list[str]:
        return list(self._rows)

    def is_contiguous(self, video_id: str) -> bool:
        return isinstance(self._lookup(video_id), tuple)

    def num_frames(self, video_id: str) -> int:
        r = self._lookup(video_id)
        return r[1] - r[0] if isinstance(r, tuple) else len(r)

    def _lookup(self, video_id: str):
        try:
            return self._rows[video_id]
        except KeyError:
            raise DataError(f"{self.video2frames_file}: no entry for video '{video_id}'") from None

    def get(self, video_id: str) -> np.ndarray:
        """(n_frames, D) float32, a copy (safe to modify)."""
        r = self._lookup(video_id)
        mm = self._map()
        if isinstance(r, tuple):
            lo, hi = r
            out = np.array(mm[lo:hi], dtype=np.float32)
        else:
            lo, hi = int(r.min()), int(r.max()) + 1
            out = np.asarray(mm[r], dtype=np.float32)
        if self.release_pages:
            self._release(mm, lo, hi)
        return out

    def apply(self, video_id: str, fn):
        """fn(frames) with frames the video's (n_frames, D) float32 rows in time order, then
        the map's pages dropped; returns what fn returns. frames is a view of the map when the
        video's rows are contiguous (else a copy), read-only: fn must only read it and must
        not keep it (nor a view of it)."""
        r = self._lookup(video_id)
        mm = self._map()
        if isinstance(r, tuple):
            lo, hi = r
            frames = np.asarray(mm[lo:hi])   # plain ndarray view (memmap slicing overhead once)
        else:
            lo, hi = int(r.min()), int(r.max()) + 1
            frames = np.asarray(mm[r], dtype=np.float32)
        try:
            return fn(frames)
        finally:
            del frames
            if self.release_pages:
                self._release(mm, lo, hi)

    def _release(self, mm, lo: int, hi: int) -> None:
        raw = getattr(mm, "_mmap", None)
        if raw is None:
            return
        row_bytes = self.dim * 4
        start = (lo * row_bytes) // _PAGE * _PAGE
        stop = hi * row_bytes
        try:
            raw.madvise(_DONTNEED, start, stop - start)
        except (OSError, ValueError):  # not supported here: keep the pages, reading still works
            self.release_pages = False


def open_store(paths, index_dir: str | os.PathLike | None = None):
    """The frame reader of a collection's feature_format, the one place that picks it:
    FeatureStore (bigfile), H5FeatureStore (hdf5, the CLIP file) or FramesH5Store
    (bigfile_hdf5). All give `get` / `apply` / `num_frames` / `in` / `dim` / `index_file`
    with the same frames for the same data; the HDF5 ones also `problem(video_id)`.
    `paths` is a layout.CollectionPaths; `index_dir` caches HDF5 offset indexes."""
    from .h5features import FramesH5Store, H5FeatureStore

    if paths.feature_format == "bigfile":
        return FeatureStore(paths.feature_dir)
    if paths.feature_format == "bigfile_hdf5":
        return FramesH5Store(paths.feature_dir, index_dir)
    return H5FeatureStore(paths.video_feat_file, index_dir)
