"""Holmes with the dual-query branch (the release's multisrc/, "TVR (multi)"): docs/holmes.md.

Holmes' network (its widths, its per-video mean weight token, frames padded to 128) with RAL's
token-level query branch (prvr.methods.gmmformer_v2.token_queries): the frame-scale scores, in
the ranking and in every term that reads them (NCE, triplet, the evidential terms), are the
token-level ones; the clip scale and the intra-video transport stay on the pooled query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..base import TrainOutput
from ..gmmformer_v2.token_queries import TokenQueries, TokenQueryBranch
from ..holmes.model import Holmes, HolmesConfig


@dataclass
class HolmesDQConfig(HolmesConfig):
    clip_scale_w: float = 0.5
    frame_scale_w: float = 0.5
    edl_dc: float = 0.0   # the clip/frame evidence-consistency term (the release's loss_factor[5])


class HolmesDQ(TokenQueries, Holmes):
    """Holmes + the token-level frame branch."""

    def __init__(self, cfg: HolmesDQConfig | None = None):
        cfg = cfg or HolmesDQConfig()
        super().__init__(cfg)
        self.token_branch = TokenQueryBranch(cfg.text_dim, cfg.hidden_size, cfg.n_heads, cfg.input_drop, cfg.drop)
        self.reset_parameters()

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        """Videos; the pooled query and the tokens; in training the second pooled encoding
        (queries["query_aux"], for the query-diverse and intra-video terms)."""
        videos = self.encode_videos(batch)
        queries = {"query": self.encode_query_feats(batch["query_feats"], batch["query_mask"])}
        queries.update(self.token_train_queries(batch))
        if self.training:
            queries["query_aux"] = self.encode_query_feats(batch["query_feats"], batch["query_mask"])
        return TrainOutput(queries, videos, self.train_scores(queries, videos))
