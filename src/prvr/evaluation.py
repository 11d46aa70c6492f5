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

Memory budget (`evaluate.memory_budget_mb`, also used by the training's validation): the
device memory evaluation holds beyond the model. The bank stays on the device while it takes
at most half of the budget; past that it moves to the host (pinned when the device is CUDA)
and each block's real rows are copied to the device as it is scored. The chunk sizes are then
chosen from what is left (`block_plan`): a block's unpacked sequences plus its score
temporaries per (query, video) pair. On CUDA both are measured on a small probe block (the
allocator's peak); elsewhere they are estimated (`block_bytes`: four fp32 tensors per pair over
the video's rows and the hidden size).
Scores do not depend on the chunking, so any budget gives the same scores. On CPU the bank is
host memory and is not counted; the blocks are.

Precision: `precision="bf16"` encodes and scores under bf16 autocast; encodings and scores are
stored as float32 and the metrics computed from them in fp32.
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

from .accel import autocast
from .atomic import atomic_path
from .methods import QueryEncoding, VideoEncoding, cat_queries, unwrap_model
from .metrics import KS, retrieval_metrics

log = logging.getLogger(__name__)

# (query (q, D), VideoEncoding of a block) -> (q, b) scores
ScoreFn = Callable[[torch.Tensor, VideoEncoding], torch.Tensor]

DEFAULT_MEMORY_BUDGET_MB = 2048.0
_MB = 2 ** 20


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

    @property
    def device(self) -> torch.device:
        for t in (self.seq, *self.fixed.values()):
            if t is not None:
                return t.device
        return torch.device("cpu")

    @property
    def host_offsets(self) -> torch.Tensor:
        """The offsets on the CPU (copied once), for slicing without a device sync per block."""
        if self.offsets.device.type == "cpu":
            return self.offsets
        if getattr(self, "_host_offsets", None) is None:
            self._host_offsets = self.offsets.cpu()
        return self._host_offsets

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.seq, self.offsets, *self.fixed.values())
                   if t is not None)

    def block(self, start: int, stop: int, device: torch.device | str | None = None) -> VideoEncoding:
        """Videos [start, stop) as a VideoEncoding on `device` (default: the bank's); the
        sequence zero padded to the longest video in the block. Only the block's real rows are
        copied (non_blocking: asynchronous from a pinned host bank), then unpacked there."""
        device = torch.device(device) if device is not None else self.device
        fixed = {k: v[start:stop].to(device, non_blocking=True) for k, v in self.fixed.items()}
        if self.seq is None:
            return VideoEncoding(fixed, None, None)
        off = self.host_offsets[start:stop + 1]
        lo, hi, n = int(off[0]), int(off[-1]), stop - start
        lengths = off[1:] - off[:-1]
        longest = max(int(lengths.max()) if n else 0, 1)
        rows = self.seq[lo:hi].to(device, non_blocking=True)
        pos = torch.arange(longest, device=device)
        mask = pos[None, :] < lengths.to(device)[:, None]
        if rows.shape[0]:
            idx = ((off[:-1] - lo).to(device)[:, None] + pos[None, :]).clamp_(max=rows.shape[0] - 1)
            seq = rows[idx].mul_(mask[..., None].to(rows.dtype))
        else:
            seq = rows.new_zeros(n, longest, self.seq.shape[1])
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


class _BankBuilder:
    """Collects a split's encodings on `storage`; once they pass `limit` bytes (None: no limit)
    on an accelerator, everything held so far moves to the host and the rest goes there."""

    def __init__(self, storage: torch.device, limit: float | None):
        self.storage, self.limit, self.held = storage, limit, 0
        self.fixed: dict[str, list[torch.Tensor]] = {}
        self.seqs: list[torch.Tensor] = []
        self.lengths: list[torch.Tensor] = []

    def add(self, enc: VideoEncoding) -> None:
        parts = {k: v.float() for k, v in enc.fixed.items()}
        rows = lengths = None
        if enc.seq is not None:
            mask = enc.seq_mask.to(torch.bool)
            rows, lengths = enc.seq[mask].float(), mask.sum(dim=1)
        self.held += sum(t.numel() * 4 for t in (*parts.values(), *([rows] if rows is not None else [])))
        if self.limit is not None and self.held > self.limit and self.storage.type != "cpu":
            log.info("video bank past %.0f MB (half the memory budget): kept on the host, streamed "
                     "to %s block by block", self.limit / _MB, self.storage)
            self.storage = torch.device("cpu")
            self.fixed = {k: [t.cpu() for t in v] for k, v in self.fixed.items()}
            self.seqs, self.lengths = [t.cpu() for t in self.seqs], [t.cpu() for t in self.lengths]
        for k, v in parts.items():
            self.fixed.setdefault(k, []).append(v.to(self.storage))
        if rows is not None:
            self.seqs.append(rows.to(self.storage))
            self.lengths.append(lengths.to(self.storage))

    def build(self, ids: list[str], pin: bool) -> VideoBank:
        pin = pin and self.storage.type == "cpu"
        cat = (lambda ts: torch.cat(ts).pin_memory()) if pin else torch.cat
        bank = VideoBank(ids, {k: cat(v) for k, v in self.fixed.items()})
        if self.seqs:
            offsets = torch.zeros(len(ids) + 1, dtype=torch.long, device=self.storage)
            offsets[1:] = torch.cumsum(torch.cat(self.lengths).long(), 0)
            bank.seq, bank.offsets = cat(self.seqs), offsets
        return bank


