"""GMMFormer v1's objective (the release's src/Losses/loss.py), one vectorised module:

    total = clip_nce_w * clip_nce + clip_trip + frame_nce_w * frame_nce + frame_trip + qdl_w * qdl

NCE on the dot-product scores, triplets on the cosine scores (the release's negative
sampling, prvr.losses), and v1's query-diverse loss on the second query encoding.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ...losses import nce_loss, triplet_loss
from ..base import TrainOutput
from .model import GMMFormerV1Config

TERMS = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl")


def query_diverse_loss_v1(query: Tensor, labels: Tensor, margin: float, alpha: float) -> Tensor:
    """v1's QDL: with c = cos(q_i, q_j), for every query j
    ``log(1 + sum_{i != j, same video} exp(alpha * (c_ij + margin)))``, summed and divided by
    Nq. (The release builds the same-video mask from each video's first and last query
    index, i.e. assumes a video's queries are contiguous, as its loader makes them; here the
    mask comes from the labels, which is the same for contiguous labels.)"""
    n_q = query.shape[0]
    x = torch.nn.functional.normalize(query, dim=-1)
    z = alpha * (x @ x.t() + margin)
    pair = labels.unsqueeze(0) == labels.unsqueeze(1)
    pair &= ~torch.eye(n_q, dtype=torch.bool, device=query.device)
    z = z.masked_fill(~pair, float("-inf"))
    z = torch.cat([z, z.new_zeros(1, n_q)])          # the "1 +": log(exp(0) + sum exp(z))
    return torch.logsumexp(z, dim=0).sum() / n_q


class GMMFormerV1Loss(nn.Module):
    """forward(out, labels, hard_negatives, generator) -> {TERMS..., "total"}.

    Random draws (in order): clip triplet, then frame triplet (prvr.losses.triplet_loss).
    """

    terms = TERMS

    def __init__(self, cfg: GMMFormerV1Config):
        super().__init__()
        self.margin, self.hard_pool_size = float(cfg.margin), int(cfg.hard_pool_size)
        self.weights = {"clip_nce": float(cfg.clip_nce), "frame_nce": float(cfg.frame_nce),
                        "qdl": float(cfg.qdl)}
        self.qdl_margin, self.qdl_alpha = float(cfg.qdl_margin), float(cfg.qdl_alpha)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, weights={self.weights}, qdl_margin={self.qdl_margin}, "
                f"qdl_alpha={self.qdl_alpha}")

    def local_sums(self, out: TrainOutput, labels: Tensor) -> dict[str, tuple[Tensor, int]]:
        return {}

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        s = out.scores
        labels = labels.to(s["clip"].device).long()
        n_q, n_v = s["clip"].shape
        for name in ("clip_raw", "frame", "frame_raw"):
            if tuple(s[name].shape) != (n_q, n_v):
                raise ValueError(f"scores['{name}']: expected shape {(n_q, n_v)}, got {tuple(s[name].shape)}")
        hard, m, pool = bool(hard_negatives), self.margin, self.hard_pool_size
        query = out.queries.get("query_aux", out.queries["query"])
        terms = {
            "clip_nce": nce_loss(s["clip_raw"], labels),
            "clip_trip": triplet_loss(s["clip"], labels, m, hard, pool, generator),
            "frame_nce": nce_loss(s["frame_raw"], labels),
            "frame_trip": triplet_loss(s["frame"], labels, m, hard, pool, generator),
            "qdl": query_diverse_loss_v1(query, labels, self.qdl_margin, self.qdl_alpha),
        }
        w = self.weights
        terms["total"] = (w["clip_nce"] * terms["clip_nce"] + terms["clip_trip"]
                          + w["frame_nce"] * terms["frame_nce"] + terms["frame_trip"]
                          + w["qdl"] * terms["qdl"])
        return terms
