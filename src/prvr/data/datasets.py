"""Corpus access, datasets, collate functions and loaders (the data side of the batch contract).

Processing of one video (n frames, float32 (n, Dv)), as docs/gmmformer_v2.md fixes it:

* clip stream: 32 bins with edges ``e = rint(linspace(0, n, 33))`` clamped to ``n - 1``;
  bin i is the mean of frames ``[e_i, e_{i+1})`` when ``e_i < e_{i+1}``, else frame ``e_i``;
  then each bin is L2-normalised as ``x / (||x|| + 1e-5)``. Rounding is half-to-even
  (numpy's ``rint``), which is what the release's torch/numpy ``round`` does. Note the clamp:
  the last frame of a video enters the last bin only when that bin is the single frame n-1.
* frame stream: the frames themselves when n <= 128, else 128 bins built the same way;
  each row L2-normalised.
* caption tokens: each token L2-normalised, then cut to the first 30.

Normalisation is applied AFTER binning (bins of raw frames are averaged, then normalised),
as the release's data provider does. Binning is vectorised (one ``index_add`` per video).

Batch order: a training batch keeps the sampler's order of videos, and each video's captions
in caption-file order. (The release's collate sorts a batch by frame count; that changes no
loss term except which random negatives are drawn, so we keep the simpler, sampler-given order.)
Evaluation batches keep split order (videos by first appearance, queries in file order).

Speed (what each of these buys against a frame-by-frame reader: benchmarks/README.md, "Data
epoch"):

* Batched fetch: DataLoader fetches a batch through ``Dataset.__getitems__``, which bins and
  normalises each video straight from the feature map (``FeatureStore.apply``, no copy of
  the raw frames) into its row of the padded batch tensors, and reads each caption's first
  30 tokens straight into its row of the padded query tensor. The items are views of those
  tensors, and collate hands the tensors on instead of copying the items again
  (``_Prebatched``; items changed after the fetch go through the copying path). The values
  are bit-for-bit those of the item-by-item path (``ds[i]`` then collate).
* Batch memory is recycled (``_BufferPool``): a fresh padded frame batch page-faults every
  one of its pages on first touch, which costs about as much as building the batch; a buffer
  is reused only once no tensor or array refers to it any more.
* Captions are read with one ``preadv`` each at their offset (``TextFeatures``), which comes
  from the query file's offset index (``h5index.load_index``: HDF5's own offsets, built once
  and cached under data/<dataset>/h5index/, so no HDF5 open per caption; HDF5's open and
  read for anything else).
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .features import FeatureStore, open_store
from .h5features import H5FeatureStore
from .h5index import index_dir, load_index
from .layout import (SPLITS, CollectionPaths, DataError, caption_key_alias, locate,
                     read_captions, split_video_ids)

N_CLIPS = 32
MAX_FRAMES = 128
MAX_QUERY_LEN = 30
EPS = 1e-5


# ------------------------------------------------------------------------------ processing

def bin_edges(n: int, n_bins: int) -> np.ndarray:
    """rint(linspace(0, n, n_bins + 1)) clamped to n - 1, int64."""
    if n < 1:
        raise ValueError("a video needs at least one frame")
    return np.minimum(np.rint(np.linspace(0, n, n_bins + 1)), n - 1).astype(np.int64)


@functools.lru_cache(maxsize=2048)
def _bin_plan(n: int, n_bins: int):
    """What binning n frames needs, computed once per (n, n_bins): (stop, bin of each frame
    in [0, stop), empty bins, the frame each empty bin takes, counts (n_bins, 1) float32).
    The tensors are shared between calls: only ever read."""
    e = bin_edges(n, n_bins)
    counts = e[1:] - e[:-1]                      # >= 0; bins tile [0, e_last) without overlap
    empty = np.flatnonzero(counts == 0)
    return (int(e[-1]), torch.from_numpy(np.repeat(np.arange(n_bins), counts)),
            torch.from_numpy(empty), torch.from_numpy(e[empty]),
            torch.from_numpy(np.maximum(counts, 1).astype(np.float32)[:, None]))


def _average_bins_t(x: torch.Tensor, n_bins: int, out: torch.Tensor | None = None) -> torch.Tensor:
    stop, bin_of, empty, single, counts = _bin_plan(len(x), n_bins)
    sums = torch.zeros(n_bins, x.shape[1], dtype=x.dtype) if out is None else out.zero_()
    sums.index_add_(0, bin_of, x[:stop])
    if len(empty):                               # an empty bin is the single frame e_i
        sums[empty] = x[single]
    return sums.div_(counts)


def average_bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    """(n, D) -> (n_bins, D): mean of [e_i, e_{i+1}) when non-empty, else frame e_i.

    Vectorised: every frame is added into its bin with one index_add (no loop over bins)."""
    return _average_bins_t(torch.as_tensor(np.asarray(x, dtype=np.float32)), n_bins).numpy()


def _normalize_t(t: torch.Tensor) -> torch.Tensor:
    return t / (torch.linalg.vector_norm(t, dim=-1, keepdim=True) + EPS)


def _normalize_t_(t: torch.Tensor) -> torch.Tensor:
    """In place (t must be this caller's own tensor)."""
    return t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).add_(EPS))


