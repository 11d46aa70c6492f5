"""Per-video HDF5 frame features (the CLIP ViT-B/32 files of DL-DKD), behind FeatureStore's
interface.

The file holds one dataset per video id, shaped (frames, D), frames in time order (its row
order; no video2frames.txt is involved). `H5FeatureStore` indexes every video once when it is
built (shape, dtype, and where a contiguous dataset's bytes lie: for plain float32 datasets
straight from their object headers, `raw_f32_index`, ~6 us a video instead of ~40 us through
H5Dopen; through HDF5 for the rest) and then:

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
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np

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


# ------------------------------------------------------------------ the file's own index
# Opening a dataset through HDF5 costs ~30-50 us (name lookup, header decode, h5py objects):
# ~0.4 s for the captions of a TVR-sized split, more than the rest of an epoch. Where a plain
# dataset sits is written in its object header, which one pread gets: `raw_f32_index` reads the
# headers of the root group's datasets (their addresses come from one link iteration) and keeps
# those it fully understands: version-1 headers of contiguous, allocated, unfiltered, little-
# endian IEEE float32 datasets of rank 1 or 2. Anything else is left to HDF5 (H5Dopen), and the
# whole index is dropped unless a sample of it agrees with what HDF5 itself reports.

_F32LE = bytes.fromhex("201f00" "04000000" "0000" "2000" "17" "08" "00" "17" "7f000000")
_SKIP = {0x0000, 0x0005, 0x000C, 0x000D, 0x000E, 0x0011, 0x0012, 0x0013, 0x0015, 0x0016}


def _superblock_sizes(fd: int) -> tuple[int, int] | None:
    """(size of offsets, size of lengths) of a file whose superblock is at byte 0, else None."""
    head = os.pread(fd, 24, 0)
    if head[:8] != b"\x89HDF\r\n\x1a\n" or len(head) < 24:
        return None
    version = head[8]
    sizes = (head[13], head[14]) if version in (0, 1) else (head[9], head[10]) if version in (2, 3) else None
    return sizes if sizes == (8, 8) else None


_HEADER, _MESSAGE, _LAYOUT = struct.Struct("<BxHII"), struct.Struct("<HHB"), struct.Struct("<BBQQ")


def _parse_messages(buf: bytes) -> tuple[int, tuple[int, ...]] | None:
    """(data offset, dims) from a version-1 object header's messages, None if not plain."""
    if len(buf) < 16 or buf[0] != 1:
        return None
    _, n_msgs, _, size = _HEADER.unpack_from(buf)
    pos, end, dims, typed, where = 16, min(16 + size, len(buf)), None, False, None
    for _ in range(n_msgs):
        if pos + 8 > end:
            return None
        kind, length, flags = _MESSAGE.unpack_from(buf, pos)
        body, pos = pos + 8, pos + 8 + length
        if pos > end or (flags & 0x02 and kind in (0x0001, 0x0003, 0x0008)):
            return None                           # truncated, or a shared message
        if kind == 0x0001:
            dims = _dataspace_dims(buf, body, length)
        elif kind == 0x0003:
            typed = length >= 20 and (buf[body] & 0x0F) == 1 and buf[body + 1:body + 20] == _F32LE
        elif kind == 0x0008:
            if length < 18 or buf[body] not in (3, 4) or buf[body + 1] != 1:
                return None                       # only contiguous storage
            where = _LAYOUT.unpack_from(buf, body)[2:]
        elif kind not in _SKIP:                   # filters, external files, continuation, ...
            return None
    if dims is None or not typed or where is None or where[0] == 2**64 - 1:
        return None
    n = _count(dims)
    return (where[0], dims) if where[1] == 4 * n and n > 0 else None


def _dataspace_dims(buf: bytes, body: int, length: int) -> tuple[int, ...] | None:
    version, rank = buf[body], buf[body + 1] if length > 1 else 0
    if length < 8 or version not in (1, 2) or rank not in (1, 2):
        return None
    if version == 2 and buf[body + 3] != 1:       # version 2: only a simple dataspace
        return None
    start = body + (8 if version == 1 else 4)
    if length < start - body + 8 * rank:
        return None
    return struct.unpack_from(f"<{rank}Q", buf, start)


