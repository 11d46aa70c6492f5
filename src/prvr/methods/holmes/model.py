"""Holmes (ICML 2026, arXiv 2605.06083): the network is GMMFormer v2's encoder with two changes
(docs/holmes.md):

* the Gaussian widths of the eight branches are global, 0.5, 1, 2, 4, 8, 16 and 32;
* the weight token that mixes the branches is not learned: it is each video's mean of the
  branch outputs over the branches and over all positions of the stream, the padded frame slots
  included. Every video's frames are therefore padded to max_frames (128) slots before encoding,
  as the release does, so a video's encoding never depends on the other videos of its batch.

Scores are v2's (max cosine over clips and over frames, zero padding a frame candidate), mixed
clip_scale_w / frame_scale_w (0.6 / 0.4 in every published recipe). The objective is
prvr.methods.holmes.loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..gmmformer_v2.model import GMMFormer, GMMFormerBaseConfig

HOLMES_WIDTHS = (None, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


@dataclass
class HolmesConfig(GMMFormerBaseConfig):
    widths: tuple = HOLMES_WIDTHS
    clip_scale_w: float = 0.6
    frame_scale_w: float = 0.4
    # the evidential terms (the release's loss_factor[3], [4]) and their temperatures
    edl: float = 0.2
    edl_intra: float = 0.8
    edl_tau: float = 0.05
    edl_intra_tau: float = 0.06
    # partial optimal transport: dustbin at this quantile of a video's query-clip similarities,
    # Sinkhorn on similarities / pot_scale
    pot_dustbin_quantile: float = 0.3
    pot_scale: float = 0.1
    sinkhorn_iters: int = 50
    # the two-phase schedule: from this epoch (counted from 0) the intra-video term and the
    # label smoothing of ambiguous queries are on
    warmup_epoch: int = 20
    division_beta: float = 0.3
    smooth_beta: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("edl_tau", "edl_intra_tau", "pot_scale"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"{key}: expected > 0, got {getattr(self, key)}")
        if not 0.0 < float(self.pot_dustbin_quantile) <= 1.0:
            raise ValueError(f"pot_dustbin_quantile: expected in (0, 1], got {self.pot_dustbin_quantile}")
        if int(self.sinkhorn_iters) < 1:
            raise ValueError(f"sinkhorn_iters: expected >= 1, got {self.sinkhorn_iters}")


class Holmes(GMMFormer):
    """GMMFormer v2's network with Holmes' widths and the per-video mean weight token."""

    learned_token = False

    def __init__(self, cfg: HolmesConfig | None = None):
        super().__init__(cfg or HolmesConfig())
