"""PRVR methods behind one contract (prvr.methods.base).

A method is the package `prvr.methods.<name>` and its module-level `METHOD` (a
`prvr.methods.base.Method`). `model.name` in params.yaml picks it; nothing is registered at
import time: `get_method(name)` imports only that package, on first use, so a run (and its
dvc.yaml deps and resume fingerprint) involves no other method. Adding a method is adding one
package here (and its recipe under `methods.<name>` in params.yaml).
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from ..config import ConfigError, method_names
from .base import Method, MethodLoss, MethodModel, QueryEncoding, TrainOutput, VideoEncoding, cat_queries

__all__ = ["Method", "MethodLoss", "MethodModel", "QueryEncoding", "TrainOutput", "VideoEncoding", "cat_queries",
           "available", "get_method", "build_config", "create_model", "create_loss", "unwrap_model"]


def available() -> list[str]:
    """Names of the methods in this package: its packages (the contract and the shared building
    blocks are modules)."""
    return method_names()


def get_method(name: str) -> Method:
    """The Method called `name`; ValueError (naming the known ones) for an unknown name."""
    if name not in available():
        raise ValueError(f"unknown method '{name}' (known: {', '.join(available())})")
    method = getattr(importlib.import_module(f"{__name__}.{name}"), "METHOD", None)
    if not isinstance(method, Method) or method.name != name:
        raise ValueError(f"prvr.methods.{name} does not define METHOD = a Method named '{name}'")
    return method


def build_config(settings: Mapping[str, Any], where: str = "params.yaml") -> Any:
    """The run's config dataclass, built by its method's own config class from settings["model"]
    (the recipe keys prvr.config.resolve merges without importing the method): the one check
    of a method's recipe keys; an unknown or mistyped key is a one-line ConfigError naming it."""
    name = str(settings["method"])
    try:
        return get_method(name).config_from_dict(settings["model"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: methods.{name}: {exc}") from None


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