def _budget_bytes(memory_budget_mb: float | None) -> float:
    return float(DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb) * _MB


def encode_videos(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                  storage_device: torch.device | str | None = None, progress: bool = True,
                  precision: str = "fp32", memory_budget_mb: float | None = None) -> VideoBank:
    """Encode every video batch of `loader` once with `model.encode_videos`; keep the encodings
    (float32, sequences packed) on `storage_device`, by default on `device` while they take at
    most half of the memory budget, else on the host (pinned for CUDA)."""
    model = unwrap_model(model)
    device = torch.device(device)
    storage = torch.device(storage_device) if storage_device is not None else device
    limit = _budget_bytes(memory_budget_mb) / 2 if storage_device is None else None
    t0 = time.perf_counter()
    ids: list[str] = []
    builder = _BankBuilder(storage, limit)
    with _EvalMode(model):
        for batch in _batches(loader, "encode videos", progress):
            with autocast(device, precision):
                enc = model.encode_videos({k: _to(v, device) for k, v in batch.items()})
            ids.extend(batch["video_ids"])
            builder.add(enc)
    if not ids:
        raise ValueError("the video loader yielded no videos")
    if len(set(ids)) != len(ids):
        raise ValueError("the video loader yielded a video id more than once")
    bank = builder.build(ids, pin=device.type == "cuda")
    log.info("encoded %d videos (%d sequence rows, %.1f MB on %s) in %.1f s", len(ids),
             0 if bank.seq is None else bank.seq.shape[0], bank.nbytes() / _MB, bank.device,
             time.perf_counter() - t0)
    return bank


def encode_queries(model: torch.nn.Module, loader: Iterable[dict], device: torch.device | str,
                   progress: bool = True, precision: str = "fp32"):
    """(query embeddings float32 on device: (Q, H), or a QueryEncoding for a token-level method;
    query_ids, query_video_ids)."""
    model = unwrap_model(model)
    device = torch.device(device)
    embs, qids, qvids = [], [], []
    with _EvalMode(model):
        for batch in _batches(loader, "encode queries", progress):
            with autocast(device, precision):
                emb = model.encode_queries({k: _to(v, device) for k, v in batch.items()})
            embs.append(emb.float())
            qids.extend(batch["query_ids"])
            if "query_video_ids" in batch:
                qvids.extend(batch["query_video_ids"])
            else:
                qvids.extend(q.split("#", 1)[0] for q in batch["query_ids"])
    if not qids:
        raise ValueError("the query loader yielded no queries")
    return cat_queries(embs), qids, qvids


