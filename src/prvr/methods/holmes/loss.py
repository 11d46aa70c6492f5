"""Holmes' objective (docs/holmes.md), one vectorised module:

    total = clip_nce_w * clip_nce + clip_trip + frame_nce_w * frame_nce + frame_trip + qdl_w * qdl
            + edl_w * (edl_frame + edl_clip + edl_fused) + edl_intra_w * edl_intra

The first five are GMMFormer v2's base terms (no optimal-matching term). The evidential terms:
edl_frame / edl_clip read the cosine scores of each view as Dirichlet evidence over the batch's
videos (temperature edl_tau); edl_fused is their Dempster-Shafer combination. edl_intra reads
each video's query-clip similarities as evidence over its clips (edl_intra_tau), against the
partial optimal transport plan as pseudo-labels (on the second query encoding).

Two phases, switched by the method's epoch hook (`after_warmup`): during the warm-up the EDL
targets are one-hot and edl_intra is 0; after it, ambiguous queries get smoothed targets
(prvr.methods.holmes.evidence.smoothed_targets) and edl_intra is on.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import TrainOutput
from ..gmmformer_v2.loss import BASE_TERMS, _loss_query, base_terms, base_total
from .evidence import dirichlet_mse, ds_combine, evidence, smoothed_targets
from .model import HolmesConfig
from .transport import dustbin_values, intra_video_similarity, partial_transport

TERMS = BASE_TERMS + ("edl_frame", "edl_clip", "edl_fused", "edl_intra")


class HolmesLoss(nn.Module):
    """forward(out, labels, hard_negatives, generator) -> {TERMS..., "total"}.
    Random draws (in order): clip triplet, then frame triplet."""

    terms = TERMS

    def __init__(self, cfg: HolmesConfig):
        super().__init__()
        self.cfg = cfg
        self.margin, self.hard_pool_size = float(cfg.margin), int(cfg.hard_pool_size)
        self.weights = {"clip_nce": cfg.clip_nce, "frame_nce": cfg.frame_nce, "qdl": cfg.qdl,
                        "edl": cfg.edl, "edl_intra": cfg.edl_intra}
        self.neg_factor = (cfg.qdl_delta, cfg.qdl_alpha, cfg.qdl_lambda)
        self.after_warmup = False

    def extra_repr(self) -> str:
        return f"margin={self.margin}, weights={self.weights}, after_warmup={self.after_warmup}"

    def local_sums(self, out: TrainOutput, labels: Tensor) -> dict[str, tuple[Tensor, int]]:
        return {}

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        s = out.scores
        labels = labels.to(s["clip"].device)
        terms = base_terms(out, labels, hard_negatives, self.margin, self.hard_pool_size,
                           self.neg_factor, generator)
        terms.update(self.inter_video(s["frame"], s["clip"], labels))
        terms["edl_intra"] = (self.intra_video(out.videos.fixed["clips"], _loss_query(out), labels)
                              if self.after_warmup else s["clip"].new_zeros((), dtype=torch.float32))
        w = self.weights
        terms["total"] = (base_total(terms, w)
                          + w["edl"] * (terms["edl_frame"] + terms["edl_clip"] + terms["edl_fused"])
                          + w["edl_intra"] * terms["edl_intra"])
        return terms

    def inter_video(self, frame: Tensor, clip: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """edl_frame, edl_clip, edl_fused: means over the queries, (Nq, B) cosine scores."""
        cfg = self.cfg
        frame_alpha = evidence(frame, cfg.edl_tau) + 1
        clip_alpha = evidence(clip, cfg.edl_tau) + 1
        if self.after_warmup:
            target = smoothed_targets(frame, clip, labels, frame_alpha, clip_alpha,
                                      cfg.division_beta, cfg.smooth_beta)
        else:
            target = F.one_hot(labels, frame.shape[1]).float()
        fused_alpha = ds_combine(frame_alpha, clip_alpha) + 1
        return {"edl_frame": dirichlet_mse(frame_alpha, target).mean(),
                "edl_clip": dirichlet_mse(clip_alpha, target).mean(),
                "edl_fused": dirichlet_mse(fused_alpha, target).mean()}

    def intra_video(self, clips: Tensor, query: Tensor, labels: Tensor) -> Tensor:
        """edl_intra: per video the mean over its queries of the Dirichlet loss of its scaled
        query-clip similarities against the transport plan; the mean over the videos that have
        queries."""
        cfg = self.cfg
        sim, mask = intra_video_similarity(clips, query, labels)                  # (B, Q, C), (B, Q)
        dustbin = dustbin_values(sim.detach(), mask, cfg.pot_dustbin_quantile)
        plan = partial_transport(sim.detach(), mask, dustbin, cfg.pot_scale, int(cfg.sinkhorn_iters))
        per_query = dirichlet_mse(evidence(sim, cfg.edl_intra_tau) + 1, plan) * mask   # (B, Q)
        count = mask.sum(1)
        per_video = per_query.sum(1) / count.clamp(min=1)
        has = (count > 0).to(per_video.dtype)
        return (per_video * has).sum() / has.sum().clamp(min=1)
