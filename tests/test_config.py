"""Settings have one home each, and every stage's dvc.yaml deps cover the code it imports."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from prvr.config import ConfigError, load_params, resolve


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(REPO / "params.yaml")


def test_every_dataset_and_method_resolves(params):
    for ds in params["datasets"]:
        for method in params["methods"]:
            s = resolve(params, ds, method)
            assert s["dataset"] == ds and s["method"] == method
            assert s["model"]["visual_dim"] == params["datasets"][ds]["visual_dim"]
            assert {"seed", "epochs", "batch_size", "patience"} <= set(s["train"])


def test_a_key_set_in_two_places_is_an_error(params):
    p = copy.deepcopy(params)
    p["train"]["epochs"] = 3          # what `dvc exp run -S train.epochs=3` does
    with pytest.raises(ConfigError, match=r"'epochs' is set in both 'train.epochs' and "
                                          r"'methods.gmmformer_v2.demo.epochs'"):
        resolve(p, "demo")
    p = copy.deepcopy(params)
    p["methods"]["gmmformer_v2"]["all"]["lr"] = 1e-4
    with pytest.raises(ConfigError, match="methods.gmmformer_v2.all.lr"):
        resolve(p, "demo")


def test_the_value_a_run_uses_is_the_one_params_lists(params):
    p = copy.deepcopy(params)
    p["methods"]["gmmformer_v2"]["demo"]["epochs"] = 3
    p["methods"]["gmmformer_v2"]["demo"]["clip_nce"] = 0.5
    s = resolve(p, "demo")
    assert s["train"]["epochs"] == 3 and s["model"]["clip_nce"] == 0.5
    assert resolve(params, "tvr")["model"]["clip_nce"] == 0.05    # per dataset, named


def test_unknown_method_keys_and_methods_are_clear_errors(params):
    p = copy.deepcopy(params)
    p["methods"]["gmmformer_v2"]["demo"]["hiden_size"] = 8
    with pytest.raises(ConfigError, match=r"methods.gmmformer_v2: unknown keys \['hiden_size'\]"):
        resolve(p, "demo")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        resolve(params, "demo", "nope")
    with pytest.raises(ConfigError, match="dataset 'nope' has no section"):
        resolve(params, "nope")


# ------------------------------------------------------------------ dvc.yaml deps vs imports
SRC = REPO / "src"


def _module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """prvr modules `path` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(SRC).with_suffix("").parts) if path.is_relative_to(SRC) else ""
    if path.name == "__init__.py":
        pkg += ".__init__"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "prvr"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:-node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "prvr":
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names if _module_file(f"{mod}.{a.name}")}
    return found


def _closure(script: Path) -> set[Path]:
    """Every prvr source file `script` reaches through imports (packages: their __init__)."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        for mod in _imports(path):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):   # importing a.b.c runs a/__init__ and a/b/__init__
                f = _module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append(f)
    return seen


@pytest.mark.parametrize("stage", ["fetch", "validate", "train", "evaluate", "report"])
def test_stage_deps_cover_every_module_the_stage_imports(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    script = REPO / spec["cmd"].split()[1]
    deps = [REPO / d for d in spec["deps"]]
    missing = [str(f.relative_to(REPO)) for f in sorted(_closure(script))
               if not any(f == d or d in f.parents for d in deps)]
    assert not missing, f"dvc.yaml stage '{stage}' deps miss {missing}"


def test_the_dependency_check_sees_function_level_imports():
    files = {str(f.relative_to(SRC)) for f in _closure(REPO / "stages" / "train.py")}
    # training.py imports checkpoint.py and optim.py only inside functions
    assert {"prvr/training.py", "prvr/checkpoint.py", "prvr/optim.py", "prvr/methods/__init__.py"} <= files
