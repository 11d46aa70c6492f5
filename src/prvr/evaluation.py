"""Encode-and-score evaluation, the same for every method: every video of a split once, every
query once, all pairs scored with the method's `score`.

Memory layout (what grows with what):
- The video bank holds the split's encodings compactly: the method's fixed per-video tensors
  stacked (V, ...), and its per-video sequence (frame embeddings) as REAL rows only, packed as
  (total_rows, H) with per-video offsets (no padding to the split's longest video). This is the
  only split-sized state besides the (Q, V) score matrix and the (Q, D) query embeddings.
- Scoring runs over blocks of `video_chunk` videos x `query_chunk` queries. A block's sequences
  are unpacked to (video_chunk, L_block, H) with L_block the longest video IN THE BLOCK, so the
  score's temporaries are bounded by the chunk sizes, not by the split. A method's score never
  depends on how much padding a block carries (each method's tests check it).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_path
from .methods import VideoEncoding, unwrap_model
from .metrics import KS, retrieval_metrics

log = logging.getLogger(__name__)

# (query (q, D), VideoEncoding of a block) -> (q, b) scores
ScoreFn = Callable[[torch.Tensor, VideoEncoding], torch.Tensor]


@dataclass
class VideoBank:
    """Encoded videos of one split: fixed tensors (V, ...) and, when the method has one, its
    sequence packed: video i's rows at seq[offsets[i]:offsets[i + 1]]."""

    video_ids: list[str]
    fixed: dict[str, torch.Tensor]
    seq: torch.Tensor | None = None      # (total_rows, H)
    offsets: torch.Tensor | None = None  # (V + 1,) int64, on the same device as seq

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def block(self, start: int, stop: int, device: torch.device | str | None = None) -> VideoEncoding:
        """Videos [start, stop) as a VideoEncoding; the sequence zero padded to the longest
        video in the block."""
        fixed = {k: v[start:stop] for k, v in self.fixed.items()}
        seq = mask = None
        if self.seq is not None:
            lengths = self.lengths[start:stop]
            n = stop - start
            longest = max(int(lengths.max()) if n else 0, 1)
            pos = torch.arange(longest, device=self.seq.device)
            mask = pos[None, :] < lengths[:, None]
            if self.seq.shape[0]:
                idx = (self.offsets[start:stop, None] + pos[None, :]).clamp_(max=self.seq.shape[0] - 1)
                seq = self.seq[idx] * mask[..., None].to(self.seq.dtype)
            else:
                seq = self.seq.new_zeros(n, longest, self.seq.shape[1])
        if device is not None:
            fixed = {k: v.to(device) for k, v in fixed.items()}
            seq, mask = (None, None) if seq is None else (seq.to(device), mask.to(device))
        return VideoEncoding(fixed, seq, mask)


@dataclass
class ScoreResult:
    scores: torch.Tensor  # float32 (Q, V) on CPU
    query_ids: list[str]
    video_ids: list[str]
    query_video_ids: list[str] = field(default_factory=list)

    def metrics(self, ks: Iterable[int] = KS) -> dict[str, float]:
        return retrieval_metrics(self.scores, self.query_video_ids, self.video_ids, ks=ks,
                                 query_ids=self.query_ids)


def default_score_fn(model: torch.nn.Module) -> ScoreFn:
    """The method's retrieval score: model.score(query, videos)["score"]."""
    model = unwrap_model(model)

    def score(query, videos):
        return model.score(query, videos)["score"]

    return score


def _to(x, device):
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


