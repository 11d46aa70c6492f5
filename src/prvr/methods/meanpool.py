"""The floor every PRVR table should show: mean-pooled clip features and mean-pooled query
tokens, each through one linear layer, scored by cosine and trained with the symmetric NCE
loss. No temporal modelling at all, so whatever a method gains above it is what its temporal
modelling buys. It is also the smallest example of a method behind the contract
(prvr.methods.base): one module, a config, a network, a loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import nce_loss
from .base import ConfigFromDict, Method, TrainOutput, VideoEncoding


@dataclass
class MeanPoolConfig(ConfigFromDict):
    visual_dim: int = 3072
    text_dim: int = 768
    hidden_size: int = 384
    max_query_len: int = 30
    max_frames: int = 128
    n_clips: int = 32
    temperature: float = 0.05   # NCE on cosine / temperature
    init_std: float = 0.02



class MeanPool(nn.Module):
    def __init__(self, cfg: MeanPoolConfig):
        super().__init__()
        self.cfg = cfg
        self.video_proj = nn.Linear(cfg.visual_dim, cfg.hidden_size)
        self.query_proj = nn.Linear(cfg.text_dim, cfg.hidden_size)
        for lin in (self.video_proj, self.query_proj):
            nn.init.normal_(lin.weight, 0.0, cfg.init_std)
            nn.init.zeros_(lin.bias)

    def encode_queries(self, batch: Mapping[str, Any]) -> Tensor:
        mask = batch["query_mask"].to(batch["query_feats"].dtype).unsqueeze(-1)   # (Nq, Lq, 1)
        mean = (batch["query_feats"] * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (Nq, Dt)
        return self.query_proj(mean)                                              # (Nq, H)

    def encode_videos(self, batch: Mapping[str, Any]) -> VideoEncoding:
        return VideoEncoding({"video": self.video_proj(batch["clip_feats"].mean(1))})  # (B, H)

    def score(self, query: Tensor, videos: VideoEncoding) -> dict[str, Tensor]:
        cos = F.normalize(query, dim=-1) @ F.normalize(videos.fixed["video"], dim=-1).t()
        return {"score": cos}

    def train_scores(self, queries: Mapping[str, Tensor], videos: VideoEncoding) -> dict[str, Tensor]:
        return self.score(queries["query"], videos)

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        queries = {"query": self.encode_queries(batch)}
        videos = self.encode_videos(batch)
        return TrainOutput(queries, videos, self.train_scores(queries, videos))


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


class MeanPoolMethod(Method):
    name = "meanpool"
    title = "mean-pool floor"
    config_class, model_class, loss_class = MeanPoolConfig, MeanPool, MeanPoolLoss
    release = "(none: the floor baseline of this project)"

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


METHOD = MeanPoolMethod()
__all__ = ["METHOD", "MeanPool", "MeanPoolConfig", "MeanPoolLoss"]
