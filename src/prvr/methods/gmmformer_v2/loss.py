"""GMMFormer v2's objective (docs/gmmformer_v2.md), one vectorised module:

    total = clip_nce_w * clip_nce + clip_trip + frame_nce_w * frame_nce + frame_trip
            + qdl_w * qdl + oml_w * oml

NCE on the dot-product maxima, triplets on the cosine maxima (the release's negative sampling),
the query-diverse loss and the optimal-matching loss (a Hungarian matching of each video's
queries to its clips) on the second query encoding, as the release feeds them.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ...losses import nce_loss, oml_from_matching, optimal_matching, query_diverse_loss, triplet_loss
from ..base import TrainOutput
from .model import GMMFormerConfig

TERMS = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "oml")


def _loss_query(out: TrainOutput) -> Tensor:
    """The queries QDL and OML use: the second encoding in training, else the scoring one."""
    return out.queries.get("query_aux", out.queries["query"])


class GMMFormerLoss(nn.Module):
    """forward(out, labels, hard_negatives, generator, local) -> {TERMS..., "total"}.

    ``local["oml"]``, when given, is a precomputed (sum of matched cosines, count) (combined over
    ranks by a distributed caller); otherwise the matching runs on ``out``. Random draws (in
    order): clip triplet, then frame triplet.
    """

    terms = TERMS

    def __init__(self, cfg: GMMFormerConfig):
        super().__init__()
        self.margin, self.hard_pool_size = float(cfg.margin), int(cfg.hard_pool_size)
        self.weights = {"clip_nce": cfg.clip_nce, "frame_nce": cfg.frame_nce, "qdl": cfg.qdl,
                        "oml": cfg.oml}
        self.neg_factor = (cfg.qdl_delta, cfg.qdl_alpha, cfg.qdl_lambda)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, weights={self.weights}, neg_factor={self.neg_factor}"

    def local_sums(self, out: TrainOutput, labels: Tensor) -> dict[str, tuple[Tensor, int]]:
        return {"oml": optimal_matching(_loss_query(out), out.videos.fixed["clips"], labels)}

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        labels = labels.to(out.scores["clip"].device)
        terms = base_terms(out, labels, hard_negatives, self.margin, self.hard_pool_size,
                           self.neg_factor, generator)
        matching = (local or {}).get("oml") or self.local_sums(out, labels)["oml"]
        terms["oml"] = oml_from_matching(*matching)
        terms["total"] = base_total(terms, self.weights) + self.weights["oml"] * terms["oml"]
        return terms


BASE_TERMS = TERMS[:5]


def base_terms(out: TrainOutput, labels: Tensor, hard_negatives: bool, margin: float, hard_pool_size: int,
               neg_factor: tuple, generator: torch.Generator | None) -> dict[str, Tensor]:
    """The terms of BASE_TERMS (unweighted) from the scores of `out` ((Nq, B) "clip", "clip_raw",
    "frame", "frame_raw") and its second query encoding. Draws: clip triplet, then frame."""
    s = out.scores
    n_q, n_v = s["clip"].shape
    for name in ("clip_raw", "frame", "frame_raw"):
        if tuple(s[name].shape) != (n_q, n_v):
            raise ValueError(f"scores['{name}']: expected shape {(n_q, n_v)}, got {tuple(s[name].shape)}")
    hard, m, pool = bool(hard_negatives), margin, hard_pool_size
    return {
        "clip_nce": nce_loss(s["clip_raw"], labels),
        "clip_trip": triplet_loss(s["clip"], labels, m, hard, pool, generator),
        "frame_nce": nce_loss(s["frame_raw"], labels),
        "frame_trip": triplet_loss(s["frame"], labels, m, hard, pool, generator),
        "qdl": query_diverse_loss(_loss_query(out), labels, neg_factor),
    }


def base_total(terms: Mapping[str, Tensor], w: Mapping[str, float]) -> Tensor:
    """clip_nce_w * clip_nce + clip_trip + frame_nce_w * frame_nce + frame_trip + qdl_w * qdl."""
    return (w["clip_nce"] * terms["clip_nce"] + terms["clip_trip"]
            + w["frame_nce"] * terms["frame_nce"] + terms["frame_trip"] + w["qdl"] * terms["qdl"])
