"""GMMFormer v2 (Wang et al., arXiv 2405.13824; github huangmozhi9527/GMMFormer_v2)."""
from __future__ import annotations

from typing import Any, Mapping

from ..base import Method
from .loss import GMMFormerLoss
from .model import GMMFormer, GMMFormerConfig

__all__ = ["METHOD", "GMMFormer", "GMMFormerConfig", "GMMFormerLoss"]


class GMMFormerV2(Method):
    name = "gmmformer_v2"
    title = "GMMFormer v2"
    config_class, model_class, loss_class = GMMFormerConfig, GMMFormer, GMMFormerLoss
    release = "github.com/huangmozhi9527/GMMFormer_v2"
    # test split, as the paper reports them (docs/gmmformer_v2.md)
    paper = {
        "tvr": {"r1": 16.2, "r5": 37.6, "r10": 48.8, "r100": 86.4, "sumr": 189.1},
        "act": {"r1": 8.9, "r5": 27.1, "r10": 40.2, "r100": 78.7, "sumr": 154.9},
        "cha": {"r1": 2.5, "r5": 8.6, "r10": 13.9, "r100": 53.2, "sumr": 78.2},
    }

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        from .release import is_release_state_dict

        return all(k in ckpt for k in ("config", "state_dict")) and is_release_state_dict(ckpt["state_dict"])

    def load_release(self, ckpt: Mapping[str, Any], base: Any):
        from .release import load_release

        return load_release(ckpt, base)


METHOD = GMMFormerV2()
