"""Checkpoints: save ours atomically, load ours or a method's public release's, always weights_only.

Our format (a plain dict, loadable with torch.load(weights_only=True)):
    {"format": "prvr-checkpoint", "version": 2, "method": "<model.name>",
     "model_config": asdict(the method's config), "state_dict": ..., "optimizer": ... | None,
     "epoch": int, "metrics": {str: float}, "settings": resolved settings | None,
     "settings_hash": str | None, "extra": dict}
Only tensors, dicts, lists, tuples, strings, numbers, bools and None are stored. Checkpoints of
the first version ("prvr-gmmformer-v2") load as method gmmformer_v2.

A release checkpoint is recognised by the method whose `is_release_checkpoint` accepts it (or
the one named by the caller) and converted by its `load_release`. Objects a release pickles are
read through an explicit allow-list: a static table (`RELEASE_GLOBALS`, the same as each
method's `release_globals`) maps a stored class name onto a plain type that torch's weights_only
unpickler already accepts (an EasyDict, a dict subclass, becomes a collections.OrderedDict: its
items are restored and its attribute copies land in the instance __dict__, so no code runs).
Nothing is ever fully unpickled, and reading a checkpoint imports no method: loading one builds
only the method it records (or is named), so a run never imports another method's code.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .methods import available, get_method, unwrap_model
from .methods.layers import strip_module_prefix

FORMAT = "prvr-checkpoint"
FORMAT_V1 = "prvr-gmmformer-v2"
VERSION = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the one-line message names the file and the problem."""


# (replacement, name as stored in the pickle) of the classes each method's release checkpoints
# pickle: static, so that reading a checkpoint imports no method (tests/test_checkpoint.py holds
# it equal to every method's `release_globals`).
RELEASE_GLOBALS: dict[str, tuple[tuple[type, str], ...]] = {
    "gmmformer_v1": ((OrderedDict, "Opts.optimization.WarmupLinearSchedule"),),
    "msssl": ((OrderedDict, "easydict.EasyDict"),),
    "ral": ((OrderedDict, "Opts.optimization.WarmupLinearSchedule"),),
}
_ALLOWED_GLOBALS = [(OrderedDict, "easydict.EasyDict")]   # ours: a release config of any method


def allowed_globals() -> list[tuple[type, str]]:
    """The weights_only allow-list: ours plus every release's classes (all read as plain types)."""
    extra = [g for globs in RELEASE_GLOBALS.values() for g in globs]
    return _ALLOWED_GLOBALS + [g for g in extra if g not in _ALLOWED_GLOBALS]


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



def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, method: str,
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
        "method": str(method),
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
        with torch.serialization.safe_globals(allowed_globals()):
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


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """'prvr', 'release' (a dict with a state_dict that is not ours) or 'state_dict' (bare)."""
    if ckpt.get("format") in (FORMAT, FORMAT_V1):
        return "prvr"
    if isinstance(ckpt.get("state_dict"), Mapping) or isinstance(ckpt.get("model"), Mapping):
        return "release"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "state_dict"
    return "unknown"


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


def _ours(path: Path, ckpt: Mapping[str, Any], method: str | None):
    name = str(ckpt.get("method") or "gmmformer_v2")  # the first format was GMMFormer v2 only
    if method is not None and method != name:
        raise CheckpointError(f"{path}: a {name} checkpoint; it cannot be loaded as {method}")
    for key in ("model_config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: missing key '{key}'")
    m = _method(path, name)
    try:
        cfg = m.config_from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad model_config ({_first_line(exc)})") from None
    info = {"epoch": ckpt.get("epoch"), "metrics": dict(ckpt.get("metrics") or {}),
            "settings": ckpt.get("settings"), "settings_hash": ckpt.get("settings_hash"),
            "optimizer": ckpt.get("optimizer"), "extra": dict(ckpt.get("extra") or {})}
    return m, cfg, ckpt["state_dict"], info


def _release(path: Path, ckpt: Mapping[str, Any], method: str | None, base_config: Any):
    if method is None:
        found = [n for n in available() if get_method(n).is_release_checkpoint(ckpt)]
        if not found:
            raise CheckpointError(f"{path}: not a release checkpoint of any known method "
                                  f"({', '.join(available())}); name one with --method")
        if len(found) > 1:   # a method built on another's release (RAL on v2): the one whose layout fits
            fits = [n for n in found if _converts(get_method(n), ckpt, base_config)]
            found = fits or found
        method = found[0]
    m = _method(path, method)
    if not m.is_release_checkpoint(ckpt):
        raise CheckpointError(f"{path}: not a {method} release checkpoint "
                              f"(keys: {', '.join(sorted(map(str, ckpt))[:8])})")
    try:
        cfg, state, info = m.load_release(ckpt, base_config)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot convert the {method} release checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    return m, cfg, state, {"settings": None, "settings_hash": None, "optimizer": ckpt.get("optimizer"),
                           "epoch": None, "metrics": {}, "extra": {}, **info}


def _converts(m, ckpt: Mapping[str, Any], base_config: Any) -> bool:
    try:
        m.load_release(ckpt, base_config)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def _method(path: Path, name: str):
    try:
        return get_method(name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_model(path: str | os.PathLike, device: Any = "cpu", method: str | None = None,
               base_config: Any = None, backend: str = "auto"):
    """Build a method's network from our checkpoint, a release checkpoint, or a bare state dict.

    method: the expected method (our checkpoints record theirs: a mismatch is an error; for a
    release checkpoint it picks the format, else every method is asked). base_config (the
    method's config, or its dict) supplies what a release checkpoint does not store (e.g.
    feature sizes); a bare state dict needs it and `method`. backend: auto | reference | cpu
    (prvr.backends.resolve_backend on `device`); every backend loads the same state dict.
    Returns (model in eval mode on device, info dict: kind, method, path, epoch, metrics,
    model_config, settings, settings_hash, optimizer (state dict or None), extra).
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    kind = checkpoint_kind(ckpt)
    if isinstance(base_config, Mapping):
        if method is None:
            raise CheckpointError(f"{path}: a base config needs its method")
        base_config = _method(path, method).config_from_dict(base_config)
    if kind == "prvr":
        m, cfg, state, info = _ours(path, ckpt, method)
    elif kind == "release":
        m, cfg, state, info = _release(path, ckpt, method, base_config)
    elif kind == "state_dict":
        if base_config is None or method is None:
            raise CheckpointError(f"{path}: a bare state dict; pass its method and base config")
        m, cfg, state = _method(path, method), base_config, ckpt
        info = {"epoch": None, "metrics": {}, "settings": None, "settings_hash": None,
                "optimizer": None, "extra": {}}
    else:
        raise CheckpointError(f"{path}: not a prvr or release checkpoint "
                              f"(keys: {', '.join(sorted(map(str, ckpt))[:8]) or 'none'})")
    state = dict(strip_module_prefix(state))
    from .backends import resolve_backend

    model = m.build_model(cfg, resolve_backend(backend, torch.device(device)))
    _check_state(path, model, state)
    model.load_state_dict(state)
    model.to(device).eval()
    info.update(kind=kind, method=m.name, path=str(path), model_config=dataclasses.asdict(cfg),
                backend=resolve_backend(backend, torch.device(device)))
    return model, info
