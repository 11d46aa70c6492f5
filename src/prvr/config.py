"""Settings: read params.yaml and resolve the slice one run uses.

params.yaml has one home for every key (see its header):

    dataset, data_root, backend        which data, where, which backend computes the network
    model.name                         which method (a package of prvr.methods)
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
      "dataset", "method", "data_root", "backend", <every field of DatasetSettings>,
      "model":    the method's recipe keys with visual_dim and text_dim (its config dataclass
                  checks them when the network is built: prvr.methods.build_config),
      "optim":    lr, weight_decay, warmup_proportion, grad_clip_norm,
      "train":    seed, epochs, batch_size, patience, hard_negative_start_epoch and every field
                  of TrainSettings (device, num_workers, nproc, val_split, precision, ...),
      "evaluate": every field of EvaluateSettings,
    }

Typed settings: each section is a dataclass below (RunSettings, TrainSettings, EvaluateSettings,
DatasetSettings, LoopSettings), the one place its defaults live; every field carries a Check,
so an unknown key, a wrong type or an out-of-range value is a one-line ConfigError naming the
file and the key. Resolving imports no method (nor torch): the method names are the packages of
src/prvr/methods/, so the fetch and validate stages run without model code.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .data.layout import FEATURE_FORMATS

OPTIM_KEYS = {"lr": "lr", "weight_decay": "weight_decay",
              "lr_warmup_proportion": "warmup_proportion", "grad_clip_norm": "grad_clip_norm"}
DEFAULT_METHOD = "gmmformer_v2"
# Accelerator settings (prvr.accel): their values are checked here, with the other settings.
PRECISIONS = ("fp32", "bf16")
PIN_MEMORY = ("auto", "true", "false")
BACKENDS = ("auto", "reference", "cpu")   # prvr.backends.resolve_backend picks auto's
DATA_DIMS = ("visual_dim", "text_dim")    # the data facts a method's config receives too
METHODS_DIR = Path(__file__).resolve().parent / "methods"


class ConfigError(ValueError):
    """A params.yaml that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------
# checks: what a setting may hold


