"""Loss building blocks shared by the PRVR methods (MS-SL, GMMFormer v1/v2 share this family),
vectorised.

One training step sees B videos with all of their captions (Nq queries); ``labels[q]`` is the
index of query q's video in the batch. A method's objective (its own loss module under
prvr.methods) combines these terms with its named weights.

Everything except the Hungarian solve of OML is batched tensor code: per-video quantities are
computed with label masks, masked ``logsumexp`` and gathers. Negative sampling follows the
public release: candidates are ranked by (detached) score in descending order and a rank is
drawn uniformly, so with the same integer draws this module and the release pick the same
negatives. Random numbers come from the given ``torch.Generator`` (drawn on the generator's
device, then moved to the scores' device), so runs are seeded and device independent and a
distributed caller can draw identically on every rank.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "nce_loss",
    "triplet_loss",
    "query_diverse_loss",
    "optimal_matching",
    "oml_from_matching",
    "uniform_ranks",
]


def _check_labels(labels: Tensor, n_queries: int, n_videos: int) -> Tensor:
    if labels.dim() != 1 or labels.numel() != n_queries:
        raise ValueError(f"labels: expected shape ({n_queries},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    return labels.long()


def _video_onehot(labels: Tensor, n_videos: int) -> Tensor:
    """(Nq, B) bool: query q belongs to video v."""
    return labels.unsqueeze(1) == torch.arange(n_videos, device=labels.device).unsqueeze(0)


def uniform_ranks(pool: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniform integer in [0, pool[i]) per entry (0 where pool[i] <= 0).

    Draws ``pool.numel()`` float64 uniforms from ``generator`` (the default CPU generator when
    None) on the generator's device and moves the result to ``pool``'s device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(pool.shape, generator=generator, dtype=torch.float64, device=gen_device)
    u = u.to(pool.device)
    k = torch.floor(u * pool.to(torch.float64)).long()
    return torch.minimum(k, (pool - 1).clamp_min(0))


def nce_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """InfoNCE in both directions on an (Nq, B) score matrix.

    t2v: mean over queries of ``logsumexp_v S[q, v] - S[q, label(q)]``;
    v2t: mean over the B videos of ``logsumexp_q S[q, v] - logsumexp_{q of v} S[q, v]``
    (a video with no query in the batch contributes 0 but still counts in the mean).
    """
    n_q, n_v = scores.shape
    labels = _check_labels(labels, n_q, n_v)
    rows = torch.arange(n_q, device=scores.device)
    t2v = torch.logsumexp(scores, dim=1) - scores[rows, labels]
    onehot = _video_onehot(labels, n_v)
    has_query = onehot.any(dim=0)
    # A column without queries keeps all its entries, so its two logsumexps cancel (no -inf/NaN).
    keep = onehot | ~has_query.unsqueeze(0)
    pos = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=0)
    v2t = torch.logsumexp(scores, dim=0) - pos
    v2t = torch.where(has_query, v2t, torch.zeros_like(v2t))
    return t2v.mean() + v2t.mean()


def triplet_loss(
    scores: Tensor,
    labels: Tensor,
    margin: float,
    hard_negatives: bool,
    hard_pool_size: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hinge ranking loss t2v + v2t on an (Nq, B) cosine score matrix (release semantics).

    t2v: for each query, the other videos are ranked by score (descending); a rank is drawn
    uniformly among all B-1 of them, or among the first ``hard_pool_size`` with hard negatives.
    ``sum_q max(0, m + S[q, neg] - S[q, label]) / Nq``.
    v2t: for each video, the queries of other videos are ranked by score; with hard negatives
    the first one is taken, otherwise a uniformly drawn one.
    ``sum_v max(0, m + S[neg, v] - mean_{q of v} S[q, v]) / B``.
    Queries/videos without any candidate negative contribute 0.
    Draw order: Nq uniforms for t2v, then (random mode only) B uniforms for v2t.
    """
    n_q, n_v = scores.shape
    labels = _check_labels(labels, n_q, n_v)
    onehot = _video_onehot(labels, n_v)
    t2v_loss = _triplet_t2v(scores, labels, margin, hard_negatives, hard_pool_size, generator)
    v2t_loss = _triplet_v2t(scores, onehot, margin, hard_negatives, generator)
    return t2v_loss + v2t_loss


def _triplet_t2v(scores: Tensor, labels: Tensor, margin: float, hard_negatives: bool,
                 hard_pool_size: int, generator: torch.Generator | None) -> Tensor:
    """Text-to-video hinge term of triplet_loss (draws Nq uniforms)."""
    n_q, n_v = scores.shape
    device = scores.device
    rows = torch.arange(n_q, device=device)
    pos_t2v = scores[rows, labels]
    masked = scores.detach().clone()
    masked[rows, labels] = float("inf")  # the positive always ranks first
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # (Nq, B)
    n_other = n_v - 1
    pool = min(hard_pool_size, n_other) if hard_negatives else n_other
    pool_t = torch.full((n_q,), pool, dtype=torch.long, device=device)
    rank = 1 + uniform_ranks(pool_t, generator)
    rank = rank.clamp_max(n_v - 1)
    neg_video = order.gather(1, rank.unsqueeze(1)).squeeze(1)
    t2v = (margin + scores[rows, neg_video] - pos_t2v).clamp(min=0)
    if pool <= 0:
        t2v = t2v * 0.0
    return t2v.sum() / n_q


