"""RAL (Zhang et al., "Enhancing Partially Relevant Video Retrieval with Robust Alignment
Learning", EMNLP 2025, arXiv 2509.01383; github zhanglong-ustc/RAL-PRVR) on GMMFormer v2.
docs/ral.md."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

from ..base import Method
from .loss import RALLoss
from .model import RAL, RALConfig

__all__ = ["METHOD", "RAL", "RALConfig", "RALLoss"]


class RALMethod(Method):
    name = "ral"
    title = "RAL (on GMMFormer v2)"
    config_class, model_class, loss_class = RALConfig, RAL, RALLoss
    release = "github.com/zhanglong-ustc/RAL-PRVR"
    # test SumR as the paper's table reports it (the repository shows its rows only in a
    # figure, so the per-recall values are not given here); no Charades row (docs/ral.md)
    paper = {"tvr": {"sumr": 198.8}, "act": {"sumr": 156.1}}
    # its BertAdam pickles a schedule object in the optimiser state (read as a plain dict)
    release_globals = ((OrderedDict, "Opts.optimization.WarmupLinearSchedule"),)

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        from .release import is_release_checkpoint

        return is_release_checkpoint(ckpt)

    def load_release(self, ckpt: Mapping[str, Any], base: Any):
        from .release import load_release

        return load_release(ckpt, base)


METHOD = RALMethod()