class _EvalMode:
    """model.eval() + torch.no_grad() for the block, restoring the training flag afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)
        return False


def _batches(loader, desc: str, progress: bool):
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, desc=desc, total=total, unit="batch", disable=not progress, dynamic_ncols=True)


def encode_videos(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                  storage_device: torch.device | str | None = None, progress: bool = True) -> VideoBank:
    """Encode every video batch of `loader` once with `model.encode_videos`; keep the encodings
    (sequences packed) on `storage_device` (default: `device`)."""
    model = unwrap_model(model)
    device = torch.device(device)
    storage = torch.device(storage_device) if storage_device is not None else device
    t0 = time.perf_counter()
    ids: list[str] = []
    fixed: dict[str, list[torch.Tensor]] = {}
    seqs, lengths = [], []
    with _EvalMode(model):
        for batch in _batches(loader, "encode videos", progress):
            enc = model.encode_videos({k: _to(v, device) for k, v in batch.items()})
            ids.extend(batch["video_ids"])
            for k, v in enc.fixed.items():
                fixed.setdefault(k, []).append(v.float().to(storage))
            if enc.seq is not None:
                mask = enc.seq_mask.to(torch.bool)
                seqs.append(enc.seq[mask].float().to(storage))
                lengths.append(mask.sum(dim=1).to(storage))
    if not ids:
        raise ValueError("the video loader yielded no videos")
    if len(set(ids)) != len(ids):
        raise ValueError("the video loader yielded a video id more than once")
    bank = VideoBank(ids, {k: torch.cat(v) for k, v in fixed.items()})
    if seqs:
        offsets = torch.zeros(len(ids) + 1, dtype=torch.long, device=storage)
        offsets[1:] = torch.cumsum(torch.cat(lengths).long(), 0)
        bank.seq, bank.offsets = torch.cat(seqs), offsets
    log.info("encoded %d videos (%d sequence rows) in %.1f s", len(ids),
             0 if bank.seq is None else bank.seq.shape[0], time.perf_counter() - t0)
    return bank


def encode_queries(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                   progress: bool = True):
    """(query embeddings (Q, H) on device, query_ids, query_video_ids)."""
    model = unwrap_model(model)
    device = torch.device(device)
    embs, qids, qvids = [], [], []
    with _EvalMode(model):
        for batch in _batches(loader, "encode queries", progress):
            embs.append(model.encode_queries({k: _to(v, device) for k, v in batch.items()}).float())
            qids.extend(batch["query_ids"])
            if "query_video_ids" in batch:
                qvids.extend(batch["query_video_ids"])
            else:
                qvids.extend(q.split("#", 1)[0] for q in batch["query_ids"])
    if not qids:
        raise ValueError("the query loader yielded no queries")
    return torch.cat(embs), qids, qvids


def score_matrix(query: torch.Tensor, bank: VideoBank, score_fn: ScoreFn,
                 device: torch.device | str | None = None, query_chunk: int = 512,
                 video_chunk: int = 128, progress: bool = True) -> torch.Tensor:
    """float32 (Q, V) CPU matrix of score_fn over all (query, video) pairs, block by block."""
    device = torch.device(device) if device is not None else query.device
    n_q, n_v = query.shape[0], len(bank)
    scores = torch.empty(n_q, n_v, dtype=torch.float32)
    starts = range(0, n_v, video_chunk)
    with torch.no_grad():
        for vs in tqdm(starts, desc="score", unit="block", disable=not progress, dynamic_ncols=True):
            ve = min(vs + video_chunk, n_v)
            videos = bank.block(vs, ve, device)
            for qs in range(0, n_q, query_chunk):
                qe = min(qs + query_chunk, n_q)
                block = score_fn(query[qs:qe].to(device), videos)
                scores[qs:qe, vs:ve] = block.float().cpu()
    return scores


def score_queries(model: torch.nn.Module, bank: VideoBank, query_loader: Iterable[dict],
                  device: torch.device | str, score_fn: ScoreFn | None = None,
                  query_chunk: int = 512, video_chunk: int = 128, progress: bool = True) -> ScoreResult:
    """Encode every query of `query_loader` and score it against every video of `bank`."""
    model = unwrap_model(model)
    t0 = time.perf_counter()
    query, qids, qvids = encode_queries(model, query_loader, device, progress=progress)
    fn = score_fn if score_fn is not None else default_score_fn(model)
    with _EvalMode(model):
        scores = score_matrix(query, bank, fn, device, query_chunk, video_chunk, progress)
    log.info("scored %d queries x %d videos in %.1f s", len(qids), len(bank), time.perf_counter() - t0)
    return ScoreResult(scores, qids, list(bank.video_ids), qvids)


def evaluate(model: torch.nn.Module, video_loader: Iterable[dict], query_loader: Iterable[dict],
             device: torch.device | str, ks: Iterable[int] = KS,
             score_fn: ScoreFn | None = None, query_chunk: int = 512, video_chunk: int = 128,
             storage_device: torch.device | str | None = None, progress: bool = True):
    """Encode a split, score it, and compute the retrieval metrics: (metrics, ScoreResult)."""
    bank = encode_videos(model, video_loader, device, storage_device=storage_device, progress=progress)
    result = score_queries(model, bank, query_loader, device, score_fn=score_fn,
                           query_chunk=query_chunk, video_chunk=video_chunk, progress=progress)
    metrics = result.metrics(ks)
    log.info("metrics: %s", ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return metrics, result


def save_scores_h5(path: str | os.PathLike, result: ScoreResult,
                   metrics: dict[str, float] | None = None) -> Path:
    """Write scores (float32, queries x videos), query_ids, video_ids, query_video_ids (utf-8)
    and the metrics as attributes; atomically (temp file in the same folder, then os.replace)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scores = result.scores.detach().cpu().numpy().astype(np.float32, copy=False)
    if scores.shape != (len(result.query_ids), len(result.video_ids)):
        raise ValueError(f"{path}: scores shape {scores.shape} does not match "
                         f"{len(result.query_ids)} queries x {len(result.video_ids)} videos")
    str_dt = h5py.string_dtype(encoding="utf-8")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("scores", data=scores)
        h5.create_dataset("query_ids", data=np.array(result.query_ids, dtype=object), dtype=str_dt)
        h5.create_dataset("video_ids", data=np.array(result.video_ids, dtype=object), dtype=str_dt)
        if result.query_video_ids:
            h5.create_dataset("query_video_ids", data=np.array(result.query_video_ids, dtype=object),
                              dtype=str_dt)
        for key, value in (metrics or {}).items():
            h5.attrs[key] = float(value)
    log.info("wrote %s (%d x %d scores)", path, *scores.shape)
    return path


def load_scores_h5(path: str | os.PathLike) -> tuple[ScoreResult, dict[str, float]]:
    """Read a file written by save_scores_h5: (ScoreResult, metrics attributes)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            for key in ("scores", "query_ids", "video_ids"):
                if key not in h5:
                    raise ValueError(f"{path}: missing dataset '{key}'")
            scores = torch.from_numpy(np.asarray(h5["scores"], dtype=np.float32))
            qids = [s.decode("utf-8") for s in h5["query_ids"][()]]
            vids = [s.decode("utf-8") for s in h5["video_ids"][()]]
            qvids = ([s.decode("utf-8") for s in h5["query_video_ids"][()]]
                     if "query_video_ids" in h5 else [q.split("#", 1)[0] for q in qids])
            metrics = {k: float(v) for k, v in h5.attrs.items()}
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 score file ({exc})") from None
    return ScoreResult(scores, qids, vids, qvids), metrics