def _frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """A tensor over `frames` without a copy. A read-only view of the feature map is fine
    here: it is only ever read (torch warns about non-writable arrays; that is silenced for
    this call only)."""
    if frames.flags.writeable:
        return torch.from_numpy(frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(frames)


def _streams(frames: np.ndarray, n_clips: int, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(clip stream (n_clips, D), frame stream (min(n, max_frames), D)) of one video, read
    from `frames` (which may be a view of the feature map: never written, never kept)."""
    t = _frames_tensor(frames)
    clips = _normalize_t_(_average_bins_t(t, n_clips))
    rows = _normalize_t_(_average_bins_t(t, max_frames)) if len(t) > max_frames else _normalize_t(t)
    return clips.numpy(), rows.numpy()


def _streams_into(frames: np.ndarray, clip_out: torch.Tensor, frame_out: torch.Tensor,
                  n_clips: int, max_frames: int) -> None:
    """Like _streams, written into clip_out (n_clips, D) and frame_out (L, D): the frame
    stream in its first rows, zeros after them (the padding of a batch row)."""
    t = _frames_tensor(frames)
    _normalize_t_(_average_bins_t(t, n_clips, clip_out))
    if len(t) > max_frames:
        rows = _normalize_t_(_average_bins_t(t, max_frames, frame_out[:max_frames]))
    else:
        rows = torch.div(t, torch.linalg.vector_norm(t, dim=-1, keepdim=True).add_(EPS),
                         out=frame_out[:len(t)])
    frame_out[len(rows):].zero_()


def frame_stream(frames: np.ndarray, max_frames: int = MAX_FRAMES) -> np.ndarray:
    t = torch.as_tensor(np.asarray(frames, dtype=np.float32))
    if len(t) > max_frames:
        return _normalize_t_(_average_bins_t(t, max_frames)).numpy()
    return _normalize_t(t).numpy()


# ------------------------------------------------------------------------------ text features

@functools.lru_cache(maxsize=None)
def _h5():
    """h5py's low-level modules, imported on first use (once: a function-level import would
    be paid per call, i.e. per caption)."""
    import h5py
    from h5py import h5d, h5s, h5t

    return h5py, h5d, h5s, h5t


class TextFeatures:
    """Caption features in a query HDF5 file (one dataset per caption): token rows (tokens, D)
    as in roberta_<collection>_query_feat.hdf5, or one vector per caption, (D,) or (1, D), as
    in the CLIP files (read as one token). A caption id absent from the file is looked up under
    `caption_key_alias` too.

    The HDF5 file is opened lazily in each process (never pickled), so it works in workers.

    Fast path: a caption stored as an uncompressed, contiguous little-endian float32 (tokens, D)
    dataset is read with one `os.preadv` of just the tokens asked for, at its offset; the
    offsets of all such captions come from the file's offset index (h5index.load_index:
    HDF5's own offsets, cached in `index_dir`, loaded once per process), so a caption costs
    one system call and no HDF5 call. The first fast read of each process is checked
    against HDF5's own read; anything else (chunked, compressed, other dtypes) goes through
    HDF5's read, which converts to float32."""

    def __init__(self, path: str | os.PathLike, index_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.index_dir = index_dir
        self._h5 = None
        self._fd: int | None = None
        self._pid: int | None = None
        self._where: dict[str, tuple[int, int, int]] = {}   # cap_id -> (offset, tokens, D)
        self._plain: dict[str, tuple[int, int, int]] | None = None   # in place, from the index
        self._fast = True
        self._checked = False

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_fd"] = None
        state["_pid"] = None
        return state

    def _file(self):
        pid = os.getpid()
        if self._h5 is None or self._pid != pid:
            h5py = _h5()[0]
            try:
                self._h5 = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise DataError(f"{self.path}: not found") from None
            except OSError as exc:
                raise DataError(f"{self.path}: not a readable HDF5 file ({exc})") from None
            self._fd = os.open(self.path, os.O_RDONLY) if hasattr(os, "preadv") else None
            self._pid = pid
        return self._h5

    def _open(self, cap_id: str):
        ds = None
        for key in filter(None, (cap_id, caption_key_alias(cap_id))):
            try:
                ds = _h5()[1].open(self._file().id, key.encode("utf-8"))
                break
            except (KeyError, ValueError, TypeError):
                continue
        if ds is None:
            raise DataError(f"{self.path}: no features for caption '{cap_id}'")
        shape = ds.shape
        if len(shape) == 1:                      # one vector per caption: one token
            shape = (1, shape[0])
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise DataError(f"{self.path}: features of caption '{cap_id}' have shape {ds.shape}, "
                            "expected (tokens >= 1, D) or (D,)")
        if ds.dtype.kind != "f":
            raise DataError(f"{self.path}: features of caption '{cap_id}' are {ds.dtype}, "
                            "expected floats")
        return ds, shape

    def _read_h5(self, ds, shape, max_len: int | None) -> np.ndarray:
        h5s = _h5()[2]
        out = np.empty(ds.shape, dtype=np.float32)  # HDF5 converts other float types on read
        ds.read(h5s.ALL, h5s.ALL, out)           # low-level read: a third of the high-level cost
        out = out.reshape(shape)
        return out if max_len is None else out[:max_len]

    def _locate(self, cap_id: str) -> tuple[int, int, int] | np.ndarray:
        """(offset, tokens, D) of a caption readable in place, else its features (HDF5 read)."""
        where = self._where.get(cap_id)
        if where is not None:
            return where
        where = self._in_place(cap_id) if self._fast and self._fd is not None else None
        if where is None:
            return self._read_h5(*self._open(cap_id), None)
        if not self._checked:   # trust the offsets only once one reads what HDF5 reads
            self._checked = True
            ds, shape = self._open(cap_id)
            mine = np.empty(shape, dtype=np.float32)
            if (os.preadv(self._fd, [mine], where[0]) != mine.nbytes
                    or not np.array_equal(mine, self._read_h5(ds, shape, None), equal_nan=True)):
                self._fast = False
                return self._read_h5(ds, shape, None)
        self._where[cap_id] = where
        return where

    def _in_place(self, cap_id: str) -> tuple[int, int, int] | None:
        """(offset, tokens, D) of a caption readable in place, from the file's offset index
        (loaded once per process: no HDF5 open per caption), None for any other caption."""
        if self._plain is None:
            index = load_index(self.path, self.index_dir)
            plain = index.in_place((1, 2))
            names = np.array(index.names, dtype=object)[plain].tolist()
            self._plain = dict(zip(names, zip(index.offset[plain].tolist(),
                                              *index.shape[plain].T.tolist())))
        for key in filter(None, (cap_id, caption_key_alias(cap_id))):
            found = self._plain.get(key)
            if found is not None:
                return found
        return None

    def get(self, cap_id: str, max_len: int | None = None) -> np.ndarray:
        """(tokens, D) float32 features of one caption (its first max_len tokens if given)."""
        return self.get_many([cap_id], max_len)[0]

    def locate_many(self, cap_ids: Sequence[str], max_len: int | None = None
                    ) -> tuple[list, list[int]]:
        """Where each caption's features are (for read_into), and how many tokens of each
        will be read (at most max_len)."""
        if not cap_ids:
            raise ValueError("at least one caption id is needed")
        self._file()
        found = [self._locate(c) for c in cap_ids]
        lengths = [(len(f) if isinstance(f, np.ndarray) else f[1]) for f in found]
        if max_len is not None:
            lengths = [min(n, max_len) for n in lengths]
        return found, lengths

    def dim_of(self, found: list) -> int:
        dims = {(f.shape[1] if isinstance(f, np.ndarray) else f[2]) for f in found}
        if len(dims) > 1:
            raise DataError(f"{self.path}: captions have token features of different sizes "
                            f"{sorted(dims)}")
        return dims.pop()

    def read_into(self, cap_ids: Sequence[str], found: list, lengths: Sequence[int],
                  out: np.ndarray) -> None:
        """Caption r's first lengths[r] tokens into out[r, :lengths[r]], zeros after them."""
        for r, (cap_id, f, n) in enumerate(zip(cap_ids, found, lengths)):
            if isinstance(f, np.ndarray):
                out[r, :n] = f[:n]
            else:
                dest = out[r, :n]
                if os.preadv(self._fd, [dest], f[0]) != dest.nbytes:
                    raise DataError(f"{self.path}: features of caption '{cap_id}' run past "
                                    "the end of the file (truncated?)")
            out[r, n:] = 0

    def get_many(self, cap_ids: Sequence[str], max_len: int | None = None
                 ) -> tuple[np.ndarray, list[int]]:
        """The captions' features (first max_len tokens of each) stacked in one (T, D) float32
        array, and the number of tokens of each."""
        found, lengths = self.locate_many(cap_ids, max_len)
        out = np.empty((sum(lengths), self.dim_of(found)), dtype=np.float32)
        row = 0
        for cap_id, f, n in zip(cap_ids, found, lengths):
            self.read_into([cap_id], [f], [n], out[None, row:row + n])
            row += n
        return out, lengths

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
            if self._fd is not None:
                os.close(self._fd)
        self._h5 = None
        self._fd = None
        self._pid = None


# ------------------------------------------------------------------------------ corpus

@dataclass(frozen=True)
class SplitData:
    name: str
    caption_file: Path
    query_ids: list[str]               # caption ids, file order
    query_video_ids: list[str]         # video of each caption
    texts: list[str]
    video_ids: list[str]               # distinct, order of first appearance
    video_queries: dict[str, list[int]]  # video -> indices into query_ids


class Corpus:
    """One MS-SL collection folder with one visual feature.

    `Corpus(collection_dir, feature)`; the collection name defaults to the folder's name.
    With feature_format='hdf5', `feature` is a per-video HDF5 file of FeatureData/ (read by
    H5FeatureStore) and the queries default to the CLIP file (see layout.CollectionPaths).
    `Corpus.from_settings(settings)` finds it via `prvr.data.layout.locate` (source.json of
    the fetch stage, else the default place) and caches the HDF5 files' offset indexes in
    data/<dataset>/h5index (`index_dir`; None: built in memory, see h5index)."""

    def __init__(self, collection_dir: str | os.PathLike, feature: str,
                 collection: str | None = None, feature_format: str = "bigfile",
                 query_feature: str | None = None, index_dir: str | os.PathLike | None = None):
        collection_dir = Path(collection_dir)
        self.paths = CollectionPaths(collection_dir, collection or collection_dir.name, feature,
                                     feature_format, query_feature)
        self.index_dir = index_dir
        self.text = TextFeatures(self.paths.query_feat_file, index_dir)
        self._features: FeatureStore | H5FeatureStore | None = None
        self._splits: dict[str, SplitData] = {}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], data_dir: str | os.PathLike = "data") -> "Corpus":
        paths = locate(settings, data_dir=data_dir)
        return cls(paths.collection_dir, paths.feature, paths.collection, paths.feature_format,
                   paths.query_feature, index_dir(settings, data_dir))

    def __repr__(self) -> str:
        return f"Corpus({str(self.paths.collection_dir)!r}, {self.paths.feature!r})"

    @property
    def collection_dir(self) -> Path:
        return self.paths.collection_dir

    @property
    def collection(self) -> str:
        return self.paths.collection

    @property
    def feature(self) -> str:
        return self.paths.feature

    @property
    def features(self) -> FeatureStore | H5FeatureStore:
        if self._features is None:
            self._features = open_store(self.paths, self.index_dir)
        return self._features

    @property
    def visual_dim(self) -> int:
        return self.features.dim

    def add_split(self, data: SplitData) -> None:
        """Register a split derived from the collection's own (the seeded holdout, a dense
        ground-truth split) under `data.name`; datasets and loaders then take that name."""
        if data.name in SPLITS:
            raise ValueError(f"'{data.name}' is a split of the collection; name a derived split otherwise")
        self._splits[data.name] = data

    def split(self, name: str) -> SplitData:
        if name in self._splits:
            return self._splits[name]
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}' (expected one of {', '.join(SPLITS)})")
        if name not in self._splits:
            path = self.paths.caption_file(name)
            caps = read_captions(path)
            if not caps:
                raise DataError(f"{path}: no captions")
            seen: set[str] = set()
            for cap_id, _, _ in caps:
                if cap_id in seen:
                    raise DataError(f"{path}: caption id '{cap_id}' appears twice")
                seen.add(cap_id)
            video_ids = split_video_ids(caps)
            video_queries: dict[str, list[int]] = {v: [] for v in video_ids}
            for i, (_, vid, _) in enumerate(caps):
                video_queries[vid].append(i)
            self._splits[name] = SplitData(
                name=name, caption_file=path,
                query_ids=[c for c, _, _ in caps], query_video_ids=[v for _, v, _ in caps],
                texts=[t for _, _, t in caps], video_ids=video_ids, video_queries=video_queries)
        return self._splits[name]

    def check_videos(self, split: str) -> None:
        """Every video of the split has usable frames in the feature store, else DataError."""
        data = self.split(split)
        store = self.features
        missing = [v for v in data.video_ids if v not in store]
        if missing:
            raise DataError(f"{data.caption_file}: {len(missing)} videos have no frames in "
                            f"{store.index_file} (first: '{missing[0]}')")
        problem = getattr(store, "problem", None)
        bad = [v for v in data.video_ids if problem(v)] if problem else []
        if bad:
            raise DataError(f"{store.index_file}: video '{bad[0]}' {problem(bad[0])}"
                            + (f" (and {len(bad) - 1} more videos of split '{split}')"
                               if len(bad) > 1 else ""))