@dataclass(frozen=True)
class Check:
    """What one setting may hold: `ok(value)`, the expectation an error states, and `keep`, the
    form the resolved settings hold (e.g. a float for a number)."""

    expect: str
    ok: Callable[[Any], bool]
    keep: Callable[[Any], Any] = lambda value: value

    def __call__(self, value: Any, key: str, where: str = "params.yaml") -> Any:
        if not self.ok(value):
            raise ConfigError(f"{where}: {key} {value!r}: expected {self.expect}")
        return self.keep(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    """The finite number `value` is, else None. A string is read too: YAML 1.1 (PyYAML) takes
    `1e-3` for a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def integer(low: int | None = None) -> Check:
    return Check("an integer" + ("" if low is None else f" >= {low}"),
                 lambda v: _is_int(v) and (low is None or v >= low))


def number(low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = True) -> Check:
    """A number in the interval from low to high (either end may be open or absent)."""
    if high is not None:
        text = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    else:
        text = "a number" if low is None else f"a number {'>' if open_low else '>='} {low:g}"

    def ok(value: Any) -> bool:
        x = _as_number(value)
        return x is not None and (low is None or (x > low if open_low else x >= low)) \
            and (high is None or (x < high if open_high else x <= high))
    return Check(text, ok, float)


def choice(*names: str) -> Check:
    return Check(f"one of {', '.join(names)}", lambda v: isinstance(v, str) and v.lower() in names,
                 str.lower)


def optional(check: Check) -> Check:
    return Check(f"null or {check.expect}", lambda v: v is None or check.ok(v),
                 lambda v: None if v is None else check.keep(v))


TEXT = Check("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
BOOLEAN = Check("true or false", lambda v: isinstance(v, bool))
NAMES = Check("a list of non-empty strings", lambda v: isinstance(v, list) and all(map(TEXT.ok, v)), list)
MAPPING = Check("a mapping or null", lambda v: v is None or isinstance(v, Mapping),
                lambda v: None if v is None else copy.deepcopy(dict(v)))
DEVICE = Check("auto, cpu, cuda or cuda:N",
               lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None)
PRECISION = choice(*PRECISIONS)
BACKEND = choice(*BACKENDS)
PIN = Check("auto, true or false", lambda v: str(v).lower() in PIN_MEMORY)
COMPILE = Check("false, true or a torch.compile backend name",
                lambda v: v is None or isinstance(v, bool) or (isinstance(v, str) and bool(v.strip())
                                                               and " " not in v))


def setting(check: Check, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A settings dataclass field: its Check and its default (none: the key is required)."""
    return field(default=default, default_factory=factory, metadata={"check": check})


# ---------------------------------------------------------------------------------------------
# the sections, typed: the one place each default lives


@dataclass
class RunSettings:
    """The top-level keys beside the sections: where the data lives and which backend computes
    the network (auto: the CPU fast path on the CPU, the reference network elsewhere)."""

    data_root: str = setting(TEXT, "~/VisualSearch")
    backend: str = setting(BACKEND, "auto")


@dataclass
class TrainSettings:
    """`train`: the training loop's device, workers, validation and accelerator settings, the same
    for every method and dataset."""

    device: str = setting(DEVICE, "auto")
    num_workers: int = setting(integer(0), 0)
    nproc: int = setting(integer(1), 1)
    val_split: str = setting(TEXT, "val")          # val, holdout or a split name
    holdout_fraction: float = setting(number(0, 1), 0.1)
    holdout_seed: int = setting(integer(), 0)
    val_video_batch_size: int = setting(integer(1), 100)
    val_query_batch_size: int = setting(integer(1), 50)
    precision: str = setting(PRECISION, "fp32")
    tf32: bool = setting(BOOLEAN, True)
    compile: Any = setting(COMPILE, False)
    pin_memory: Any = setting(PIN, "auto")


@dataclass
class LoopSettings:
    """The training-loop keys of a method's recipe (`methods.<m>`, or `train`): each recipe sets
    all of them, its release's values, so none has a default."""

    seed: int = setting(integer())
    epochs: int = setting(integer(1))
    batch_size: int = setting(integer(1))
    patience: int = setting(integer())             # negative: never stop early
    hard_negative_start_epoch: int = setting(integer(0))
    lr: float = setting(number(0, open_low=True))
    weight_decay: float = setting(number(0))
    lr_warmup_proportion: float = setting(number(0, 1, open_high=False))
    grad_clip_norm: float = setting(number())       # <= 0: no clipping


@dataclass
class EvaluateSettings:
    """`evaluate`: the evaluate stage (batch sizes, split, device, dense splits, precision and the
    scoring's memory budget, which the training's validation uses too)."""

    video_batch_size: int = setting(integer(1), 100)
    query_batch_size: int = setting(integer(1), 50)
    split: str = setting(TEXT, "test")
    device: str = setting(DEVICE, "auto")
    extra_splits: list = setting(NAMES, factory=list)
    precision: str = setting(PRECISION, "fp32")
    memory_budget_mb: float = setting(number(0, open_low=True), 2048.0)


@dataclass
class CpuSettings:
    """`cpu`: the CPU backend's process and BLAS settings (prvr.procenv, prvr.backends.cpu)."""

    # the train stage restarts once under a preloaded allocator and short thread-pool waits when
    # the run uses the CPU backend on the CPU; false: no restart, nothing of the process changed
    process_setup: bool = setting(BOOLEAN, True)
    # the CPU nodes' large matmuls on numpy's OpenBLAS, where the process started with short
    # OpenBLAS waits (else torch's BLAS, and the train stage logs why)
    numpy_blas: bool = setting(BOOLEAN, True)


def cpu_settings(params: Mapping[str, Any], where: str = "params.yaml") -> dict[str, Any]:
    """The `cpu` section, checked and with every default."""
    section = _section(params, "cpu", required=False, where=where)
    return dataclasses.asdict(build(CpuSettings, section, "cpu", where))


@dataclass
class DatasetSettings:
    """`datasets.<ds>`: facts about the data. collection, feature and the dimensions are
    required; the rest says how to read or fetch it."""

    collection: str = setting(TEXT)
    feature: str = setting(TEXT)
    visual_dim: int = setting(integer(1))
    text_dim: int = setting(integer(1))
    feature_format: str = setting(choice(*FEATURE_FORMATS), "bigfile")
    query_feature: str | None = setting(optional(TEXT), None)
    recipe: str | None = setting(optional(TEXT), None)   # methods.<m>.<recipe>; default: <ds>
    archive: str | None = setting(optional(TEXT), None)
    sha256: str | None = setting(optional(TEXT), None)
    generator: dict | None = setting(MAPPING, None)      # the demo generator's options


def build(cls: type, values: Mapping[str, Any], prefix: str, where: str = "params.yaml",
          origins: Mapping[str, str] | None = None) -> Any:
    """Settings dataclass `cls` from the keys of a section (`prefix`; `origins` names the section
    of a key where they differ), each checked by its field's Check; the rest take their
    defaults. An unknown key, a bad value or a missing required key is a ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    origins = origins or {}

    def name(key: str) -> str:
        return ".".join(p for p in (origins.get(key, prefix), key) if p)

    for key in values:
        if key not in fields:
            raise ConfigError(f"{where}: {name(key)}: unknown key (known: {', '.join(fields)})")
    missing = [k for k, f in fields.items() if k not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: {prefix} lacks {', '.join(missing)}")
    return cls(**{k: fields[k].metadata["check"](v, name(k), where) for k, v in values.items()})


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


def _section(params: Mapping[str, Any], dotted: str, required: bool = True,
             where: str = "params.yaml") -> dict[str, Any]:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if required:
                raise ConfigError(f"{where}: missing section '{dotted}'")
            return {}
        node = node[part]
    if node is None and not required:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: '{dotted}' must be a mapping, not {type(node).__name__}")
    return copy.deepcopy(dict(node))


def merge_once(layers: list[tuple[str, Mapping[str, Any]]], where: str = "params.yaml"
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """Union of named layers and the layer each key came from; a key set in two layers is a
    ConfigError naming both."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, layer in layers:
        for key, value in layer.items():
            if key in merged:
                raise ConfigError(f"{where}: '{key}' is set in both '{origin[key]}.{key}' and "
                                  f"'{name}.{key}'; set it in one place")
            merged[key], origin[key] = value, name
    return merged, origin


def method_names() -> list[str]:
    """The methods: the packages of src/prvr/methods/ (read from the folder, so that resolving
    the settings imports no method)."""
    return sorted(p.parent.name for p in METHODS_DIR.glob("*/__init__.py"))


# Top-level sections of params.yaml besides RunSettings' keys (cpu: prvr.procenv's start-up;
# search: prvr.search, read by search_settings only, never by a training's settings).
_SECTIONS = ("dataset", "model", "train", "evaluate", "datasets", "methods", "cpu", "search")

_SEARCH_KEYS = {"split": str, "k": int, "block_videos": int, "stage1": dict, "eval_queries": int, "datasets": dict}
_STAGE1_KEYS = {"kind": str, "candidates": int, "nprobe": int, "ef_search": int}
_FACT_KEYS = {"feature_stride_s": float, "moments_file": str, "encoder": dict}
_ENCODER_KEYS = {"kind": str, "hub": str, "layer": int, "max_tokens": int}


def search_settings(params: Mapping[str, Any], where: str = "params.yaml") -> dict[str, Any]:
    """The `search` section, checked (unknown keys, kinds, ranges) with its defaults."""
    section = dict(params.get("search") or {})
    out = {"split": "test", "k": 10, "block_videos": 256, "eval_queries": 500, "datasets": {},
           "stage1": {"kind": "auto", "candidates": 100, "nprobe": 32, "ef_search": 128}}

    def check(value, kind, name):
        ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{where}: {name} {value!r}: expected {kind.__name__}")
        if kind is int and value < (0 if name.endswith("eval_queries") else 1):
            raise ConfigError(f"{where}: {name} {value!r}: out of range")
        return value

    for key, value in section.items():
        if key not in _SEARCH_KEYS:
            raise ConfigError(f"{where}: search.{key}: unknown key (known: {', '.join(_SEARCH_KEYS)})")
        check(value, _SEARCH_KEYS[key], f"search.{key}")
        if key == "stage1":
            for k2, v2 in value.items():
                if k2 not in _STAGE1_KEYS:
                    raise ConfigError(f"{where}: search.stage1.{k2}: unknown key (known: {', '.join(_STAGE1_KEYS)})")
                out["stage1"][k2] = check(v2, _STAGE1_KEYS[k2], f"search.stage1.{k2}")
        elif key == "datasets":
            for ds, facts in value.items():
                for k2, v2 in (facts or {}).items():
                    if k2 not in _FACT_KEYS:
                        raise ConfigError(f"{where}: search.datasets.{ds}.{k2}: unknown key "
                                          f"(known: {', '.join(_FACT_KEYS)})")
                    if v2 is not None:
                        check(v2, _FACT_KEYS[k2], f"search.datasets.{ds}.{k2}")
                    if k2 == "encoder" and v2 is not None:
                        for k3, v3 in v2.items():
                            name = f"search.datasets.{ds}.encoder.{k3}"
                            if k3 not in _ENCODER_KEYS:
                                raise ConfigError(f"{where}: {name}: unknown key (known: {', '.join(_ENCODER_KEYS)})")
                            if v3 is not None and not (k3 == "layer" and isinstance(v3, int) and not isinstance(v3, bool)):
                                check(v3, _ENCODER_KEYS[k3], name)
                        if v2.get("kind", "roberta") not in ("roberta", "clip"):
                            raise ConfigError(f"{where}: search.datasets.{ds}.encoder.kind {v2['kind']!r}: "
                                              "expected roberta or clip")
                out["datasets"][ds] = dict(facts or {})
        else:
            out[key] = value
    return out


def _run_settings(params: Mapping[str, Any], where: str) -> RunSettings:
    own = [f.name for f in dataclasses.fields(RunSettings)]
    unknown = sorted(set(params) - set(_SECTIONS) - set(own))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown top-level key (known: "
                          f"{', '.join([*_SECTIONS, *own])})")
    return build(RunSettings, {k: params[k] for k in own if k in params}, "", where)


def _dataset(params: Mapping[str, Any], dataset: str, where: str) -> dict[str, Any]:
    known = sorted(params.get("datasets") or {})
    if dataset not in known:
        raise ConfigError(f"{where}: dataset '{dataset}' has no section under 'datasets' "
                          f"(known: {', '.join(known)})")
    facts = _section(params, f"datasets.{dataset}", where=where)
    return dataclasses.asdict(build(DatasetSettings, facts, f"datasets.{dataset}", where))


def _method_name(params: Mapping[str, Any], method: str | None, where: str) -> str:
    model = _section(params, "model", required=False, where=where)
    extra = sorted(set(model) - {"name"})
    if extra:
        raise ConfigError(f"{where}: model.{extra[0]}: unknown key (known: name)")
    name = str(method or model.get("name") or DEFAULT_METHOD)
    if name not in method_names():
        raise ConfigError(f"{where}: model.name: unknown method '{name}' "
                          f"(known: {', '.join(method_names())})")
    return name


def _recipe(params: Mapping[str, Any], dataset: str, method: str, recipe_name: str, where: str
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """The union of `train`, methods.<m>.all and methods.<m>.<recipe_name>, with each key's layer."""
    recipes = (params.get("methods") or {}).get(method) or {}
    if recipe_name in recipes and recipes[recipe_name] is None:
        raise ConfigError(f"{where}: methods.{method}.{recipe_name} is null: {method}'s release "
                          f"publishes no recipe for it; write one there (or point "
                          f"datasets.{dataset}.recipe at another of methods.{method})")
    if recipe_name not in recipes and recipe_name != dataset:
        raise ConfigError(f"{where}: datasets.{dataset}.recipe '{recipe_name}' has no "
                          f"section 'methods.{method}.{recipe_name}'")
    return merge_once([("train", _section(params, "train", required=False, where=where)),
                       (f"methods.{method}.all", _section(params, f"methods.{method}.all", where=where)),
                       (f"methods.{method}.{recipe_name}",
                        _section(params, f"methods.{method}.{recipe_name}", required=False, where=where))],
                      where)


def evaluate_settings(params: Mapping[str, Any], where: str = "params.yaml") -> dict[str, Any]:
    """The `evaluate` section, checked and with every default (the report stage reads it without
    resolving a run)."""
    section = _section(params, "evaluate", required=False, where=where)
    return dataclasses.asdict(build(EvaluateSettings, section, "evaluate", where))


def resolve(params: dict[str, Any], dataset: str | None = None, method: str | None = None,
            where: str = "params.yaml") -> dict[str, Any]:
    """The settings of one run: `dataset` (default params['dataset']) with `method` (default
    params['model']['name']), every section checked and completed by its dataclass; `where`
    names the file in errors. The method's own recipe keys stay a plain dict ("model") that its
    config dataclass checks when the network is built (prvr.methods.build_config), so resolving
    imports no method."""
    run = _run_settings(params, where)
    dataset = str(dataset or params.get("dataset"))
    facts = _dataset(params, dataset, where)
    method = _method_name(params, method, where)
    recipe, origin = _recipe(params, dataset, method, facts["recipe"] or dataset, where)
    loop_keys = [f.name for f in dataclasses.fields(LoopSettings) if f.name in recipe]
    loop = dataclasses.asdict(build(LoopSettings, {k: recipe.pop(k) for k in loop_keys},
                                    f"methods.{method} (with train, for dataset {dataset})", where, origin))
    train = build(TrainSettings, {k: recipe.pop(k) for k in list(recipe) if origin[k] == "train"},
                  "train", where)
    clash = sorted(set(recipe) & set(DATA_DIMS))
    if clash:
        raise ConfigError(f"{where}: {origin[clash[0]]}.{clash[0]}: a data fact (datasets.{dataset}), "
                          "not a recipe key")
    optim = {OPTIM_KEYS[k]: loop.pop(k) for k in OPTIM_KEYS}
    return {
        "dataset": dataset,
        "method": method,
        "data_root": str(Path(os.path.expanduser(run.data_root))),
        "backend": run.backend,
        **facts,
        "model": {**recipe, **{k: facts[k] for k in DATA_DIMS}},
        "optim": optim,
        "train": {**loop, **dataclasses.asdict(train)},
        "evaluate": evaluate_settings(params, where),
        "cpu": cpu_settings(params, where),
    }


def check_precision(value: Any, key: str = "train.precision") -> str:
    return PRECISION(value, key)


def check_compile(value: Any, key: str = "train.compile") -> str | None:
    """None (eager) or the torch.compile backend: false, true (= inductor) or a backend name."""
    COMPILE(value, key)
    if value is None or value is False or str(value).lower() in ("false", "off", "none"):
        return None
    if value is True or str(value).lower() in ("true", "on"):
        return "inductor"
    return value


def check_pin_memory(value: Any, key: str = "train.pin_memory") -> str:
    return str(PIN(value, key)).lower()


def check_backend(value: Any, key: str = "backend", where: str = "params.yaml") -> str:
    """auto, reference or cpu (lower case); anything else is a ConfigError naming `key`."""
    return BACKEND(value, key, where)


def load_settings(path: str | os.PathLike = "params.yaml", dataset: str | None = None,
                  method: str | None = None) -> dict[str, Any]:
    return resolve(load_params(path), dataset, method, where=os.fspath(path))


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


def process_settings(path: str | os.PathLike = "params.yaml") -> tuple[str, str, bool]:
    """(backend, train.device, cpu.process_setup) of a params file: what the train stage's
    start-up (prvr.procenv.setup_process) decides on, read before torch is imported."""
    params, where = load_params(path), os.fspath(path)
    section = _section(params, "train", required=False, where=where)
    own = {f.name for f in dataclasses.fields(TrainSettings)}
    train = build(TrainSettings, {k: v for k, v in section.items() if k in own}, "train", where)
    return (_run_settings(params, where).backend, train.device,
            cpu_settings(params, where)["process_setup"])
