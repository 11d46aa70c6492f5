"""An index over a collection and two-stage search on it (docs/search.md).

Build: a checkpoint's network encodes split S of a dataset, block by block. The index folder
holds
    manifest.json       checkpoint path and sha256, method, model config, dataset, split,
                        build parameters, counts, sizes, build time
    video_ids.txt       one id per line, the row order of every array
    n_frames.npy        (V,) int64: each video's own feature rows (for the moment)
    stage1.npy          (N, D) float16: the method's index vectors (index_vectors), unit norm
    stage1_video.npy    (N,) int32: the video of each vector
    exact_<key>.npy     (V, ...) float32: the encoding's fixed tensors
    exact_seq.npy, exact_offsets.npy   float32 (rows, H) / int64 (V + 1,): its sequence, packed
    stage1.faiss        the faiss index over stage1.npy (flat, HNSW or IVF-PQ)
written in a temporary folder next to the target and renamed into place.

Search: stage 1 asks faiss for the top vectors of `index_queries(q)`, keeps the best
`candidates` distinct videos per query; stage 2 scores those videos exactly with the method's
own `score` on the fp32 encodings (the same function evaluation uses), and `localize` gives
each hit's moment. Everything the search asks of a method is the contract's search part
(prvr.methods.base: index_vectors, index_queries, localize).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

FORMAT = "prvr-index"
VERSION = 1


class SearchError(RuntimeError):
    """A search or index problem; the one-line message names the file and what is wrong."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ stage 1

def choose_kind(n_vectors: int, kind: str = "auto") -> str:
    """flat up to 200k vectors (exact, fp32 in RAM), IVF-PQ beyond (compressed codes, the
    shortlist re-scored on 8-bit codes)."""
    if kind != "auto":
        if kind not in ("flat", "hnsw", "ivfpq"):
            raise SearchError(f"search.stage1.kind '{kind}': expected auto, flat, hnsw or ivfpq")
        return kind
    return "flat" if n_vectors <= 200_000 else "ivfpq"


def build_faiss(vectors: np.ndarray, kind: str, seed: int = 0):
    """A faiss inner-product index over float32 unit vectors (N, D)."""
    import faiss

    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        nlist = int(max(16, min(4 * np.sqrt(n), n // 39)))
        m = next(m for m in (48, 32, 24, 16, 12, 8, 4, 2, 1) if d % m == 0 and m <= d)
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        # the PQ shortlist is re-scored on 8-bit scalar-quantised vectors (1 byte a dimension)
        index = faiss.IndexRefine(ivf, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit,
                                                                  faiss.METRIC_INNER_PRODUCT))
        rng = np.random.default_rng(seed)
        train = vectors[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    for lo in range(0, n, 1 << 18):
        index.add(np.ascontiguousarray(vectors[lo:lo + (1 << 18)], dtype=np.float32))
    return index


def set_search_params(index, kind: str, params: Mapping[str, Any]) -> None:
    if kind == "ivfpq":
        import faiss

        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 32))
        index.k_factor = 4.0
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params.get("ef_search", 128))