# ------------------------------------------------------------------------------ datasets

class _SplitDataset(Dataset):
    def __init__(self, corpus: Corpus, split: str, n_clips: int = N_CLIPS,
                 max_frames: int = MAX_FRAMES, max_query_len: int = MAX_QUERY_LEN):
        self.corpus = corpus
        self.split = corpus.split(split)
        self.n_clips = n_clips
        self.max_frames = max_frames
        self.max_query_len = max_query_len

    def _video(self, vid: str) -> dict[str, Any]:
        store = self.corpus.features
        fn = functools.partial(_streams, n_clips=self.n_clips, max_frames=self.max_frames)
        if hasattr(store, "apply"):
            clips, frames = store.apply(vid, fn)   # straight from the feature map
        else:                                      # any reader with get(video_id)
            clips, frames = fn(np.asarray(store.get(vid), dtype=np.float32))
        return {"video_id": vid, "clip_feats": clips, "frame_feats": frames}


    def _videos_batched(self, vids: Sequence[str]) -> "_Prebatched":
        """Items of these videos whose clip_feats / frame_feats are views of one padded batch
        (B, n_clips, D) / (B, Lf, D) that collate then hands on without copying: each video
        is binned and normalised straight from the feature map into its batch row."""
        store = self.corpus.features
        n = [min(store.num_frames(v), self.max_frames) for v in vids]
        d = store.dim
        clips = torch.from_numpy(_POOL.take("clips", (len(vids), self.n_clips, d)))
        frames = torch.from_numpy(_POOL.take("frames", (len(vids), max(n), d)))
        for i, vid in enumerate(vids):
            store.apply(vid, functools.partial(_streams_into, clip_out=clips[i], frame_out=frames[i],
                                               n_clips=self.n_clips, max_frames=self.max_frames))
        cn, fn = clips.numpy(), frames.numpy()
        items = _Prebatched({"video_id": v, "clip_feats": cn[i], "frame_feats": fn[i, :k]}
                            for i, (v, k) in enumerate(zip(vids, n)))
        items.tensors = {"clip_feats": clips, "frame_feats": frames,
                         "frame_mask": torch.arange(frames.shape[1])[None, :]
                         < torch.tensor(n)[:, None]}
        return items

    def _batchable(self) -> bool:
        store = self.corpus.features
        return hasattr(store, "apply") and hasattr(store, "num_frames") and hasattr(store, "dim")


