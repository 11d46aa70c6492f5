"""Settings: read params.yaml and resolve the slice one dataset runs with.

params.yaml holds shared sections (`train`, `model`, `evaluate`) and one section per
dataset (`demo`, `tvr`, `act`, `cha`). A dataset section carries that dataset's values
(the release's per-dataset table) and may override shared keys under its own `train:` and
`model:` keys. `resolve()` merges them into one plain dict that every stage reads:

    {
      "dataset", "data_root", "collection", "feature", "visual_dim", "text_dim",
      "archive", "sha256", "generator",
      "model":    fields of prvr.model.GMMFormerConfig,
      "loss":     margin, loss_factor, neg_factor, hard_pool_size,
      "optim":    lr, weight_decay, warmup_proportion, grad_clip_norm,
      "train":    seed, device, epochs, batch_size, num_workers, patience,
                  hard_negative_start_epoch, nproc,
      "evaluate": video_batch_size, query_batch_size, split,
    }
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("demo", "tvr", "act", "cha")

# Keys of a dataset section that become model settings.
_MODEL_KEYS_FROM_DATASET = ("sft_factor", "input_drop", "drop", "visual_dim", "text_dim")


class ConfigError(ValueError):
    """A params.yaml that cannot be used; the message names the file and the key."""


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def _need(section: dict, key: str, where: str) -> Any:
    if key not in section:
        raise ConfigError(f"params.yaml: missing key '{where}.{key}'")
    return section[key]


def resolve(params: dict[str, Any], dataset: str | None = None) -> dict[str, Any]:
    """Merge shared and per-dataset settings for `dataset` (default: params['dataset'])."""
    dataset = dataset or params.get("dataset")
    if dataset not in params or not isinstance(params.get(dataset), dict):
        known = [k for k in DATASETS if k in params]
        raise ConfigError(f"params.yaml: dataset '{dataset}' has no section (known: {', '.join(known)})")
    ds = params[dataset]
    train = {**copy.deepcopy(params.get("train", {})), **copy.deepcopy(ds.get("train", {}))}
    model = {**copy.deepcopy(params.get("model", {})), **copy.deepcopy(ds.get("model", {}))}
    for key in _MODEL_KEYS_FROM_DATASET:
        model[key] = _need(ds, key, dataset)
    loss_factor = list(_need(ds, "loss_factor", dataset))
    neg_factor = list(_need(ds, "neg_factor", dataset))
    if len(loss_factor) != 4 or len(neg_factor) != 3:
        raise ConfigError(f"params.yaml: '{dataset}.loss_factor' needs 4 values and "
                          f"'{dataset}.neg_factor' 3")
    return {
        "dataset": dataset,
        "data_root": str(Path(os.path.expanduser(str(params.get("data_root", "~/VisualSearch"))))),
        "collection": _need(ds, "collection", dataset),
        "feature": _need(ds, "feature", dataset),
        "visual_dim": int(ds["visual_dim"]),
        "text_dim": int(ds["text_dim"]),
        "archive": ds.get("archive"),
        "sha256": ds.get("sha256"),
        "generator": copy.deepcopy(ds.get("generator")),
        "model": model,
        "loss": {
            "margin": float(_need(ds, "margin", dataset)),
            "loss_factor": [float(x) for x in loss_factor],
            "neg_factor": [float(x) for x in neg_factor],
            "hard_pool_size": int(train.pop("hard_pool_size", 20)),
        },
        "optim": {
            "lr": float(_need(ds, "lr", dataset)),
            "weight_decay": float(train.pop("weight_decay", 0.01)),
            "warmup_proportion": float(train.pop("lr_warmup_proportion", 0.01)),
            "grad_clip_norm": float(train.pop("grad_clip_norm", 1.0)),
        },
        "train": train,
        "evaluate": copy.deepcopy(params.get("evaluate", {})),
    }


def load_settings(path: str | os.PathLike = "params.yaml", dataset: str | None = None) -> dict[str, Any]:
    return resolve(load_params(path), dataset)


def settings_hash(settings: Any) -> str:
    """A stable hash of a JSON-able settings object (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def resolve_device(name: str = "auto"):
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
