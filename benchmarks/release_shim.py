"""Make a public release's code importable on this machine, for the benchmarks that time it.

The releases import modules they never use on our paths (`ipdb`, plotting) and `easydict`,
and they call `.cuda()` unconditionally. `shim_missing` registers a stand-in module for each
missing name (with an attribute-access `EasyDict`, the only name the releases use of them);
`cuda_as_noop` makes `.cuda()` return its receiver when there is no CUDA. Nothing of the
releases lives here; the benchmarks import their code from the copy given on the command line.
"""
from __future__ import annotations

import sys
import types

import torch


class EasyDict(dict):
    """A dict whose keys are also attributes (the one thing the releases use of easydict)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v


def shim_missing(*modules: str) -> None:
    """Register a stand-in for each of `modules` that cannot be imported."""
    for mod in modules:
        try:
            __import__(mod)
        except ImportError:
            shim = types.ModuleType(mod)
            shim.EasyDict = EasyDict
            sys.modules[mod] = shim


def cuda_as_noop(modules: bool = False) -> None:
    """Without CUDA, `Tensor.cuda()` (and `Module.cuda()` when `modules`) return their receiver."""
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        if modules:
            torch.nn.Module.cuda = lambda self, *a, **k: self