class TrainVideoDataset(_SplitDataset):
    """Items are videos with ALL their captions (the release's training unit)."""

    def __init__(self, corpus: Corpus, split: str = "train", **kw):
        super().__init__(corpus, split, **kw)
        corpus.check_videos(split)

    def __len__(self) -> int:
        return len(self.split.video_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        vid = self.split.video_ids[index]
        item = self._video(vid)
        qidx = self.split.video_queries[vid]
        item["query_ids"] = [self.split.query_ids[i] for i in qidx]
        # All captions of the video in one array, normalised in one op (tokens one by one).
        raw, lengths = self.corpus.text.get_many(item["query_ids"], self.max_query_len)
        normed = _normalize_t_(torch.from_numpy(raw)).numpy()
        bounds = np.cumsum([0] + lengths).tolist()
        item["query_feats"] = [normed[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items at once (DataLoader calls this for a batch): the same items as
        [self[i] for i in indices], built straight into padded batch tensors that
        collate_train takes over as they are (see _Prebatched)."""
        if not self._batchable():
            return [self[i] for i in indices]
        vids = [self.split.video_ids[i] for i in indices]
        items = self._videos_batched(vids)
        qids = [[self.split.query_ids[i] for i in self.split.video_queries[v]] for v in vids]
        flat = [q for qs in qids for q in qs]
        found, lengths = self.corpus.text.locate_many(flat, self.max_query_len)
        queries = torch.from_numpy(_POOL.take(
            "queries", (len(flat), max(lengths), self.corpus.text.dim_of(found))))
        qn = queries.numpy()
        self.corpus.text.read_into(flat, found, lengths, qn)
        row = 0
        for item, qs in zip(items, qids):
            # the video's caption rows up to its longest caption, in one op (padding zeros
            # stay zeros: 0 / (0 + eps))
            _normalize_t_(queries[row:row + len(qs), :max(lengths[row:row + len(qs)])])
            item["query_ids"] = qs
            item["query_feats"] = [qn[r, :lengths[r]] for r in range(row, row + len(qs))]
            row += len(qs)
        items.tensors["query_feats"] = queries
        items.tensors["query_mask"] = (torch.arange(queries.shape[1])[None, :]
                                       < torch.tensor(lengths)[:, None])
        items.seal()
        return items


class VideoDataset(_SplitDataset):
    """The split's videos (distinct, in order of first appearance in its caption file)."""

    def __init__(self, corpus: Corpus, split: str, **kw):
        super().__init__(corpus, split, **kw)
        corpus.check_videos(split)

    def __len__(self) -> int:
        return len(self.split.video_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._video(self.split.video_ids[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """[self[i] for i in indices], built straight into padded batch tensors (_Prebatched)."""
        if not self._batchable():
            return [self[i] for i in indices]
        return self._videos_batched([self.split.video_ids[i] for i in indices])


class QueryDataset(_SplitDataset):
    """The split's captions, in file order."""

    def __len__(self) -> int:
        return len(self.split.query_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        q = self.split.query_ids[index]
        return {"query_id": q, "video_id": self.split.query_video_ids[index],
                "query_feats": _normalize_t_(torch.from_numpy(
                    self.corpus.text.get(q, self.max_query_len))).numpy()}


# ------------------------------------------------------------------------------ collate

class _Lease:
    """One use of a pooled buffer, exposed to numpy through the array interface. Every array
    or tensor made from it keeps it alive (np.asarray's result has it as base; views and
    torch.from_numpy keep that array alive), so it dies exactly when the last of them does,
    and its finalizer then hands the buffer back to the pool."""

    def __init__(self, store: torch.Tensor, shape: tuple[int, ...]):
        self.store = store
        self.__array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "version": 3,
                                    "data": (store.data_ptr(), False)}


class _BufferPool:
    """Recycles the memory of the large padded batch tensors.

    A fresh large batch tensor page-faults every one of its pages (the kernel maps and zeroes
    each), about as much CPU as the rest of the batch. Batches are instead built in buffers
    that earlier batches no longer use: `take` leases a buffer (see _Lease) and it returns to
    the pool only when nothing refers to that use any more, so a buffer is never reused
    while any part of an earlier batch is alive. At most `keep` idle buffers per kind are
    retained; `clear()` lets them go. Buffers come from torch's allocator, not numpy's: numpy
    asks for transparent huge pages on large arrays, whose first faults can stall for a long
    time (benchmarks/README.md, "Data epoch")."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._idle: dict[str, list[torch.Tensor]] = {}
        self._pid = os.getpid()

    def take(self, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of `shape` with undefined contents."""
        if self._pid != os.getpid():     # a forked worker starts its own pool
            self._idle, self._pid = {}, os.getpid()
        need = int(np.prod(shape))
        idle = self._idle.setdefault(kind, [])
        fits = [i for i, t in enumerate(idle) if t.numel() >= need]
        if fits:
            store = idle.pop(min(fits, key=lambda i: idle[i].numel()))
        else:
            if idle:                     # outgrown: replace the largest idle buffer
                idle.pop(max(range(len(idle)), key=lambda i: idle[i].numel()))
            # A quarter to spare, as batches vary (captions per video, longest caption): the
            # spare pages cost nothing until a bigger batch first writes them.
            store = torch.empty(max(need + need // 4, 1), dtype=torch.float32)
        lease = _Lease(store, shape)
        weakref.finalize(lease, self._give_back, kind, store, self._pid)
        return np.asarray(lease)

    def _give_back(self, kind: str, store: torch.Tensor, pid: int) -> None:
        idle = self._idle.get(kind)
        if pid == self._pid and idle is not None and len(idle) < self.keep:
            idle.append(store)

    def clear(self) -> None:
        self._idle = {}


_POOL = _BufferPool()


def _pad(seqs: Sequence[np.ndarray], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (L_i, D) arrays to (N, max L, D) float32 with a bool mask (True = real)."""
    lens = [len(s) for s in seqs]
    longest = max(lens)
    out = _POOL.take(kind, (len(seqs), longest, seqs[0].shape[-1]))
    # one write per element (real rows copied, padding zeroed)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        out[i, :n] = s
        out[i, n:] = 0
    lengths = torch.tensor(lens)
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    return torch.from_numpy(out), mask


class _Prebatched(list):
    """The items of one batch as a Dataset's __getitems__ built them: their arrays are views
    of padded batch tensors (`tensors`), which collate hands on as the batch instead of
    copying the items again. Collate checks that the items are still those arrays (same
    objects, same order); anything else goes through the copying path."""

    tensors: dict[str, torch.Tensor]

    def __init__(self, items=()):
        super().__init__(items)
        self._made = [self._arrays(it) for it in self]

    @staticmethod
    def _arrays(it: dict[str, Any]) -> tuple:
        return (it.get("clip_feats"), it.get("frame_feats"), *it.get("query_feats", ()))

    def seal(self) -> None:
        self._made = [self._arrays(it) for it in self]

    def intact(self, keys: Sequence[str]) -> bool:
        return (all(k in self.tensors for k in keys) and len(self) == len(self._made)
                and all(len(a := self._arrays(it)) == len(b) and all(x is y for x, y in zip(a, b))
                        for it, b in zip(self, self._made)))


def _prebatched(items, keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
    if type(items) is _Prebatched and items.intact(keys):
        return {k: items.tensors[k] for k in keys}
    return None


_VIDEO_KEYS = ("clip_feats", "frame_feats", "frame_mask")
_QUERY_KEYS = ("query_feats", "query_mask")


def _collate_video_part(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ready = _prebatched(items, _VIDEO_KEYS)
    if ready is not None:
        return {**ready, "video_ids": [it["video_id"] for it in items]}
    first = items[0]["clip_feats"]
    clips = _POOL.take("clips", (len(items),) + first.shape)
    for i, it in enumerate(items):
        clips[i] = it["clip_feats"]
    frames, frame_mask = _pad([it["frame_feats"] for it in items], "frames")
    return {"clip_feats": torch.from_numpy(clips), "frame_feats": frames, "frame_mask": frame_mask,
            "video_ids": [it["video_id"] for it in items]}


def collate_train(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = _collate_video_part(items)
    ready = _prebatched(items, _QUERY_KEYS)
    if ready is not None:
        batch.update(ready)
    else:
        feats = [q for it in items for q in it["query_feats"]]
        batch["query_feats"], batch["query_mask"] = _pad(feats, "queries")
    batch["query_labels"] = torch.tensor(
        [b for b, it in enumerate(items) for _ in it["query_feats"]], dtype=torch.int64)
    batch["query_ids"] = [q for it in items for q in it["query_ids"]]
    return batch


def collate_videos(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return _collate_video_part(items)


def collate_queries(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    feats, mask = _pad([it["query_feats"] for it in items], "queries")
    return {"query_feats": feats, "query_mask": mask,
            "query_ids": [it["query_id"] for it in items],
            "query_video_ids": [it["video_id"] for it in items]}


# ------------------------------------------------------------------------------ loaders

def _stream_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw[k] for k in ("n_clips", "max_frames", "max_query_len") if k in kw}


def make_train_loader(corpus: Corpus, batch_size: int, num_workers: int = 0, seed: int = 0,
                      sampler: Sampler | None = None, split: str = "train",
                      pin_memory: bool = False, **stream_kw) -> DataLoader:
    """Shuffled (torch.Generator seeded with `seed`; same order for the same seed) unless a
    `sampler` (e.g. a DistributedSampler) is given, which then decides the order."""
    dataset = TrainVideoDataset(corpus, split, **_stream_kw(stream_kw))
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_train, generator=generator,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, drop_last=False)


def make_eval_loaders(corpus: Corpus, split: str, video_batch_size: int, query_batch_size: int,
                      num_workers: int = 0, pin_memory: bool = False,
                      **stream_kw) -> tuple[DataLoader, DataLoader]:
    """(video_loader, query_loader) over a split, in split order. With workers, the batches
    are those of num_workers=0 (each worker opens its own map / HDF5 handles and batch-buffer
    pool) and the workers stay up between passes (the training validates every epoch)."""
    kw = _stream_kw(stream_kw)
    common = dict(shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    videos = DataLoader(VideoDataset(corpus, split, **kw), batch_size=video_batch_size,
                        collate_fn=collate_videos, **common)
    queries = DataLoader(QueryDataset(corpus, split, **kw), batch_size=query_batch_size,
                         collate_fn=collate_queries, **common)
    return videos, queries
