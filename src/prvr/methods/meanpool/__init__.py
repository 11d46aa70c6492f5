"""The floor every PRVR table should show: mean-pooled clip features and mean-pooled query
tokens, each through one linear layer, scored by cosine and trained with the symmetric NCE
loss. No temporal modelling at all, so whatever a method gains above it is what its temporal
modelling buys. It is also the smallest example of a method behind the contract
(prvr.methods.base): one package with a config and network (model.py), a loss (loss.py) and
its Method (here).
"""
from __future__ import annotations

from torch import nn

from ..base import Method
from .loss import MeanPoolLoss
from .model import MeanPool, MeanPoolConfig


class MeanPoolMethod(Method):
    name = "meanpool"
    title = "mean-pool floor"
    config_class, model_class, loss_class = MeanPoolConfig, MeanPool, MeanPoolLoss
    release = "(none: the floor baseline of this project)"

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


METHOD = MeanPoolMethod()
__all__ = ["METHOD", "MeanPool", "MeanPoolConfig", "MeanPoolLoss"]
