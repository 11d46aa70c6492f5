"""RAL's objective (docs/ral.md), one vectorised module:

    total = GMMFormer v2's total (clip_nce, clip_trip, frame_nce, frame_trip, qdl, oml)
            + mil_w * mil + vib_w * vib

with the frame-scale scores the token-level ones (prvr.methods.gmmformer_v2.token_queries);
mil is the proxy-matching loss L_PM and vib the distribution-alignment loss L_DA over the
per-video Gaussian samples of the training forward (prvr.methods.ral.prob). The weights are
the ones the release's loss hard-codes (4e-3 and 2.5e-4).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..base import TrainOutput
from ..gmmformer_v2.loss import TERMS as V2_TERMS, GMMFormerLoss
from .model import RALConfig
from .prob import distribution_alignment_loss, proxy_matching_loss

TERMS = V2_TERMS + ("mil", "vib")


class RALLoss(GMMFormerLoss):
    """forward(out, labels, hard_negatives, generator, local) -> {TERMS..., "total"}.
    Random draws (in order): clip triplet, then frame triplet (the Gaussian draws are the
    forward's)."""

    terms = TERMS

    def __init__(self, cfg: RALConfig):
        super().__init__(cfg)
        self.weights.update({"mil": cfg.mil, "vib": cfg.vib})

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        terms = super().forward(out, labels, hard_negatives, generator, local)
        g = out.videos.fixed
        terms["mil"] = proxy_matching_loss(g["video_samples"], g["text_samples"])
        terms["vib"] = distribution_alignment_loss(g["video_samples"], g["video_logsigma"],
                                                   g["text_samples"], g["text_logsigma"])
        terms["total"] = terms["total"] + self.weights["mil"] * terms["mil"] + self.weights["vib"] * terms["vib"]
        return terms
