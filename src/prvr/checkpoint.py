"""Checkpoints: save ours atomically, load ours or the public release's, always weights_only.

Our format (a plain dict, loadable with torch.load(weights_only=True)):
    {"format": "prvr-gmmformer-v2", "version": 1, "model_config": asdict(GMMFormerConfig),
     "state_dict": ..., "optimizer": optimizer.state_dict() | None, "epoch": int,
     "metrics": {str: float}, "settings": resolved settings dict | None,
     "settings_hash": str | None, "extra": dict}
Only tensors, dicts, lists, tuples, strings, numbers, bools and None are stored.

The release's format: {"config": dict, "epoch": int, "model_val": [r1, r5, r10, r100, sumr],
"state_dict": release parameter names, "optimizer": ...}. Its state dict is mapped with
prvr.release.convert_release_state_dict and its config with prvr.release.config_from_release.
A config pickled as an EasyDict (a plain dict subclass) is read as a plain dict: for the
weights_only unpickler the name "easydict.EasyDict" is mapped onto collections.OrderedDict (already
on torch's own allow-list; its items are restored and its attribute copies land in the instance
__dict__, so no code runs), then converted to dict. Nothing from easydict is imported or run.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .model import unwrap_model

FORMAT = "prvr-gmmformer-v2"
VERSION = 1
RELEASE_KEYS = ("config", "state_dict")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the one-line message names the file and the problem."""


# (replacement, name as stored in the pickle)
_ALLOWED_GLOBALS = [(OrderedDict, "easydict.EasyDict")]


def _plain(obj: Any) -> Any:
    """Deep copy into types the weights_only unpickler accepts (dicts, lists, str, numbers...)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj] if isinstance(obj, list) else tuple(_plain(v) for v in obj)
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)



def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int = -1,
                    metrics: Mapping[str, float] | None = None, settings: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write our checkpoint format atomically (temp file in the same folder, then os.replace)."""
    from prvr.config import settings_hash

    path = Path(path)
    model = unwrap_model(model)
    cfg = getattr(model, "cfg", None)
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": _plain(cfg) if cfg is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _cpu_state(optimizer.state_dict()) if optimizer is not None else None,
        "epoch": int(epoch),
        "metrics": {str(k): float(v) for k, v in (metrics or {}).items()},
        "settings": _plain(settings) if settings is not None else None,
        "settings_hash": settings_hash(_plain(settings)) if settings is not None else None,
        "extra": _plain(dict(extra or {})),
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def _cpu_state(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_state(v) for v in obj)
    return _plain(obj)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    return text.splitlines()[0].strip()


def _to_plain_dicts(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain_dicts(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain_dicts(v) for v in obj]
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """torch.load(weights_only=True) with one-line CheckpointErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not loadable as a safe (weights-only) checkpoint: "
                              f"{_first_line(exc)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    return _to_plain_dicts(ckpt)


def _strip_module_prefix(state: Mapping[str, Any]) -> dict:
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """'prvr', 'release' or 'state_dict' (a bare parameter dict)."""
    if ckpt.get("format") == FORMAT:
        return "prvr"
    if all(k in ckpt for k in RELEASE_KEYS):
        return "release"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "state_dict"
    return "unknown"


def _release_metrics(model_val: Any) -> dict[str, float]:
    names = ("r1", "r5", "r10", "r100", "sumr")
    try:
        vals = [float(v) for v in model_val]
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in zip(names, vals) if not math.isnan(v)}


def _check_state(path: Path, model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry '{key}' is a {type(value).__name__}, not a tensor")
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{path}: state_dict lacks '{missing[0]}' ({len(missing)} parameters missing)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{path}: state_dict has unexpected '{unexpected[0]}' "
                              f"({len(unexpected)} unexpected entries)")
    for key, ref in own.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(state[key].shape)}, "
                                  f"the model expects {tuple(ref.shape)}")


def load_model(path: str | os.PathLike, device: Any = "cpu", base_config: Any = None):
    """Build a GMMFormer from our checkpoint, a release checkpoint, or a bare state dict.

    base_config (GMMFormerConfig or a settings["model"] dict) supplies what a release
    checkpoint does not store (e.g. feature sizes); a bare state dict needs it.
    Returns (model in eval mode on device, info dict: kind, path, epoch, metrics, model_config,
    settings, settings_hash, optimizer (state dict or None), extra).
    """
    from prvr.model import GMMFormer, GMMFormerConfig

    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    kind = checkpoint_kind(ckpt)
    if isinstance(base_config, Mapping):
        base_config = GMMFormerConfig.from_dict(base_config)
    info: dict[str, Any] = {"kind": kind, "path": str(path), "epoch": None, "metrics": {},
                            "settings": None, "settings_hash": None, "optimizer": None, "extra": {}}
    if kind == "prvr":
        for key in ("model_config", "state_dict"):
            if not isinstance(ckpt.get(key), dict):
                raise CheckpointError(f"{path}: missing key '{key}'")
        try:
            cfg = GMMFormerConfig.from_dict(ckpt["model_config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad model_config ({_first_line(exc)})") from None
        state = ckpt["state_dict"]
        info.update(epoch=ckpt.get("epoch"), metrics=dict(ckpt.get("metrics") or {}),
                    settings=ckpt.get("settings"), settings_hash=ckpt.get("settings_hash"),
                    optimizer=ckpt.get("optimizer"), extra=dict(ckpt.get("extra") or {}))
    elif kind == "release":
        from prvr.release import config_from_release, convert_release_state_dict

        if not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["config"], dict):
            raise CheckpointError(f"{path}: release checkpoint with a non-dict 'config' or 'state_dict'")
        release_state = _strip_module_prefix(ckpt["state_dict"])
        try:
            cfg = config_from_release(ckpt["config"], base_config or GMMFormerConfig())
            state = convert_release_state_dict(release_state, cfg)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot convert the release checkpoint "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from None
        info.update(epoch=ckpt.get("epoch"), metrics=_release_metrics(ckpt.get("model_val", ())),
                    optimizer=ckpt.get("optimizer"), extra={"release_config": ckpt["config"]})
    elif kind == "state_dict":
        if base_config is None:
            raise CheckpointError(f"{path}: a bare state dict; pass base_config for its model settings")
        cfg = base_config
        state = ckpt
    else:
        raise CheckpointError(f"{path}: not a prvr or release checkpoint "
                              f"(keys: {', '.join(sorted(map(str, ckpt))[:8]) or 'none'})")
    state = _strip_module_prefix(state)
    model = GMMFormer(cfg)
    _check_state(path, model, state)
    model.load_state_dict(state)
    model.to(device).eval()
    info["model_config"] = dataclasses.asdict(cfg)
    return model, info