def block_bytes(bank: VideoBank, longest: int, token_len: int = 0) -> tuple[int, int]:
    """(bytes per video of an unpacked block, bytes per (query, video) pair of scoring it):
    the block's fp32 fixed tensors and padded sequence (the gather and its int64 index), and
    four fp32 temporaries over the video's rows (fixed rows + longest) and the hidden size,
    plus the pair's score (device and host copy). A token-level query (token_len tokens) adds
    four fp32 (token, row) temporaries per pair."""
    hidden = int(bank.seq.shape[1]) if bank.seq is not None else \
        max((int(t.shape[-1]) for t in bank.fixed.values()), default=1)
    fixed_elems = sum(int(t[:1].numel()) for t in bank.fixed.values())
    fixed_rows = sum(max(int(t[:1].numel()) // hidden, 1) for t in bank.fixed.values())
    seq_rows = longest if bank.seq is not None else 0
    per_video = 4 * fixed_elems + seq_rows * (4 * hidden + 8 + 1)
    per_pair = 16 * (fixed_rows + seq_rows + hidden) + 8 + 16 * token_len * max(seq_rows, 1)
    return per_video, per_pair


def _token_len(query) -> int:
    return query.token_len if isinstance(query, QueryEncoding) else 0


def measured_block_bytes(bank: VideoBank, query: torch.Tensor, score_fn: ScoreFn, device: torch.device,
                         v0: int, q0: int) -> tuple[int, int]:
    """CUDA: (bytes per video, bytes per pair) as the allocator counts them, on a probe block of
    v0 videos (around the longest, so at the split's longest padding) x q0 queries, 10% added:
    the method's real temporaries, whatever its score does (MS-SL's 528 proposals). Per video:
    the peak while the block is built; per pair: what scoring adds on top of the block."""
    n_v = len(bank)
    top = int(bank.lengths.argmax()) if bank.seq is not None else 0
    start = min(max(top - v0 // 2, 0), n_v - v0)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        videos = bank.block(start, start + v0, device)
        q = query[:q0].to(device)
        torch.cuda.synchronize(device)
        built, held = (torch.cuda.max_memory_allocated(device) - base, torch.cuda.memory_allocated(device) - base)
        score_fn(q, videos)
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del videos, q
    return int(1.1 * built / v0) + 1, int(1.1 * max(peak - held, 0) / (v0 * q0)) + 1


def block_plan(bank: VideoBank, n_queries: int, query_dim: int, device: torch.device | str,
               memory_budget_mb: float | None = None, sizes: tuple[int, int] | None = None,
               token_len: int = 0) -> tuple[int, int]:
    """(video_chunk, query_chunk) whose block fits the memory budget next to what scoring keeps
    on the device: the bank (when it is there, and not on CPU) and the query embeddings.
    sizes: (bytes per video, bytes per pair), measured; default the estimate (block_bytes).
    token_len: the query tokens of a token-level method (their encodings are resident too)."""
    device, budget = torch.device(device), _budget_bytes(memory_budget_mb)
    n_v = len(bank)
    longest = int(bank.lengths.max()) if bank.seq is not None and n_v else 0
    per_video, per_pair = sizes or block_bytes(bank, longest, token_len)
    resident = 4 * n_queries * query_dim * (1 + token_len)
    if device.type != "cpu" and bank.device == device:
        resident += bank.nbytes()
    avail = budget - resident
    v = min(n_v, 1024)
    while v > 1 and v * per_video + min(n_queries, 256) * v * per_pair > avail:
        v = (v + 1) // 2
    q = int(max(avail - v * per_video, 0) // (v * per_pair))
    if q < 1:
        log.warning("memory budget %.1f MB: %.1f MB resident leaves no room for one block; "
                    "scoring one query x one video at a time", budget / _MB, resident / _MB)
    return max(v, 1), min(max(q, 1), max(n_queries, 1))


def score_matrix(query: torch.Tensor, bank: VideoBank, score_fn: ScoreFn,
                 device: torch.device | str | None = None, query_chunk: int | None = None,
                 video_chunk: int | None = None, progress: bool = True, precision: str = "fp32",
                 memory_budget_mb: float | None = None) -> torch.Tensor:
    """float32 (Q, V) CPU matrix of score_fn over all (query, video) pairs, block by block.
    Chunk sizes not given come from the memory budget (block_plan)."""
    device = torch.device(device) if device is not None else query.device
    n_q, n_v = query.shape[0], len(bank)
    if query_chunk is None or video_chunk is None:
        sizes = None
        if device.type == "cuda" and n_v and n_q:   # probe at most half the budget, 16 x 64
            v0, q0 = block_plan(bank, n_q, int(query.shape[-1]), device, _budget_bytes(memory_budget_mb) / 2 / _MB,
                                token_len=_token_len(query))
            with autocast(device, precision):
                sizes = measured_block_bytes(bank, query, score_fn, device, min(v0, 16), min(q0, 64))
        v_plan, q_plan = block_plan(bank, n_q, int(query.shape[-1]), device, memory_budget_mb, sizes,
                                    _token_len(query))
        video_chunk, query_chunk = video_chunk or v_plan, query_chunk or q_plan
        log.debug("scoring in blocks of %d videos x %d queries", video_chunk, query_chunk)
    scores = torch.empty(n_q, n_v, dtype=torch.float32)
    starts = range(0, n_v, video_chunk)
    with torch.no_grad(), autocast(device, precision):
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
                  query_chunk: int | None = None, video_chunk: int | None = None, progress: bool = True,
                  precision: str = "fp32", memory_budget_mb: float | None = None) -> ScoreResult:
    """Encode every query of `query_loader` and score it against every video of `bank`."""
    model = unwrap_model(model)
    t0 = time.perf_counter()
    query, qids, qvids = encode_queries(model, query_loader, device, progress=progress, precision=precision)
    fn = score_fn if score_fn is not None else default_score_fn(model)
    with _EvalMode(model):
        scores = score_matrix(query, bank, fn, device, query_chunk, video_chunk, progress, precision,
                              memory_budget_mb)
    log.info("scored %d queries x %d videos in %.1f s", len(qids), len(bank), time.perf_counter() - t0)
    return ScoreResult(scores, qids, list(bank.video_ids), qvids)


def evaluate(model: torch.nn.Module, video_loader: Iterable[dict], query_loader: Iterable[dict],
             device: torch.device | str, ks: Iterable[int] = KS,
             score_fn: ScoreFn | None = None, query_chunk: int | None = None, video_chunk: int | None = None,
             storage_device: torch.device | str | None = None, progress: bool = True,
             precision: str = "fp32", memory_budget_mb: float | None = None):
    """Encode a split, score it, and compute the retrieval metrics: (metrics, ScoreResult).
    precision: fp32 | bf16 (autocast); memory_budget_mb: see the module docstring."""
    bank = encode_videos(model, video_loader, device, storage_device=storage_device, progress=progress,
                         precision=precision, memory_budget_mb=memory_budget_mb)
    result = score_queries(model, bank, query_loader, device, score_fn=score_fn, query_chunk=query_chunk,
                           video_chunk=video_chunk, progress=progress, precision=precision,
                           memory_budget_mb=memory_budget_mb)
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
