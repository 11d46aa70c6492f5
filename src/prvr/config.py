"""Settings: read params.yaml and resolve the slice one run uses.

params.yaml has one home for every key (see its header):

    dataset, data_root                 which data, where
    model.name                         which method (a module of prvr.methods)
    train                              the training loop, the same for every method
    evaluate                           the evaluate stage
    datasets.<ds>                      facts about the data (folders, dimensions, fetching)
    methods.<name>.all                 a method's recipe on every dataset
    methods.<name>.<recipe>            its per-dataset recipe (<recipe> = datasets.<ds>.recipe
                                       when set, else <ds>)

A run's recipe is the union of `train`, `methods.<name>.all` and `methods.<name>.<recipe>`; a
key in two of them is a ConfigError naming both places, so the value `dvc exp show` lists is the
value the run uses. `resolve()` returns one plain dict that every stage reads:

    {
      "dataset", "method", "data_root", <every key of datasets.<ds>>,
      "model":    the method's config dataclass as a dict (asdict),
      "optim":    lr, weight_decay, warmup_proportion, grad_clip_norm,
      "train":    seed, epochs, batch_size, patience, hard_negative_start_epoch and the
                  keys of `train` (device, num_workers, nproc, val_split, precision, ...),
      "evaluate": the keys of `evaluate`,

The accelerator keys (train.precision / tf32 / compile / pin_memory, evaluate.precision /
memory_budget_mb; see prvr.accel) are checked here: a bad value is a ConfigError.
    }
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

# Recipe keys the training loop reads (everything else in a recipe is the method's own).
LOOP_KEYS = ("seed", "epochs", "batch_size", "patience", "hard_negative_start_epoch")
OPTIM_KEYS = {"lr": "lr", "weight_decay": "weight_decay",
              "lr_warmup_proportion": "warmup_proportion", "grad_clip_norm": "grad_clip_norm"}
DATA_FACTS = ("collection", "feature", "visual_dim", "text_dim")
DEFAULT_METHOD = "gmmformer_v2"
# Accelerator settings (prvr.accel): their values are checked here, with the other settings.
PRECISIONS = ("fp32", "bf16")
PIN_MEMORY = ("auto", "true", "false")


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


def _section(params: Mapping[str, Any], dotted: str, required: bool = True) -> dict[str, Any]:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if required:
                raise ConfigError(f"params.yaml: missing section '{dotted}'")
            return {}
        node = node[part]
    if node is None and not required:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"params.yaml: '{dotted}' must be a mapping, not {type(node).__name__}")
    return copy.deepcopy(dict(node))


def merge_once(layers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Union of named layers; a key set in two layers is a ConfigError naming both."""
    merged: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, layer in layers:
        for key, value in layer.items():
            if key in merged:
                raise ConfigError(f"params.yaml: '{key}' is set in both '{where[key]}.{key}' and "
                                  f"'{name}.{key}'; set it in one place")
            merged[key], where[key] = value, name
    return merged


