"""GMMFormer v1 (Wang et al., AAAI 2024; github huangmozhi9527/GMMFormer)."""
from __future__ import annotations

from typing import Any, Mapping

from ..base import Method
from .loss import GMMFormerV1Loss
from .model import GMMFormer, GMMFormerV1Config
from .release import RELEASE_GLOBALS

__all__ = ["METHOD", "GMMFormer", "GMMFormerV1Config", "GMMFormerV1Loss"]


class GMMFormerV1(Method):
    name = "gmmformer_v1"
    title = "GMMFormer v1"
    config_class, model_class, loss_class = GMMFormerV1Config, GMMFormer, GMMFormerV1Loss
    release = "github.com/huangmozhi9527/GMMFormer"
    # test split, as the paper (AAAI 2024) and the release's README report them
    paper = {
        "tvr": {"r1": 13.9, "r5": 33.3, "r10": 44.5, "r100": 84.9, "sumr": 176.6},
        "act": {"r1": 8.3, "r5": 24.9, "r10": 36.7, "r100": 76.1, "sumr": 146.0},
        "cha": {"r1": 2.1, "r5": 7.8, "r10": 12.5, "r100": 50.6, "sumr": 72.9},
    }
    release_globals = RELEASE_GLOBALS

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        from .release import is_release_state_dict

        return isinstance(ckpt, Mapping) and "config" in ckpt and is_release_state_dict(ckpt.get("state_dict"))

    def load_release(self, ckpt: Mapping[str, Any], base: Any):
        from .release import load_release

        return load_release(ckpt, base)


METHOD = GMMFormerV1()