def raw_f32_index(f, path: Path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{name: (byte offset, dims)} of the root group's datasets stored as plain float32 (see
    above), read from their object headers; {} when the file's layout is not understood or a
    sample of 8 entries disagrees with HDF5. `f` is the open h5py.File of `path`."""
    if sys.byteorder != "little" or not hasattr(os, "pread"):
        return {}
    fd = os.open(path, os.O_RDONLY)
    try:
        if _superblock_sizes(fd) is None:
            return {}
        links: list[tuple[bytes, int]] = []
        hard = _h5().h5l.TYPE_HARD

        def visit(name, info):
            if info.type == hard:
                links.append((name, info.u))

        f.id.links.iterate(visit, info=True)
        size, out = os.fstat(fd).st_size, {}
        for name, addr in links:
            buf = os.pread(fd, 512, addr)
            if len(buf) >= 12 and 16 + int.from_bytes(buf[8:12], "little") > len(buf):
                buf = os.pread(fd, 16 + int.from_bytes(buf[8:12], "little"), addr)
            found = _parse_messages(buf)
            if found is not None and found[0] + 4 * _count(found[1]) <= size:
                out[name.decode("utf-8", "surrogateescape")] = found
    finally:
        os.close(fd)
    return out if _agrees_with_hdf5(f, out) else {}


def _count(dims: tuple[int, ...]) -> int:
    return dims[0] * dims[1] if len(dims) == 2 else dims[0]


def _agrees_with_hdf5(f, index: dict) -> bool:
    h5py = _h5()
    names = list(index)
    for name in names[::max(1, len(names) // 8)][:8] + names[-1:]:
        node = h5py.h5d.open(f.id, name.encode("utf-8", "surrogateescape"))
        if (node.get_offset() != index[name][0] or tuple(node.shape) != index[name][1]
                or node.get_type() != h5py.h5t.IEEE_F32LE):
            return False
    return True


class H5FeatureStore:
    """Frame features of the videos in one per-video HDF5 file.

    `get(video_id)` -> float32 array (n_frames, D), frames in time order (row order)."""

    def __init__(self, feature_file: str | os.PathLike):
        self.feature_file = Path(feature_file)
        self.index_file = self.feature_file
        h5py = _h5()
        with open_h5(self.feature_file) as f:
            size = self.feature_file.stat().st_size
            fast_type = h5py.h5t.IEEE_F32LE if sys.byteorder == "little" else None
            self._shape: dict[str, tuple[int, int]] = {}
            self._offset: dict[str, int] = {}
            self._problem: dict[str, str] = {}
            raw = raw_f32_index(f, self.feature_file) if fast_type is not None else {}
            for name in f:
                found = raw.get(name)
                if found is not None and len(found[1]) == 2:   # plain float32 (n >= 1, D >= 1)
                    self._shape[name], self._offset[name] = found[1], found[0]
                else:
                    self._index(f.id, name, size, fast_type)
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
        self._fast, self._checked = True, False
        self._scratch = np.empty(0, dtype=np.float32)

    def _index(self, fid, name: str, size: int, fast_type) -> None:
        h5py = _h5()
        try:
            node = h5py.h5d.open(fid, name.encode("utf-8"))
        except (KeyError, ValueError, TypeError):
            self._problem[name] = "is not a dataset"
            return
        shape, why = describe(node)
        if why:
            self._problem[name] = why
            return
        self._shape[name] = shape
        offset = node.get_offset()
        if offset is not None and fast_type is not None and node.get_type() == fast_type:
            if offset + shape[0] * shape[1] * 4 > size:
                self._problem[name] = "runs past the end of the file (truncated?)"
                del self._shape[name]
                return
            self._offset[name] = int(offset)

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
