"""PRVR methods behind one contract (prvr.methods.base).

A method is the module `prvr.methods.<name>` and its module-level `METHOD` (a
`prvr.methods.base.Method`). `model.name` in params.yaml picks it; nothing is registered at
import time: `get_method(name)` imports the module on first use. Adding a method is adding
one module or package here (and its recipe under `methods.<name>` in params.yaml).
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .base import Method, MethodLoss, MethodModel, TrainOutput, VideoEncoding

__all__ = ["Method", "MethodLoss", "MethodModel", "TrainOutput", "VideoEncoding",
           "available", "get_method", "create_model", "create_loss", "unwrap_model"]


# Modules of this package that are not methods: the contract and the shared building blocks.
_NOT_METHODS = {"base", "layers"}


def available() -> list[str]:
    """Names of the methods in this package (its modules and packages but the shared ones)."""
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in _NOT_METHODS)


def get_method(name: str) -> Method:
    """The Method called `name`; ValueError (naming the known ones) for an unknown name."""
    if name not in available():
        raise ValueError(f"unknown method '{name}' (known: {', '.join(available())})")
    method = getattr(importlib.import_module(f"{__name__}.{name}"), "METHOD", None)
    if not isinstance(method, Method) or method.name != name:
        raise ValueError(f"prvr.methods.{name} does not define METHOD = a Method named '{name}'")
    return method


def create_model(name: str, cfg, backend: str = "reference"):
    """The network of method `name` for config `cfg` on `backend` ('reference' or 'cpu'; see
    prvr.backends.resolve_backend for 'auto'): the one place a model is chosen."""
    return get_method(name).build_model(cfg, backend)


def create_loss(name: str, cfg):
    """The objective of method `name` for config `cfg` (the one place a loss is chosen)."""
    return get_method(name).build_loss(cfg)


def unwrap_model(model):
    """The model inside a DistributedDataParallel / DataParallel wrapper (else `model`)."""
    import torch.nn as nn

    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model
