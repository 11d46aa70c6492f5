"""Holmes-DQ's objective: Holmes' (prvr.methods.holmes.loss), on the token-level frame scores,
plus the release's evidence-consistency term:

    total = Holmes' total + edl_dc_w * edl_consistency

edl_consistency (the release's get_dc_loss over the frame and clip evidence): for each pair of
views, the total-variation distance of their expected class probabilities alpha / S, times both
views' belief mass (1 - K / S), summed over the pairs and averaged over the queries. Its weight
is 0 in the only published recipe (TVR), so it is logged but does not train.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..base import TrainOutput
from ..holmes.evidence import evidence
from ..holmes.loss import TERMS as HOLMES_TERMS, HolmesLoss
from .model import HolmesDQConfig

TERMS = HOLMES_TERMS + ("edl_consistency",)


def evidence_consistency(alphas: list[Tensor]) -> Tensor:
    """alphas: V Dirichlet parameter matrices (Nq, K) -> 0-dim: mean over queries of
    sum over view pairs (i, v) of TV(p_i, p_v) / (V - 1) * (1 - u_i) * (1 - u_v)."""
    a = torch.stack(alphas).float()                         # (V, Nq, K)
    V, K = a.shape[0], a.shape[-1]
    S = a.sum(-1, keepdim=True)
    p, u = a / S, (K / S).squeeze(-1)                       # (V, Nq, K), (V, Nq)
    tv = (p[:, None] - p[None]).abs().sum(-1) / 2 / (V - 1)  # (V, V, Nq)
    belief = (1 - u)[:, None] * (1 - u)[None]               # (V, V, Nq)
    return (tv * belief).sum((0, 1)).mean()


class HolmesDQLoss(HolmesLoss):
    """forward(out, labels, hard_negatives, generator) -> {TERMS..., "total"}."""

    terms = TERMS

    def __init__(self, cfg: HolmesDQConfig):
        super().__init__(cfg)
        self.weights["edl_dc"] = cfg.edl_dc

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        terms = super().forward(out, labels, hard_negatives, generator, local)
        s, tau = out.scores, self.cfg.edl_tau
        terms["edl_consistency"] = evidence_consistency([evidence(s["frame"], tau) + 1,
                                                         evidence(s["clip"], tau) + 1])
        terms["total"] = terms["total"] + self.weights["edl_dc"] * terms["edl_consistency"]
        return terms
