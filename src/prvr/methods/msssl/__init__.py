"""MS-SL (Dong et al., "Partially Relevant Video Retrieval", ACM MM 2022; github HuiGuanLab/ms-sl)."""
from __future__ import annotations

from typing import Any, Mapping

from ..base import Method
from .loss import MSSLLoss
from .model import MSSL, MSSLConfig
from .release import RELEASE_GLOBALS

__all__ = ["METHOD", "MSSL", "MSSLConfig", "MSSLLoss"]


class MSSLMethod(Method):
    name = "msssl"
    title = "MS-SL"
    config_class, model_class, loss_class = MSSLConfig, MSSL, MSSLLoss
    release = "github.com/HuiGuanLab/ms-sl"
    # test split, as the paper (and the release's README) report them
    paper = {
        "tvr": {"r1": 13.5, "r5": 32.1, "r10": 43.4, "r100": 83.4, "sumr": 172.3},
        "act": {"r1": 7.1, "r5": 22.5, "r10": 34.7, "r100": 75.8, "sumr": 140.1},
        "cha": {"r1": 1.8, "r5": 7.1, "r10": 11.8, "r100": 47.7, "sumr": 68.4},
    }
    release_globals = RELEASE_GLOBALS

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        from .release import is_release_checkpoint

        return is_release_checkpoint(ckpt)

    def load_release(self, ckpt: Mapping[str, Any], base: Any):
        from .release import load_release

        return load_release(ckpt, base)


METHOD = MSSLMethod()