def _triplet_v2t(scores: Tensor, onehot: Tensor, margin: float, hard_negatives: bool,
                 generator: torch.Generator | None) -> Tensor:
    """Video-to-text hinge term of triplet_loss (draws B uniforms in random mode only)."""
    n_q, n_v = scores.shape
    st = scores.t()  # (B, Nq)
    own = onehot.t()  # (B, Nq)
    count = own.sum(dim=1)
    pos_v2t = (st * own).sum(dim=1) / count.clamp_min(1)
    neg_masked = scores.detach().t().masked_fill(own, float("-inf"))
    order_v = torch.sort(neg_masked, dim=1, descending=True, stable=True).indices  # (B, Nq)
    n_neg = n_q - count
    if hard_negatives:
        rank_v = torch.zeros(n_v, dtype=torch.long, device=scores.device)
    else:
        rank_v = uniform_ranks(n_neg, generator)
    neg_query = order_v.gather(1, rank_v.unsqueeze(1)).squeeze(1)
    neg_v2t = st.gather(1, neg_query.unsqueeze(1)).squeeze(1)
    v2t = (margin + neg_v2t - pos_v2t).clamp(min=0)
    valid = (count > 0) & (n_neg > 0)
    v2t = torch.where(valid, v2t, torch.zeros_like(v2t))
    return v2t.sum() / n_v


def query_diverse_loss(query: Tensor, labels: Tensor, neg_factor: Sequence[float]) -> Tensor:
    """QDL: for each ordered pair i != j of queries of one video, with c = cos(q_i, q_j),
    ``(1 + c)^lambda * log(1 + exp(alpha * (c + delta)))``; summed and divided by Nq.
    ``neg_factor = (delta, alpha, lambda)``.
    """
    delta, alpha, lam = (float(x) for x in neg_factor)
    n_q = query.shape[0]
    labels = _check_labels(labels, n_q, -1)
    x = F.normalize(query, dim=-1)
    cos = x @ x.t()
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    pair = same & ~torch.eye(n_q, dtype=torch.bool, device=query.device)
    c = torch.where(pair, cos, torch.zeros_like(cos))
    z = alpha * (c + delta)
    term = (1.0 + c).clamp_min(0.0).pow(lam) * torch.logaddexp(torch.zeros_like(z), z)
    term = torch.where(pair, term, torch.zeros_like(term))
    return term.sum() / n_q


def optimal_matching(query: Tensor, clips: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Hungarian matching of each video's queries to distinct clips of that video.

    For every video with two or more queries, cost = -cos(query_i, clip_k) (n_q x n_clips) is
    solved on the host (scipy, one call per video). Two fixed-size device->host transfers per
    call (the per-video query counts, then all cost blocks together), never one per video.
    Returns ``(sum of matched cosines, number of matched pairs)``; the sum carries gradient through the matched cosines only. OML = 1 - sum / count (0 when count == 0).
    With no such video the sum is a zero connected to the graph.
    """
    n_q = query.shape[0]
    n_v = clips.shape[0]
    labels = _check_labels(labels, n_q, n_v)
    qn = F.normalize(query, dim=-1)
    cn = F.normalize(clips, dim=-1)
    # Lay the queries out per video, (B, max_q, H), and score each video's queries against its
    # own clips with one batched matmul: blocks (B, max_q, n_clips) of cosines.
    counts = torch.bincount(labels, minlength=n_v)
    counts_host = counts.cpu().numpy()  # transfer 1 (B ints): the block layout
    max_q = int(counts_host.max()) if n_q else 0
    if max_q < 2:
        return (qn.sum() + cn.sum()) * 0.0, 0
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(labels)
    slot[order] = torch.arange(n_q, device=labels.device) - starts[labels[order]]
    qpad = qn.new_zeros(n_v, max_q, qn.shape[-1])
    qpad = qpad.index_put((labels, slot), qn)
    blocks = torch.bmm(qpad, cn.transpose(1, 2))
    host = blocks.detach().cpu().numpy()  # transfer 2: every cost block at once
    v_match, s_match, c_match = [], [], []
    for v in np.flatnonzero(counts_host >= 2):
        r, c = linear_sum_assignment(-host[v, :counts_host[v]])
        v_match.append(np.full(len(r), v))
        s_match.append(r)
        c_match.append(c)
    idx = np.stack([np.concatenate(v_match), np.concatenate(s_match), np.concatenate(c_match)]).astype(np.int64)
    idx_t = torch.from_numpy(idx).to(query.device)  # one host->device copy
    matched = blocks[idx_t[0], idx_t[1], idx_t[2]]
    return matched.sum(), int(matched.numel())


def oml_from_matching(sum_cos: Tensor, count: int | Tensor) -> Tensor:
    """OML = 1 - sum_cos / count, or a graph-connected 0 when count == 0."""
    if int(count) == 0:
        return sum_cos * 0.0
    return 1.0 - sum_cos / count
