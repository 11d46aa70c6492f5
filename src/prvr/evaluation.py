"""Encode-and-score evaluation: every video of a split once, every query once, all pairs scored.

Memory layout (what grows with what):
- The video bank holds the split's encodings compactly: clip embeddings (V, n_clips, H) and the
  REAL frame embeddings only, packed as (total_frames, H) with per-video offsets (no padding to
  the split's longest video). This is the only split-sized state besides the (Q, V) score matrix
  and the (Q, H) query embeddings, all of which are inherent to the task.
- Scoring runs over blocks of `video_chunk` videos x `query_chunk` queries. A video block is
  unpacked to (video_chunk, L_block, H) with L_block the longest video IN THE BLOCK, and the score
  function's temporaries are (query_chunk, video_chunk, n_clips + L_block): bounded by the chunk
  sizes, not by the split.
- The retrieval score is the model's (`prvr.model.retrieval_scores`: 0.7 clip + 0.3 frame). Its
  frame-scale max counts padded positions as 0 whenever a video has fewer than max_frames real
  frames, so the padding length of a block does not change a score.
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

from prvr.metrics import DEFAULT_KS, retrieval_metrics

from .atomic import atomic_path
from .model import unwrap_model

log = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class VideoBank:
    """Encoded videos of one split. frames holds only real frames, video i at
    frames[offsets[i]:offsets[i + 1]]."""

    video_ids: list[str]
    clips: torch.Tensor  # (V, n_clips, H)
    frames: torch.Tensor  # (total_frames, H)
    offsets: torch.Tensor  # (V + 1,) int64, on the same device as frames

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def block(self, start: int, stop: int, device: torch.device | str | None = None):
        """Videos [start, stop) as (clips, frames (n, L, H) zero padded, frame_mask (n, L)),
        L = longest video in the block."""
        lengths = self.lengths[start:stop]
        n = stop - start
        longest = max(int(lengths.max()) if n else 0, 1)
        pos = torch.arange(longest, device=self.frames.device)
        mask = pos[None, :] < lengths[:, None]
        if self.frames.shape[0]:
            idx = (self.offsets[start:stop, None] + pos[None, :]).clamp_(max=self.frames.shape[0] - 1)
            frames = self.frames[idx] * mask[..., None].to(self.frames.dtype)
        else:
            frames = self.frames.new_zeros(n, longest, self.frames.shape[1])
        clips = self.clips[start:stop]
        if device is not None:
            clips, frames, mask = clips.to(device), frames.to(device), mask.to(device)
        return clips, frames, mask


@dataclass
class ScoreResult:
    scores: torch.Tensor  # float32 (Q, V) on CPU
    query_ids: list[str]
    video_ids: list[str]
    query_video_ids: list[str] = field(default_factory=list)

    def metrics(self, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
        return retrieval_metrics(self.scores, self.query_video_ids, self.video_ids, ks=ks,
                                 query_ids=self.query_ids)



def _model_config(model: torch.nn.Module):
    for name in ("cfg", "config"):
        cfg = getattr(model, name, None)
        if cfg is not None:
            return cfg
    raise AttributeError(f"{type(model).__name__} has no 'cfg'/'config' attribute for the score weights")


def default_score_fn(model: torch.nn.Module) -> ScoreFn:
    """The model's retrieval score: prvr.model.retrieval_scores with the model's config."""
    from prvr.model import retrieval_scores

    cfg = _model_config(model)

    def score(query, clips, frames, frame_mask):
        return retrieval_scores(query, clips, frames, frame_mask, cfg)

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


def encode_videos(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                  storage_device: torch.device | str | None = None, progress: bool = True) -> VideoBank:
    """Encode every video batch of `loader` once ("clip_feats", "frame_feats", "frame_mask",
    "video_ids"); keep the encodings packed on `storage_device` (default: `device`)."""
    model = unwrap_model(model)
    device = torch.device(device)
    storage = torch.device(storage_device) if storage_device is not None else device
    t0 = time.perf_counter()
    ids: list[str] = []
    clips_l, frames_l, lengths_l = [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    with _EvalMode(model):
        for batch in tqdm(loader, desc="encode videos", total=total, unit="batch",
                          disable=not progress, dynamic_ncols=True):
            clips, frames, mask = model.encode_videos(_to(batch["clip_feats"], device),
                                                      _to(batch["frame_feats"], device),
                                                      _to(batch["frame_mask"], device))
            mask = mask.to(torch.bool)
            ids.extend(batch["video_ids"])
            clips_l.append(clips.float().to(storage))
            frames_l.append(frames[mask].float().to(storage))
            lengths_l.append(mask.sum(dim=1).to(storage))
    if not ids:
        raise ValueError("the video loader yielded no videos")
    if len(set(ids)) != len(ids):
        raise ValueError("the video loader yielded a video id more than once")
    lengths = torch.cat(lengths_l).long()
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long, device=storage)
    offsets[1:] = torch.cumsum(lengths, 0)
    bank = VideoBank(ids, torch.cat(clips_l), torch.cat(frames_l), offsets)
    log.info("encoded %d videos (%d frames) in %.1f s", len(ids), bank.frames.shape[0],
             time.perf_counter() - t0)
    return bank


def encode_queries(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                   progress: bool = True):
    """(query embeddings (Q, H) on device, query_ids, query_video_ids)."""
    model = unwrap_model(model)
    device = torch.device(device)
    embs, qids, qvids = [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    with _EvalMode(model):
        for batch in tqdm(loader, desc="encode queries", total=total, unit="batch",
                          disable=not progress, dynamic_ncols=True):
            embs.append(model.encode_query(_to(batch["query_feats"], device),
                                           _to(batch["query_mask"], device)).float())
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
            clips, frames, mask = bank.block(vs, ve, device)
            for qs in range(0, n_q, query_chunk):
                qe = min(qs + query_chunk, n_q)
                block = score_fn(query[qs:qe].to(device), clips, frames, mask)
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
             device: torch.device | str, ks: Iterable[int] = DEFAULT_KS,
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
