"""RAL (EMNLP 2025, arXiv 2509.01383) on GMMFormer v2: the network (docs/ral.md).

GMMFormer v2's network (its widths, its learned weight token, its clip scale) plus:

* the token-level frame branch (prvr.methods.gmmformer_v2.token_queries): a second query
  encoder keeps every token, word confidences weight them, and the frame-scale score is
  sum_t w_t max_f cos(token_t, frame_f); the query encoding is a QueryEncoding;
* training only: Gaussian embeddings of each video's frames and of its support set (the
  tokens of all its queries), `n_samples` draws each (prvr.methods.ral.prob), which feed the
  proxy-matching and distribution-alignment terms of prvr.methods.ral.loss.

Release quirks, on by default and each with a switch (docs/ral.md):
* `support_slots` 26: the support set is padded to Lq x 26 rows and pooled without a mask
  (every position of each query, padding included, and the zero rows); 0 pools the real
  tokens only;
* `pad_frames_to_max` true: frames count as padded to max_frames (128): the video's Gaussian
  pools over 128 slots, and 0 is among the frame candidates of a shorter video; false uses the
  real frames only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ..base import TrainOutput
from ..gmmformer_v2.model import GMMFormer, GMMFormerConfig
from ..gmmformer_v2.token_queries import TokenQueries, TokenQueryBranch
from .prob import GaussianEmbedding, masked_mean, sample, support_sets


@dataclass
class RALConfig(GMMFormerConfig):
    clip_scale_w: float = 0.5
    frame_scale_w: float = 0.5
    n_samples: int = 6               # draws from each Gaussian (the release's n_video/text_samples)
    mil: float = 4.0e-3              # proxy-matching term (L_PM) weight, fixed in the release's loss
    vib: float = 2.5e-4              # distribution-alignment term (L_DA) weight, idem
    support_slots: int = 26          # quirk: support set padded to Lq x this; 0: real tokens only
    pad_frames_to_max: bool = True   # quirk: frames count as padded to max_frames

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.n_samples) < 1:
            raise ValueError(f"n_samples: expected >= 1, got {self.n_samples}")
        if int(self.support_slots) < 0:
            raise ValueError(f"support_slots: expected >= 0 (0: no padding), got {self.support_slots}")


class RAL(TokenQueries, GMMFormer):
    """GMMFormer v2 + the token-level frame branch + the training-only Gaussian embeddings."""

    def __init__(self, cfg: RALConfig | None = None):
        cfg = cfg or RALConfig()
        super().__init__(cfg)
        H = cfg.hidden_size
        self.token_branch = TokenQueryBranch(cfg.text_dim, H, cfg.n_heads, cfg.input_drop, cfg.drop)
        self.video_gaussian = GaussianEmbedding(H)
        self.text_gaussian = GaussianEmbedding(H)
        self.frame_zero_candidate = bool(cfg.pad_frames_to_max)
        self.reset_parameters()   # the release initialises every module alike, these included

    def noise(self, n_videos: int, like: Tensor) -> Tensor:
        """(n_videos, n_samples, H) standard normal draws (the global generator, as the release);
        a test or a parity check replaces this to pin them."""
        return torch.randn(n_videos, int(self.cfg.n_samples), like.shape[-1], dtype=like.dtype,
                           device=like.device)

    def gaussians(self, queries: Mapping[str, Tensor], videos, labels: Tensor) -> dict[str, Tensor]:
        """Per video: the support set's and the frames' Gaussian (mean, logsigma) and samples."""
        cfg = self.cfg
        B = len(videos)
        tokens, mask = queries["tokens"], queries["token_mask"]
        L = tokens.shape[1]
        rows, valid, real = support_sets(tokens, mask, labels, B)                # (B, S, H)
        n_rows = valid.sum(1)
        if not cfg.support_slots:
            text_valid, text_zero = real, torch.zeros_like(n_rows)
        else:
            slots = int(cfg.support_slots) * L
            if int(n_rows.max()) > slots:
                raise ValueError(f"a video has {int(n_rows.max()) // L} queries; support_slots "
                                 f"{cfg.support_slots} holds at most {cfg.support_slots}")
            text_valid, text_zero = valid, slots - n_rows
        text_mean, text_logsigma = self.text_gaussian(masked_mean(rows, real), rows, text_valid, text_zero)
        text_samples = sample(text_mean, text_logsigma, self.noise(B, text_mean))

        frames, frame_mask = videos.seq, videos.seq_mask
        n_frames = frame_mask.sum(1)
        normed = torch.nn.functional.normalize(frames, dim=-1) * frame_mask.unsqueeze(-1)
        pooled = torch.nn.functional.normalize(normed.sum(1) / n_frames.clamp(min=1).unsqueeze(-1), dim=-1)
        zero = (cfg.max_frames - n_frames).clamp(min=0) if cfg.pad_frames_to_max else torch.zeros_like(n_frames)
        video_mean, video_logsigma = self.video_gaussian(pooled, frames, frame_mask, zero)
        video_samples = sample(video_mean, video_logsigma, self.noise(B, video_mean))
        return {"text_samples": text_samples, "text_logsigma": text_logsigma,
                "video_samples": video_samples, "video_logsigma": video_logsigma}

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        """Training forward, in the release's order: videos; the pooled query and the tokens;
        the support-set then the video Gaussian (their draws); the second pooled encoding
        (queries["query_aux"], for the query-diverse and matching terms). The Gaussians' tensors
        are per video: videos.fixed["text_samples"], ... (gathered like the clips under DDP)."""
        videos = self.encode_videos(batch)
        queries = {"query": self.encode_query_feats(batch["query_feats"], batch["query_mask"])}
        queries.update(self.token_train_queries(batch))
        videos.fixed.update(self.gaussians(queries, videos, batch["query_labels"]))
        if self.training:
            queries["query_aux"] = self.encode_query_feats(batch["query_feats"], batch["query_mask"])
        return TrainOutput(queries, videos, self.train_scores(queries, videos))
