"""Holmes with the dual-query branch (the release's multisrc/; github lijun2005/ICML26-Holmes),
the token-level query branch it takes from RAL. docs/holmes.md."""
from __future__ import annotations

from typing import Any, Mapping

from ..holmes import HolmesMethod
from .loss import HolmesDQLoss
from .model import HolmesDQ, HolmesDQConfig

__all__ = ["METHOD", "HolmesDQ", "HolmesDQConfig", "HolmesDQLoss"]


class HolmesDQMethod(HolmesMethod):
    """Holmes' schedule (the warm-up hook) and paper selection, its own network and release."""

    name = "holmes_dq"
    title = "Holmes (dual query)"
    config_class, model_class, loss_class = HolmesDQConfig, HolmesDQ, HolmesDQLoss
    # test split, the release README's "TVR (multi)" row (its log's best validation epoch);
    # no other dataset is published
    paper = {"tvr": {"r1": 18.4, "r5": 40.7, "r10": 52.0, "r100": 87.5, "sumr": 198.6}}

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        from .release import is_release_checkpoint

        return is_release_checkpoint(ckpt)

    def load_release(self, ckpt: Mapping[str, Any], base: Any):
        from .release import load_release

        return load_release(ckpt, base)


METHOD = HolmesDQMethod()
