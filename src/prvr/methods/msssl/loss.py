"""MS-SL's objective (the release's MS_SL_Net.forward), vectorised:

    total = clip_nce_w * clip_nce + clip_trip + frame_nce_w * frame_nce + frame_trip

* clip_nce: InfoNCE both ways on the (Nq, B) dot-product maxima (prvr.losses.nce_loss: the
  release's clip_nce);
* clip_trip: hinge triplets on the (Nq, B) cosine maxima (prvr.losses.triplet_loss: the
  release's get_clip_triplet_loss, same candidate pools and uniform draws);
* frame_nce: on the (Nq, Nq) query x query dot products S: mean over i of
  logsumexp(row i and column i of S, 2 Nq entries, S[i, i] counted twice) - S[i, i];
* frame_trip: on the (Nq, Nq) cosines, the diagonal positive against a negative drawn the
  same way in both directions (row i: a column; column i: a row), ranked by score and drawn
  uniformly among all Nq - 1 others, or among the first hard_pool_size with hard negatives
  (the release's get_frame_trip_loss; unlike the clip triplet, the column direction also draws
  from the pool instead of taking the hardest).

Random draws (prvr.losses.uniform_ranks on `generator`), in order: clip triplet (Nq, then B in
random mode), frame rows (Nq), frame columns (Nq).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ...losses import nce_loss, triplet_loss, uniform_ranks
from ..base import TrainOutput
from .model import MSSLConfig

TERMS = ("clip_nce", "clip_trip", "frame_nce", "frame_trip")


def frame_nce_loss(scores: Tensor) -> Tensor:
    """mean_i logsumexp([S[i, :], S[:, i]]) - S[i, i] on a square (Nq, Nq) matrix."""
    both = torch.cat([scores, scores.t()], dim=1)                     # (Nq, 2 Nq)
    return (torch.logsumexp(both, dim=1) - scores.diagonal()).mean()


def _diagonal_hinge(scores: Tensor, margin: float, hard_negatives: bool, hard_pool_size: int,
                    generator: torch.Generator | None) -> Tensor:
    """sum_i max(0, m + S[i, neg(i)] - S[i, i]) / n, neg(i) drawn among row i's other entries
    ranked by (detached) score: uniformly among all, or among the first hard_pool_size."""
    n = scores.shape[0]
    if n < 2:
        return scores.sum() * 0.0
    rows = torch.arange(n, device=scores.device)
    masked = scores.detach().clone()
    masked[rows, rows] = float("inf")  # the positive ranks first
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    pool = min(hard_pool_size, n - 1) if hard_negatives else n - 1
    rank = 1 + uniform_ranks(torch.full((n,), pool, dtype=torch.long, device=scores.device), generator)
    neg = order.gather(1, rank.unsqueeze(1)).squeeze(1)
    return (margin + scores[rows, neg] - scores.diagonal()).clamp(min=0).sum() / n


def frame_triplet_loss(scores: Tensor, margin: float, hard_negatives: bool, hard_pool_size: int = 20,
                       generator: torch.Generator | None = None) -> Tensor:
    """Hinge triplets on a square (Nq, Nq) cosine matrix with positives on the diagonal:
    rows (query -> other queries' frame features), then columns (feature -> other queries)."""
    return (_diagonal_hinge(scores, margin, hard_negatives, hard_pool_size, generator)
            + _diagonal_hinge(scores.t(), margin, hard_negatives, hard_pool_size, generator))


class MSSLLoss(nn.Module):
    """forward(out, labels, hard_negatives, generator, local) -> {TERMS..., "total"}."""

    terms = TERMS

    def __init__(self, cfg: MSSLConfig):
        super().__init__()
        self.margin, self.hard_pool_size = float(cfg.margin), int(cfg.hard_pool_size)
        self.weights = {"clip_nce": float(cfg.clip_nce), "frame_nce": float(cfg.frame_nce)}

    def extra_repr(self) -> str:
        return f"margin={self.margin}, hard_pool_size={self.hard_pool_size}, weights={self.weights}"

    def local_sums(self, out: TrainOutput, labels: Tensor) -> dict[str, tuple[Tensor, int]]:
        return {}

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        s = out.scores
        labels = labels.to(s["clip"].device)
        n_q, n_v = s["clip"].shape
        expect = {"clip_raw": (n_q, n_v), "frame": (n_q, n_q), "frame_raw": (n_q, n_q)}
        for name, shape in expect.items():
            if tuple(s[name].shape) != shape:
                raise ValueError(f"scores['{name}']: expected shape {shape}, got {tuple(s[name].shape)}")
        hard, m, pool = bool(hard_negatives), self.margin, self.hard_pool_size
        terms = {
            "clip_nce": nce_loss(s["clip_raw"], labels),
            "clip_trip": triplet_loss(s["clip"], labels, m, hard, pool, generator),
            "frame_nce": frame_nce_loss(s["frame_raw"]),
            "frame_trip": frame_triplet_loss(s["frame"], m, hard, pool, generator),
        }
        w = self.weights
        terms["total"] = (w["clip_nce"] * terms["clip_nce"] + terms["clip_trip"]
                          + w["frame_nce"] * terms["frame_nce"] + terms["frame_trip"])
        return terms