def candidate_videos(scores: np.ndarray, ids: np.ndarray, vec_video: np.ndarray, n: int) -> np.ndarray:
    """(Nq, n) int64: per query the first n distinct videos of its ranked vectors (-1 past the
    end), from faiss' (Nq, k) scores and vector ids (-1 = none)."""
    nq, k = ids.shape
    video = np.where(ids >= 0, vec_video[np.clip(ids, 0, None)], -1).astype(np.int64)   # (Nq, k)
    # a video's first (best) occurrence in each row; later ones are dropped
    order = np.argsort(video, axis=1, kind="stable")
    sorted_v = np.take_along_axis(video, order, 1)
    first = np.ones_like(sorted_v, dtype=bool)
    first[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    keep = np.zeros_like(first)
    np.put_along_axis(keep, order, first, 1)
    keep &= video >= 0
    rank = np.where(keep, np.arange(k)[None, :], k)            # kept positions, in rank order
    pos = np.sort(rank, axis=1)[:, :n]
    if pos.shape[1] < n:
        pos = np.pad(pos, ((0, 0), (0, n - pos.shape[1])), constant_values=k)
    out = np.full((nq, n), -1, dtype=np.int64)
    valid = pos < k
    out[valid] = video[np.nonzero(valid)[0], pos[valid]]
    return out


# ------------------------------------------------------------------------------ the index

def build_index(checkpoint: str | os.PathLike, params: Mapping[str, Any], dataset: str, split: str,
                out_dir: str | os.PathLike, *, method: str | None = None, data_dir: str | os.PathLike = "data",
                progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Encode split `split` of `dataset` with the checkpoint's network and write the index folder
    `out_dir` (atomically). Returns the manifest."""
    from ..checkpoint import load_model
    from ..data.datasets import Corpus
    from ..methods.base import missing_search_parts
    from ..training import eval_loaders

    t0 = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    from ..config import search_settings

    search = search_settings(params)
    stage1 = search["stage1"]
    model, info = load_model(checkpoint, device, method=method)[:2]
    lacking = missing_search_parts(model)
    if lacking:
        raise SearchError(f"{checkpoint}: method {info['method']} has no search contract ({', '.join(lacking)})")
    from ..config import resolve

    settings = resolve(dict(params), dataset, info["method"])
    corpus = Corpus.from_settings(settings, data_dir)
    block = int(search["block_videos"])
    vloader, _ = eval_loaders(corpus, split, block, 64, 0, info["model_config"])
    video_ids: list[str] = []
    vecs, vec_video, fixed, seqs, lengths = [], [], {}, [], []
    model.eval()
    with torch.no_grad():
        for batch in tqdm(vloader, desc="index videos", unit="block", disable=not progress, dynamic_ncols=True):
            enc = model.encode_videos({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
            v, m = model.index_vectors(enc)
            base = len(video_ids)
            rows, cols = torch.nonzero(m, as_tuple=True)
            vecs.append(v[rows, cols].cpu().numpy().astype(np.float16))
            vec_video.append((rows.cpu().numpy() + base).astype(np.int32))
            for k, t in enc.fixed.items():
                fixed.setdefault(k, []).append(t.float().cpu().numpy())
            if enc.seq is not None:
                mask = enc.seq_mask.bool()
                seqs.append(enc.seq[mask].float().cpu().numpy())
                lengths.append(mask.sum(1).cpu().numpy())
            video_ids.extend(batch["video_ids"])
    if not video_ids:
        raise SearchError(f"split {split} of {dataset} has no videos")
    n_frames = np.array([corpus.features.num_frames(v) for v in video_ids], dtype=np.int64)
    seq = (np.concatenate(seqs), np.concatenate(lengths)) if seqs else None
    manifest = {
        "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(checkpoint),
        "method": info["method"], "model_config": info["model_config"],
        "dataset": dataset, "split": split, "data_dir": str(Path(data_dir).resolve()), "settings": settings,
        "facts": dict(search["datasets"].get(dataset) or {}),
    }
    manifest = write_index_folder(out_dir, video_ids, n_frames, np.concatenate(vecs), np.concatenate(vec_video),
                                  {k: np.concatenate(v) for k, v in fixed.items()}, seq, stage1, manifest)
    manifest["build_s"] = time.perf_counter() - t0
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info("indexed %d videos (%d vectors, %s) of %s/%s into %s: %.1f MB, %.1f s", len(video_ids),
             manifest["n_vectors"], manifest["stage1"]["kind"], dataset, split, out_dir,
             manifest["bytes"] / 2 ** 20, manifest["build_s"])
    return manifest


def write_index_folder(out_dir: str | os.PathLike, video_ids: Sequence[str], n_frames: np.ndarray,
                       stage1_vectors: np.ndarray, vec_video: np.ndarray, fixed: Mapping[str, np.ndarray],
                       seq: tuple[np.ndarray, np.ndarray] | None, stage1: Mapping[str, Any],
                       manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write an index folder atomically from encoded arrays: stage-1 vectors (N, D) (stored
    float16) with the video of each, the exact fixed tensors (V, ...) and the sequence (packed
    rows, rows per video), the faiss index; `manifest` is completed and written. Returns it."""
    import faiss

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    kind = choose_kind(len(stage1_vectors), str(stage1.get("kind", "auto")))
    index = build_faiss(stage1_vectors, kind)
    faiss_s = time.perf_counter() - t0
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        np.save(tmp / "stage1.npy", np.asarray(stage1_vectors, dtype=np.float16))
        np.save(tmp / "stage1_video.npy", np.asarray(vec_video, dtype=np.int32))
        np.save(tmp / "n_frames.npy", np.asarray(n_frames, dtype=np.int64))
        for k, a in fixed.items():
            np.save(tmp / f"exact_{k}.npy", np.asarray(a, dtype=np.float32))
        if seq is not None:
            rows, lengths = seq
            np.save(tmp / "exact_seq.npy", np.asarray(rows, dtype=np.float32))
            np.save(tmp / "exact_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        (tmp / "video_ids.txt").write_text("\n".join(video_ids) + "\n", encoding="utf-8")
        faiss.write_index(index, str(tmp / "stage1.faiss"))
        nbytes = sum(f.stat().st_size for f in tmp.iterdir())
        out = {"format": FORMAT, "version": VERSION, **manifest,
               "n_videos": len(video_ids), "n_vectors": int(len(stage1_vectors)),
               "vector_dim": int(stage1_vectors.shape[1]), "fixed": sorted(fixed), "has_seq": seq is not None,
               "stage1": {"kind": kind, "dtype": "float16", "candidates": int(stage1.get("candidates", 100)),
                          "nprobe": int(stage1.get("nprobe", 32)), "ef_search": int(stage1.get("ef_search", 128))},
               "bytes": int(nbytes), "bytes_per_video": nbytes / len(video_ids),
               "faiss_build_s": faiss_s, "build_s": time.perf_counter() - t0}
        (tmp / "manifest.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _columns(videos, cols: torch.Tensor):
    """The videos `cols` of a VideoEncoding block."""
    from ..methods import VideoEncoding

    fixed = {k: v.index_select(0, cols) for k, v in videos.fixed.items()}
    if videos.seq is None:
        return VideoEncoding(fixed)
    return VideoEncoding(fixed, videos.seq.index_select(0, cols), videos.seq_mask.index_select(0, cols))


def _load(path: Path, lead: tuple[int, ...], mmap: bool = False) -> np.ndarray:
    """An index array, checked: readable, its leading dimensions `lead` (the manifest's counts);
    a truncated or corrupt file is a SearchError naming it."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise SearchError(f"{path}: missing from the index (rebuild it)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise SearchError(f"{path}: truncated or corrupt ({str(exc).splitlines()[0][:200]})") from None
    if tuple(a.shape[:len(lead)]) != tuple(int(n) for n in lead):
        raise SearchError(f"{path}: shape {tuple(a.shape)}, the manifest's counts need leading {tuple(lead)}")
    return a


_MANIFEST_KEYS = ("checkpoint", "checkpoint_sha256", "method", "model_config", "dataset", "split", "settings",
                  "data_dir", "n_videos", "n_vectors", "fixed", "has_seq", "stage1")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"{path}: no index here (build one with stages/index.py)") from None
    except (OSError, ValueError) as exc:
        raise SearchError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchError(f"{path}: not a prvr index manifest")
    if manifest.get("version") != VERSION:
        raise SearchError(f"{path}: index version {manifest.get('version')}, this code reads {VERSION}; rebuild it")
    lacking = [k for k in _MANIFEST_KEYS if k not in manifest]
    if lacking:
        raise SearchError(f"{path}: incomplete manifest (no {', '.join(lacking)})")
    return manifest


class SearchIndex:
    """An opened index: the model of its checkpoint, the memory-mapped arrays, faiss."""

    def __init__(self, folder: Path, manifest: dict, model, corpus, device: str):
        import faiss

        self.folder, self.manifest, self.model, self.corpus = folder, manifest, model, corpus
        self.device = torch.device(device)
        V = int(manifest["n_videos"])
        try:
            self.video_ids = (folder / "video_ids.txt").read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as exc:
            raise SearchError(f"{folder / 'video_ids.txt'}: unreadable ({exc})") from None
        if len(self.video_ids) != V:
            raise SearchError(f"{folder / 'video_ids.txt'}: {len(self.video_ids)} ids, manifest says {V}")
        self.n_frames = _load(folder / "n_frames.npy", (V,))
        self.vec_video = _load(folder / "stage1_video.npy", (manifest["n_vectors"],))
        if self.vec_video.size and (self.vec_video.min() < 0 or self.vec_video.max() >= V):
            raise SearchError(f"{folder / 'stage1_video.npy'}: video rows outside [0, {V})")
        self.fixed = {k: _load(folder / f"exact_{k}.npy", (V,), mmap=True) for k in manifest["fixed"]}
        self.seq = self.offsets = None
        if manifest["has_seq"]:
            self.offsets = _load(folder / "exact_offsets.npy", (V + 1,))
            self.seq = _load(folder / "exact_seq.npy", (int(self.offsets[-1]),), mmap=True)
            if self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any():
                raise SearchError(f"{folder / 'exact_offsets.npy'}: offsets not increasing from 0")
        path = folder / "stage1.faiss"
        try:
            self.faiss = faiss.read_index(str(path))
        except RuntimeError as exc:   # faiss reports a truncated or foreign file as RuntimeError
            raise SearchError(f"{path}: unreadable faiss index ({str(exc).splitlines()[0][:200]})") from None
        if self.faiss.ntotal != manifest["n_vectors"]:
            raise SearchError(f"{path}: {self.faiss.ntotal} vectors, manifest says {manifest['n_vectors']}")
        set_search_params(self.faiss, manifest["stage1"]["kind"], manifest["stage1"])
        self.candidates = int(manifest["stage1"]["candidates"])
        stride = (manifest.get("facts") or {}).get("feature_stride_s")
        self.stride = float(stride) if stride else None

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {k: m[k] for k in ("method", "dataset", "split", "n_videos", "n_vectors", "checkpoint",
                                  "checkpoint_sha256", "bytes_per_video", "build_s")} | {
            "stage1": m["stage1"], "index": str(self.folder), "seconds_known": self.stride is not None}

    # ---------------------------------------------------------------- queries
    def query_features(self, ids: Sequence[str]) -> dict[str, Any]:
        """A query batch of the stored features of these caption ids (the manifest's dataset)."""
        from ..data.datasets import _normalize_t_, collate_queries
        from ..data.layout import DataError

        L = int(self.manifest["model_config"].get("max_query_len", 30))
        items = []
        for q in ids:
            try:
                feats = self.corpus.text.get(q, L)
            except (KeyError, DataError):
                raise SearchError(f"query id {q!r}: not in the text features of {self.manifest['dataset']} "
                                  f"({self.corpus.collection_dir})") from None
            items.append({"query_id": q, "video_id": q.split("#", 1)[0],
                          "query_feats": _normalize_t_(torch.from_numpy(np.asarray(feats))).numpy()})
        if not items:
            raise SearchError("no query ids given")
        return collate_queries(items)

    def encoder_spec(self):
        """The text encoder this index's dataset needs (search.datasets.<ds>.encoder, recorded at build)."""
        from ..text import encoder_spec

        return encoder_spec(self.manifest["settings"], self.manifest.get("facts"), self.manifest["dataset"])

    def load_encoder(self, source: str | os.PathLike):
        """The free-text encoder at `source`, checked against what the dataset's features need."""
        from ..text import load_encoder

        return load_encoder(source, self.encoder_spec(), str(self.device))

    def text_features(self, texts: Sequence[str], encoder) -> dict[str, Any]:
        """A query batch of sentences, encoded as the dataset's stored query features are, then
        read exactly as stored ones are (first max_query_len rows, each row unit norm)."""
        from ..data.datasets import _normalize_t_, collate_queries

        if not texts:
            raise SearchError("no text given")
        L = int(self.manifest["model_config"].get("max_query_len", 30))
        items = []
        for text, feats in zip(texts, encoder.encode(list(texts))):
            if feats.shape[0] == 0:
                raise SearchError(f"text {text[:60]!r}: no tokens after the encoder's tokenizer")
            items.append({"query_id": None, "video_id": None,
                          "query_feats": _normalize_t_(torch.from_numpy(np.array(feats[:L], dtype=np.float32))).numpy()})
        return collate_queries(items)

    def search_texts(self, texts: Sequence[str], k: int, encoder) -> list[dict[str, Any]]:
        hits = self.search_encoded(self.encode(self.text_features(list(texts), encoder)), k)
        return [{"query_id": None, "text": t, "hits": h} for t, h in zip(texts, hits)]

    def encode(self, batch: Mapping[str, Any]):
        with torch.no_grad():
            return self.model.encode_queries({k: (v.to(self.device) if torch.is_tensor(v) else v)
                                              for k, v in batch.items()})

    # ---------------------------------------------------------------- the two stages
    def _videos(self, rows: np.ndarray):
        """The exact encodings of videos `rows` (sorted, distinct) as one VideoEncoding block,
        laid out as VideoBank.block lays out a block (the sequence zero padded to the longest
        video of the block, its mask), gathered from the memory maps in one copy each."""
        from ..methods import VideoEncoding

        fixed = {k: torch.from_numpy(a[rows]).to(self.device) for k, a in self.fixed.items()}
        if self.seq is None:
            return VideoEncoding(fixed)
        lo = self.offsets[rows]
        lens = self.offsets[rows + 1] - lo
        pos = np.arange(max(int(lens.max()) if len(rows) else 0, 1))
        mask = pos[None, :] < lens[:, None]                                   # (b, longest)
        if self.seq.shape[0]:
            seq = self.seq[np.where(mask, lo[:, None] + pos[None, :], 0)]     # (b, longest, H)
            seq[~mask] = 0
        else:
            seq = np.zeros((len(rows), len(pos), self.seq.shape[1]), dtype=self.seq.dtype)
        return VideoEncoding(fixed, torch.from_numpy(seq).to(self.device), torch.from_numpy(mask).to(self.device))

    def use_stage1(self, backend) -> None:
        """Answer stage 1 with `backend(q (Nq, D) float32, n) -> (Nq, n) video rows` (-1 pads)
        instead of the folder's faiss index, e.g. prvr.search.qdrant.QdrantStage1; None: faiss."""
        self.stage1_backend = backend

    def _stage1(self, q: torch.Tensor, n: int) -> np.ndarray:
        if getattr(self, "stage1_backend", None) is not None:
            return self.stage1_backend(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32), n)
        if n >= len(self.video_ids):   # every video is a candidate: stage 2 alone is exact
            return np.broadcast_to(np.arange(len(self.video_ids)), (q.shape[0], len(self.video_ids))).copy()
        k = min(self.faiss.ntotal, 3 * n)
        scores, ids = self.faiss.search(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32), k)
        return candidate_videos(scores, ids, self.vec_video, n)

    def search_encoded(self, query, k: int, candidates: int | None = None) -> list[list[dict[str, Any]]]:
        """Hits of already encoded queries (encode_queries' output): per query the top k videos
        with their exact score and moment."""
        k = self.clamp_k(k)
        # at least k candidates, so a large k is never cut to the stage-1 shortlist
        n = min(max(int(candidates or self.candidates), k), len(self.video_ids))
        cand = self._stage1(self.model.index_queries(query), n)                  # (Nq, n)
        out = []
        for lo in range(0, cand.shape[0], 16):   # blocks of queries: their candidates' union
            c = cand[lo:lo + 16]
            rows = np.unique(c[c >= 0])
            videos = self._videos(rows)
            q = query[lo:lo + 16]
            with torch.no_grad():
                scores = self.model.score(q.to(self.device) if hasattr(q, "to") else q, videos)["score"].float()
            col = np.searchsorted(rows, np.clip(c, 0, None))
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            valid = torch.from_numpy(c >= 0)
            allowed[torch.nonzero(valid, as_tuple=True)[0], torch.from_numpy(col[c >= 0])] = True
            top = scores.masked_fill(~allowed, float("-inf")).topk(k, dim=1)
            # the moment of the hits only: localize on the block's columns that made a top k
            cols = torch.unique(top.indices)
            sub = _columns(videos, cols)
            nf = torch.from_numpy(self.n_frames[rows[cols.numpy()]])
            with torch.no_grad():
                start, end = self.model.localize(q, sub, nf)
            at = torch.searchsorted(cols, top.indices)
            for i in range(scores.shape[0]):
                hits = []
                for s, j, c in zip(top.values[i].tolist(), top.indices[i].tolist(), at[i].tolist()):
                    if s == float("-inf"):
                        continue
                    hits.append(self._hit(int(rows[j]), s, int(start[i, c]), int(end[i, c])))
                out.append(hits)
        return out

    def clamp_k(self, k: int) -> int:
        """k checked (>= 1) and clamped to the collection's size, with a note when it is."""
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise SearchError(f"k {k!r}: expected a whole number >= 1")
        if k > len(self.video_ids):
            log.warning("k %d is more than the %d videos of %s: giving %d hits a query", k,
                        len(self.video_ids), self.folder, len(self.video_ids))
        return min(int(k), len(self.video_ids))

    def _hit(self, video: int, score: float, start: int, end: int) -> dict[str, Any]:
        s = self.stride
        return {"video_id": self.video_ids[video], "score": score, "n_features": int(self.n_frames[video]),
                "moment": {"start_feature": start, "end_feature": end,
                           "start_s": None if s is None else start * s, "end_s": None if s is None else end * s}}

    def own_moments(self, query, video_ids: Sequence[str]) -> list[tuple[int, int]]:
        """The moment each query finds in its own given video, whatever the ranking."""
        where = {v: i for i, v in enumerate(self.video_ids)}
        want = np.array([where[v] for v in video_ids], dtype=np.int64)
        rows = np.unique(want)
        with torch.no_grad():
            start, end = self.model.localize(query, self._videos(rows), torch.from_numpy(self.n_frames[rows]))
        col = torch.from_numpy(np.searchsorted(rows, want))
        i = torch.arange(len(want))
        return list(zip(start[i, col].tolist(), end[i, col].tolist()))

    def search_batch(self, batch: Mapping[str, Any], k: int) -> list[dict[str, Any]]:
        hits = self.search_encoded(self.encode(batch), k)
        return [{"query_id": q, "hits": h} for q, h in zip(batch["query_ids"], hits)]

    def search_ids(self, ids: Sequence[str], k: int) -> list[dict[str, Any]]:
        return self.search_batch(self.query_features(list(ids)), k)

    def exhaustive(self, query, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, video rows), each (Nq, k): every video scored exactly, block by block."""
        from ..evaluation import VideoBank, score_matrix

        if getattr(self, "_bank", None) is None:   # read into RAM once
            fixed = {key: torch.from_numpy(np.array(a)) for key, a in self.fixed.items()}
            seq = None if self.seq is None else torch.from_numpy(np.array(self.seq))
            offsets = None if self.offsets is None else torch.from_numpy(self.offsets)
            self._bank = VideoBank(self.video_ids, fixed, seq, offsets)
        scores = score_matrix(query, self._bank, lambda q, v: self.model.score(q, v)["score"], self.device,
                              progress=False)
        top = scores.topk(self.clamp_k(k), dim=1)
        return top.values, top.indices


def open_index(folder: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
               device: str = "cpu") -> SearchIndex:
    """Open an index folder: its checkpoint (refused when its sha256 is not the manifest's), its
    arrays memory-mapped, and the dataset's text features for query ids (located with the
    settings the manifest recorded)."""
    from ..checkpoint import CheckpointError, load_model
    from ..data.datasets import Corpus
    from ..data.layout import DataError

    folder = Path(folder)
    manifest = _read_manifest(folder)
    ckpt = Path(manifest["checkpoint"])
    if not ckpt.is_file():
        raise SearchError(f"{folder / 'manifest.json'}: its checkpoint {ckpt} is missing")
    digest = sha256_file(ckpt)
    if digest != manifest["checkpoint_sha256"]:
        raise SearchError(f"{ckpt}: sha256 differs from the one {folder / 'manifest.json'} recorded "
                          f"(index {manifest['checkpoint_sha256']}, file {digest}); the checkpoint changed "
                          "since the index was built (rebuild it)")
    try:
        model = load_model(ckpt, device, method=manifest["method"])[0].eval()
        corpus = Corpus.from_settings(manifest["settings"], data_dir if data_dir is not None else manifest["data_dir"])
    except (CheckpointError, DataError) as exc:
        raise SearchError(str(exc)) from None
    return SearchIndex(folder, manifest, model, corpus, device)
