"""The CPU fast path of the methods' networks.

Each method with a fast path has a module here, named after the method, whose `build_model(cfg)`
returns the method's reference network with its modules switched to subclasses that compute
the same function on packed real tokens (prvr.backends.cpu.kernels). The subclasses add no
parameters or buffers, so the state dict, the initial weights for a seed, the release mappings
and the optimiser groups are the reference network's. Methods without a module here (meanpool)
run their reference network on every backend.

`kernels` holds the speed-only pieces (packing, fused dropout nodes, the OpenBLAS matmuls);
`layers` the packed versions of the shared layers of prvr.methods.layers.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn


def switch_modules(model: nn.Module, table: Mapping[type, type]) -> nn.Module:
    """Switch every submodule whose class is a key of `table` to its fast subclass, in place.

    The fast class subclasses the reference class and only overrides `forward` (and helpers),
    so parameters, buffers and hooks stay exactly as the reference built them."""
    for module in model.modules():
        fast = table.get(type(module))
        if fast is not None:
            if not issubclass(fast, type(module)):
                raise TypeError(f"{fast.__name__} does not subclass {type(module).__name__}")
            module.__class__ = fast
    return model
