"""Holmes' intra-video alignment (docs/holmes.md): each video's queries against its own clips,
and the partial optimal transport plan that serves as their pseudo-labels. Batched over the
videos of a batch: the queries are laid out per video, (B, Q, H), Q the most any video has.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def per_video_layout(labels: Tensor, n_videos: int) -> tuple[Tensor, Tensor]:
    """(slot (Nq,), mask (B, Q) bool): query q is row slot[q] of its video's block, in batch order."""
    counts = torch.bincount(labels, minlength=n_videos)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(labels)
    slot[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    width = int(counts.max()) if labels.numel() else 0
    mask = torch.arange(width, device=labels.device)[None] < counts[:, None]
    return slot, mask


def intra_video_similarity(clips: Tensor, query: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sim (B, Q, C), mask (B, Q)): cosine of each video's queries with its clips, min-max
    scaled per video to [0, 1]. As the release does, the extremes run over the whole (Q, C)
    block, the empty query slots' zero cosines included."""
    B, _, H = clips.shape
    slot, mask = per_video_layout(labels, B)
    qn = F.normalize(query.float(), dim=-1)
    qpad = qn.new_zeros(B, mask.shape[1], H).index_put((labels, slot), qn)
    with torch.autocast(clips.device.type, enabled=False):
        cos = torch.bmm(qpad, F.normalize(clips.float(), dim=-1).transpose(1, 2))   # (B, Q, C)
    flat = cos.reshape(B, -1)
    lo = flat.min(1).values[:, None, None]
    hi = flat.max(1).values[:, None, None]
    return (cos - lo) / (hi - lo + 1e-8), mask


def dustbin_values(sim: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """(B,): per video, the k-th smallest of its real query-clip similarities, k = floor(quantile
    x their number), at least 1 (0 for a video without queries)."""
    B, Q, C = sim.shape
    real = sim.masked_fill(~mask[:, :, None], float("inf")).reshape(B, -1)
    n = (mask.sum(1) * C).to(torch.float64)
    k = torch.floor(quantile * n).long().clamp(min=1).minimum(n.long().clamp(min=1))
    value = real.sort(1).values.gather(1, (k - 1)[:, None]).squeeze(1)
    return torch.where(mask.any(1), value, torch.zeros_like(value))   # a video without queries: 0


@torch.no_grad()
def partial_transport(sim: Tensor, mask: Tensor, dustbin: Tensor, scale: float, iters: int) -> Tensor:
    """The transport plan (B, Q, C) of each video's real queries to its C clips, with a dustbin
    row that can absorb clip mass: log-domain Sinkhorn on sim / scale.

    Marginals: each clip 1/C; each real query 1/(C + m) and the dustbin C/(C + m), m the
    video's query count. The plan is rescaled by C, kept on the real queries, and each query
    row normalised to sum to 1. No gradient flows through it.
    """
    B, Q, C = sim.shape
    m = mask.sum(1).to(sim.dtype)
    n = torch.full_like(m, float(C))
    couplings = torch.cat([sim, dustbin.view(B, 1, 1).expand(B, 1, C)], 1) / scale   # (B, Q+1, C)
    log_nu = (-n.log())[:, None].expand(B, C)
    row = -(n + m).log()
    log_mu = torch.cat([row[:, None].expand(B, Q).masked_fill(~mask, -1e9), (n.log() + row)[:, None]], 1)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
    log_plan = couplings + u[:, :, None] + v[:, None, :] + math.log(C)
    plan = log_plan[:, :Q].exp() * mask[:, :, None]
    return plan / (plan.sum(2, keepdim=True) + 1e-8)
