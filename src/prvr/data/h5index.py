"""Where each dataset of an HDF5 feature file lies, taken from h5py's own API and cached.

`H5Index` lists the members of one HDF5 file's root group (the videos of a per-video feature
file, the captions of a query file) with each member's rank, its (rows, cols) shape (a (D,)
dataset counts as (1, D)), and, for a dataset whose values can be read in place, the byte
offset of those values. In place means what HDF5 itself reports for the dataset: contiguous
layout (`get_create_plist().get_layout() == h5d.CONTIGUOUS`), no filters, no external
storage, little-endian IEEE float32 (`get_type()`), rank 1 or 2, allocated
(`DatasetID.get_offset()` is not None) and a storage size (`get_storage_size()`) of exactly
4 * rows * cols bytes. Reading those bytes at the offset gives the values `f[name][()]`
gives. Every other member (chunked, compressed, another dtype, external, a group) has
offset -1: its readers go through HDF5, which converts to float32.

Building an index opens every dataset through HDF5 once, which is the cost the store and
the caption reader would otherwise pay in each process, so it is cached:
`load_index(path, cache_dir)` returns the index written in `cache_dir` (the dataset's
data/<dataset>/h5index/ folder, see `index_dir`) when it was built for this very file (same
resolved path, size and mtime in ns, same index version), and otherwise builds it, says so in
one log line, and writes it atomically. The cache never goes beside the HDF5 file, whose
folder may be read-only; when `cache_dir` cannot be written, or is None, the index is kept in
memory only. The cache file is plain arrays in an .npz, read with allow_pickle=False.
"""
from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layout import DataError

log = logging.getLogger(__name__)

VERSION = 1             # bump when what the index holds changes: older caches are rebuilt
NOT_A_DATASET = -1      # rank of a member that is not a dataset (a group, a dangling link)
_ARRAYS = ("version", "path", "size", "mtime_ns", "names", "rank", "shape", "offset")


@dataclass(frozen=True)
class H5Index:
    """The root members of one HDF5 file as HDF5 reports them (see the module docstring).
    `names[i]` goes with `rank[i]`, `shape[i]` and `offset[i]`."""

    path: str             # the file's resolved path when indexed
    size: int             # its size in bytes then
    mtime_ns: int         # its modification time then
    names: list[str]      # root members, in HDF5's link order
    rank: np.ndarray      # int8 (N,): each dataset's rank, NOT_A_DATASET for other members
    shape: np.ndarray     # int64 (N, 2): (rows, cols); (1, D) for a (D,) dataset; 0s else
    offset: np.ndarray    # int64 (N,): where the values' bytes start, -1: not in place

    def in_place(self, ranks: tuple[int, ...] = (1, 2)) -> np.ndarray:
        """Mask of the datasets of the given ranks readable in place that lie inside the file
        as it was indexed (a truncated file's datasets are left to HDF5's read)."""
        ends = self.offset + 4 * self.shape[:, 0] * self.shape[:, 1]
        return (self.offset >= 0) & np.isin(self.rank, ranks) & (ends <= self.size)


def index_dir(settings: dict[str, Any], data_dir: str | os.PathLike = "data") -> Path:
    """data/<dataset>/h5index: where the indexes of a dataset's HDF5 files are cached."""
    return Path(data_dir) / str(settings["dataset"]) / "h5index"


