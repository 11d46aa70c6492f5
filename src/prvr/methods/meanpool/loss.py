"""The mean-pool floor's objective: symmetric InfoNCE on cosine / temperature."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...losses import nce_loss
from ..base import TrainOutput
from .model import MeanPoolConfig


class MeanPoolLoss(nn.Module):
    """Symmetric InfoNCE (query -> video and video -> its queries) on cosine / temperature."""

    terms = ("nce",)

    def __init__(self, cfg: MeanPoolConfig):
        super().__init__()
        self.temperature = float(cfg.temperature)

    def local_sums(self, out: TrainOutput, labels: Tensor) -> dict:
        return {}

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool = False,
                generator: torch.Generator | None = None, local=None) -> dict[str, Tensor]:
        nce = nce_loss(out.scores["score"] / self.temperature, labels.to(out.scores["score"].device))
        return {"nce": nce, "total": nce}
