"""Holmes (Li et al., "Revisiting Uncertainty: On Evidential Learning for Partially Relevant
Video Retrieval", ICML 2026, arXiv 2605.06083; github lijun2005/ICML26-Holmes). docs/holmes.md."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..base import Method
from .loss import HolmesLoss
from .model import Holmes, HolmesConfig

__all__ = ["METHOD", "Holmes", "HolmesConfig", "HolmesLoss"]


class HolmesMethod(Method):
    name = "holmes"
    title = "Holmes"
    config_class, model_class, loss_class = HolmesConfig, Holmes, HolmesLoss
    release = "github.com/lijun2005/ICML26-Holmes"
    # test split, as the release's README reports them (its logs show each to be the best
    # validation epoch; docs/holmes.md)
    paper = {
        "tvr": {"r1": 17.3, "r5": 39.0, "r10": 50.4, "r100": 87.4, "sumr": 194.2},
        "act": {"r1": 9.3, "r5": 27.8, "r10": 40.5, "r100": 79.1, "sumr": 156.8},
        "cha": {"r1": 2.3, "r5": 9.5, "r10": 15.2, "r100": 53.6, "sumr": 80.6},
    }

    paper_selection = "best_validation"

    def start_epoch(self, model: nn.Module, loss: nn.Module, epoch: int) -> dict[str, float]:
        """The warm-up switch: from epoch warmup_epoch on, the intra-video term and the label
        smoothing of ambiguous queries are on."""
        loss.after_warmup = epoch >= int(loss.cfg.warmup_epoch)
        return {"after_warmup": float(loss.after_warmup)}

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        from .release import is_release_checkpoint

        return is_release_checkpoint(ckpt)

    def load_release(self, ckpt: Mapping[str, Any], base: Any):
        from .release import load_release

        return load_release(ckpt, base)


METHOD = HolmesMethod()