def cache_file(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The cache of `path`'s index in `cache_dir`: named after the HDF5 file."""
    return Path(cache_dir) / f"{Path(path).name}.npz"


def _stamp(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime in ns) of the file, or DataError when it is not there."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    return str(path.resolve()), int(st.st_size), int(st.st_mtime_ns)


def _member(fid, name: str, f32) -> tuple[int, int, int, int]:
    """(rank, rows, cols, in-place offset or -1) of one root member, through h5py."""
    from h5py import h5d

    from .h5features import is_external_link

    bname = name.encode("utf-8", "surrogateescape")
    if is_external_link(fid, bname):     # never followed into another file
        return NOT_A_DATASET, 0, 0, -1
    try:
        node = h5d.open(fid, bname)
    except (KeyError, ValueError, TypeError):
        return NOT_A_DATASET, 0, 0, -1
    shape = node.shape
    rank = len(shape)
    rows, cols = shape if rank == 2 else (1, shape[0]) if rank == 1 else (0, 0)
    if rows * cols == 0 or node.get_type() != f32:
        return rank, rows, cols, -1
    dcpl = node.get_create_plist()
    if dcpl.get_layout() != h5d.CONTIGUOUS or dcpl.get_nfilters() or dcpl.get_external_count():
        return rank, rows, cols, -1
    offset = node.get_offset()
    if offset is None or node.get_storage_size() != 4 * rows * cols:
        return rank, rows, cols, -1
    return rank, rows, cols, int(offset)


def build_index(path: str | os.PathLike) -> H5Index:
    """The index of `path`, asking HDF5 about each root member once (no cache involved).
    DataError (one line naming the file) when it is missing or not a readable HDF5 file."""
    from h5py import h5t

    from .h5features import open_h5

    path = Path(path)
    stamp = _stamp(path)
    with open_h5(path) as f:
        names = list(f)
        rows = [_member(f.id, name, h5t.IEEE_F32LE) for name in names]
    table = np.array(rows, dtype=np.int64).reshape(len(names), 4)
    return H5Index(*stamp, names, table[:, 0].astype(np.int8), np.ascontiguousarray(table[:, 1:3]),
                   np.ascontiguousarray(table[:, 3]))


def _to_arrays(index: H5Index) -> dict[str, np.ndarray]:
    """The index as plain arrays; names as one NUL-joined UTF-8 byte string (HDF5 link
    names hold no NUL), which loads far faster than an array of strings."""
    joined = "\0".join(index.names).encode("utf-8", "surrogateescape")
    return {"version": np.int64(VERSION), "path": np.str_(index.path), "size": np.int64(index.size),
            "mtime_ns": np.int64(index.mtime_ns), "names": np.frombuffer(joined, dtype=np.uint8),
            "rank": index.rank, "shape": index.shape, "offset": index.offset}


def _from_arrays(z) -> H5Index:
    text = z["names"].tobytes().decode("utf-8", "surrogateescape")
    names = text.split("\0") if text or len(z["rank"]) else []
    index = H5Index(str(z["path"]), int(z["size"]), int(z["mtime_ns"]), names,
                    z["rank"].astype(np.int8), z["shape"].astype(np.int64).reshape(-1, 2),
                    z["offset"].astype(np.int64))
    if not (len(names) == len(index.rank) == len(index.shape) == len(index.offset)):
        raise ValueError("arrays of different lengths")
    return index


def _read_cache(cache: Path, stamp: tuple[str, int, int]) -> tuple[H5Index | None, str]:
    """(the cached index, "") when `cache` was written for the file of `stamp`, else
    (None, why it is not used)."""
    if not cache.is_file():
        return None, "no cached index yet"
    try:
        loaded = np.load(cache, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return None, "the cached index is not an .npz"
        with loaded as z:
            if sorted(z.files) != sorted(_ARRAYS):
                return None, "the cached index has other fields"
            if int(z["version"]) != VERSION:
                return None, f"the cached index is version {int(z['version'])}, not {VERSION}"
            index = _from_arrays(z)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"the cached index cannot be read ({first})"
    cached = (index.path, index.size, index.mtime_ns)
    if cached != stamp:
        what = [k for k, a, b in zip(("path", "size", "mtime"), cached, stamp) if a != b]
        return None, f"the file's {'/'.join(what)} changed since it was indexed"
    return index, ""


def _write_cache(cache: Path, index: H5Index) -> None:
    """Write the index atomically (temp file, then rename); a folder that cannot be written
    leaves the index in memory only (one warning line)."""
    from ..atomic import atomic_path

    try:
        with atomic_path(cache, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **_to_arrays(index))
    except OSError as exc:
        log.warning("%s: cannot write its offset index %s (%s); keeping it in memory",
                    index.path, cache, exc.strerror or exc)


def load_index(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> H5Index:
    """The index of `path`: the one cached in `cache_dir` when it was built for this file as
    it is now (path, size, mtime), else a fresh one (logged in one line), then cached."""
    path = Path(path)
    if cache_dir is None:
        return build_index(path)
    cache = cache_file(path, cache_dir)
    index, why = _read_cache(cache, _stamp(path))
    if index is None:
        log.info("%s: building its offset index %s (%s)", path, cache, why)
        index = build_index(path)
        _write_cache(cache, index)
    return index