def _dataset(params: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    known = sorted(params.get("datasets") or {})
    if dataset not in known:
        raise ConfigError(f"params.yaml: dataset '{dataset}' has no section under 'datasets' "
                          f"(known: {', '.join(known)})")
    facts = _section(params, f"datasets.{dataset}")
    for key in DATA_FACTS:
        if key not in facts:
            raise ConfigError(f"params.yaml: missing key 'datasets.{dataset}.{key}'")
    return facts


def resolve(params: dict[str, Any], dataset: str | None = None, method: str | None = None
            ) -> dict[str, Any]:
    """The settings of one run: `dataset` (default params['dataset']) with `method` (default
    params['model']['name'])."""
    from .methods import get_method

    dataset = str(dataset or params.get("dataset"))
    facts = _dataset(params, dataset)
    method = str(method or _section(params, "model", required=False).get("name") or DEFAULT_METHOD)
    try:
        m = get_method(method)
    except ValueError as exc:
        raise ConfigError(f"params.yaml: model.name: {exc}") from None
    recipe_name = str(facts.get("recipe") or dataset)
    if recipe_name not in (params.get("methods") or {}).get(method, {}) and recipe_name != dataset:
        raise ConfigError(f"params.yaml: datasets.{dataset}.recipe '{recipe_name}' has no "
                          f"section 'methods.{method}.{recipe_name}'")
    recipe = merge_once([("train", _section(params, "train", required=False)),
                         (f"methods.{method}.all", _section(params, f"methods.{method}.all")),
                         (f"methods.{method}.{recipe_name}",
                          _section(params, f"methods.{method}.{recipe_name}", required=False))])
    missing = [k for k in (*LOOP_KEYS, *OPTIM_KEYS) if k not in recipe]
    if missing:
        raise ConfigError(f"params.yaml: methods.{method} (with train, for dataset {dataset}) "
                          f"lacks {', '.join(missing)}")
    optim = {OPTIM_KEYS[k]: float(recipe.pop(k)) for k in OPTIM_KEYS}
    loop = {k: recipe.pop(k) for k in LOOP_KEYS}
    train_keys = set(_section(params, "train", required=False))
    loop.update({k: recipe.pop(k) for k in list(recipe) if k in train_keys})
    evaluate = _section(params, "evaluate", required=False)
    _check_accel(loop, evaluate)
    data = {"visual_dim": int(facts["visual_dim"]), "text_dim": int(facts["text_dim"])}
    try:
        cfg = m.config(recipe, data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"params.yaml: methods.{method}: {exc}") from None
    return {
        "dataset": dataset,
        "method": method,
        "data_root": str(Path(os.path.expanduser(str(params.get("data_root", "~/VisualSearch"))))),
        "archive": None, "sha256": None, "generator": None,
        **facts,
        "visual_dim": data["visual_dim"], "text_dim": data["text_dim"],
        "model": dataclasses.asdict(cfg),
        "optim": optim,
        "train": loop,
        "evaluate": evaluate,
    }


def check_precision(value: Any, key: str = "train.precision") -> str:
    name = str(value).lower()
    if name not in PRECISIONS:
        raise ConfigError(f"params.yaml: {key} {value!r}: expected one of {', '.join(PRECISIONS)}")
    return name


def check_compile(value: Any, key: str = "train.compile") -> str | None:
    """None (eager) or the torch.compile backend: false, true (= inductor) or a backend name."""
    if value is None or value is False or str(value).lower() in ("false", "off", "none"):
        return None
    if value is True or str(value).lower() in ("true", "on"):
        return "inductor"
    if not isinstance(value, str) or not value.strip() or " " in value:
        raise ConfigError(f"params.yaml: {key} {value!r}: expected false, true or a torch.compile "
                          "backend name")
    return value


def check_pin_memory(value: Any, key: str = "train.pin_memory") -> str:
    name = str(value).lower()
    if name not in PIN_MEMORY:
        raise ConfigError(f"params.yaml: {key} {value!r}: expected auto, true or false")
    return name


def check_budget_mb(value: Any, key: str = "evaluate.memory_budget_mb") -> float:
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = -1.0
    if not mb > 0:
        raise ConfigError(f"params.yaml: {key} {value!r}: expected a positive number of megabytes")
    return mb


def _check_accel(train: Mapping[str, Any], evaluate: Mapping[str, Any]) -> None:
    """The accelerator keys of `train` and `evaluate`, where set, hold usable values."""
    checks = ((train, "train", "precision", check_precision), (train, "train", "compile", check_compile),
              (train, "train", "pin_memory", check_pin_memory),
              (evaluate, "evaluate", "precision", check_precision),
              (evaluate, "evaluate", "memory_budget_mb", check_budget_mb))
    for section, name, key, check in checks:
        if key in section:
            check(section[key], f"{name}.{key}")
    if "tf32" in train and not isinstance(train["tf32"], bool):
        raise ConfigError(f"params.yaml: train.tf32 {train['tf32']!r}: expected true or false")


def load_settings(path: str | os.PathLike = "params.yaml", dataset: str | None = None,
                  method: str | None = None) -> dict[str, Any]:
    return resolve(load_params(path), dataset, method)


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
