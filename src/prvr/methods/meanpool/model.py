"""The mean-pool floor's config and network: mean-pooled clip features and mean-pooled query
tokens, each through one linear layer, scored by cosine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ConfigFromDict, TrainOutput, VideoEncoding


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

    # the search contract: one vector per video, and no moment finer than the whole video
    def index_vectors(self, videos: VideoEncoding) -> tuple[Tensor, Tensor]:
        v = F.normalize(videos.fixed["video"].float(), dim=-1).unsqueeze(1)          # (B, 1, H)
        return v, torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)

    def index_queries(self, query: Tensor) -> Tensor:
        return F.normalize(query.float(), dim=-1)

    def localize(self, query: Tensor, videos: VideoEncoding, n_frames: Tensor) -> tuple[Tensor, Tensor]:
        end = n_frames.to(query.device)[None, :].expand(query.shape[0], -1)
        return torch.zeros_like(end), end.clone()

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        queries = {"query": self.encode_queries(batch)}
        videos = self.encode_videos(batch)
        return TrainOutput(queries, videos, self.train_scores(queries, videos))
