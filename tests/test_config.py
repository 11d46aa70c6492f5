"""Settings have one home each, and every stage's dvc.yaml deps cover the code it imports."""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from prvr.config import (ConfigError, DatasetSettings, EvaluateSettings, TrainSettings, load_params,
                         resolve, settings_hash)


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(REPO / "params.yaml")


def test_every_dataset_and_method_resolves(params):
    from prvr.methods import build_config

    for ds in params["datasets"]:
        for method in params["methods"]:
            recipe = params["datasets"][ds].get("recipe") or ds
            if recipe in params["methods"][method] and params["methods"][method][recipe] is None:
                # a release that publishes no recipe for the dataset: refused, naming why
                with pytest.raises(ConfigError, match=rf"methods\.{method}\.{recipe} is null: .*publishes no recipe"):
                    resolve(params, ds, method)
                continue
            s = resolve(params, ds, method)
            assert s["dataset"] == ds and s["method"] == method
            assert s["model"]["visual_dim"] == params["datasets"][ds]["visual_dim"]
            assert {"seed", "epochs", "batch_size", "patience"} <= set(s["train"])
            assert build_config(s).visual_dim == s["visual_dim"]   # the method's dataclass takes it
            assert json.loads(json.dumps(s)) == s and settings_hash(s)


def test_resolved_sections_are_complete_with_the_dataclass_defaults(params):
    p = copy.deepcopy(params)
    p["train"], p["evaluate"] = {}, {}
    p["datasets"]["demo"] = {k: p["datasets"]["demo"][k] for k in ("collection", "feature", "visual_dim", "text_dim")}
    del p["backend"], p["data_root"]
    s = resolve(p, "demo")
    assert {k: s["train"][k] for k in dataclasses.asdict(TrainSettings())} == dataclasses.asdict(TrainSettings())
    assert s["evaluate"] == dataclasses.asdict(EvaluateSettings())
    assert (s["feature_format"], s["archive"], s["generator"], s["backend"]) == ("bigfile", None, None, "auto")
    assert s["data_root"].endswith("VisualSearch")
    assert set(dataclasses.asdict(DatasetSettings("c", "f", 1, 1))) <= set(s)
    # the same keys as the full params.yaml resolves to: the consumers read one shape
    full = resolve(params, "demo")
    assert set(s) == set(full) and set(s["train"]) == set(full["train"]) and set(s["evaluate"]) == set(full["evaluate"])


@pytest.mark.parametrize("dotted, value, message", [
    ("train.epocs", 3, r"params.yaml: train.epocs: unknown key"),
    ("train.num_workers", "two", r"params.yaml: train.num_workers 'two': expected an integer >= 0"),
    ("train.holdout_fraction", 1.5, r"params.yaml: train.holdout_fraction 1.5: expected a number in \[0, 1\)$"),
    ("train.precision", "fp16", r"params.yaml: train.precision 'fp16': expected one of fp32, bf16"),
    ("train.device", "gpu", r"params.yaml: train.device 'gpu': expected auto, cpu, cuda or cuda:N"),
    ("train.nproc", 0, r"params.yaml: train.nproc 0: expected an integer >= 1"),
    ("evaluate.video_batch_sise", 10, r"params.yaml: evaluate.video_batch_sise: unknown key"),
    ("evaluate.query_batch_size", "big", r"params.yaml: evaluate.query_batch_size 'big': expected an integer >= 1"),
    ("evaluate.extra_splits", "denseval_v", r"params.yaml: evaluate.extra_splits 'denseval_v': expected a list"),
    ("evaluate.memory_budget_mb", -5, r"params.yaml: evaluate.memory_budget_mb -5: expected a number > 0"),
    ("datasets.demo.colection", "demo", r"params.yaml: datasets.demo.colection: unknown key"),
    ("datasets.demo.visual_dim", "256", r"params.yaml: datasets.demo.visual_dim '256': expected an integer >= 1"),
    ("datasets.demo.feature_format", "zarr", r"params.yaml: datasets.demo.feature_format 'zarr': expected one of bigfile, hdf5, bigfile_hdf5"),
    ("datasets.demo.generator", [1], r"params.yaml: datasets.demo.generator \[1\]: expected a mapping or null"),
    ("methods.gmmformer_v2.demo.epochs", -1, r"params.yaml: methods.gmmformer_v2.demo.epochs -1: expected an integer >= 1"),
    ("methods.gmmformer_v2.demo.batch_size", "big", r"methods.gmmformer_v2.demo.batch_size 'big': expected an integer >= 1"),
    ("methods.gmmformer_v2.demo.lr", 0, r"params.yaml: methods.gmmformer_v2.demo.lr 0: expected a number > 0"),
    ("methods.gmmformer_v2.all.lr_warmup_proportion", 2, r"methods.gmmformer_v2.all.lr_warmup_proportion 2: expected a number in \[0, 1\]"),
    ("methods.gmmformer_v2.all.seed", 1.5, r"methods.gmmformer_v2.all.seed 1.5: expected an integer"),
    ("backend", "gpu", r"params.yaml: backend 'gpu': expected one of auto, reference, cpu"),
    ("bakend", "cpu", r"params.yaml: bakend: unknown top-level key"),
    ("model.nme", "x", r"params.yaml: model.nme: unknown key"),
])
def test_a_bad_setting_is_a_one_line_error_naming_file_and_key(params, dotted, value, message):
    p = copy.deepcopy(params)
    *parents, last = dotted.split(".")
    node = p
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError, match=message) as err:
        resolve(p, "demo")
    assert "\n" not in str(err.value)


def test_errors_name_the_file_they_read(tmp_path, params):
    from prvr.config import load_settings

    p = copy.deepcopy(params)
    p["train"]["holdout_fraction"] = 1.5
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(p), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"other.yaml: train.holdout_fraction 1.5: expected a number in \[0, 1\)"):
        load_settings(path, "demo")


def test_a_missing_required_key_names_the_section(params):
    p = copy.deepcopy(params)
    del p["datasets"]["demo"]["visual_dim"]
    with pytest.raises(ConfigError, match=r"params.yaml: datasets.demo lacks visual_dim"):
        resolve(p, "demo")
    p = copy.deepcopy(params)
    del p["methods"]["meanpool"]["demo"]["epochs"]
    with pytest.raises(ConfigError, match=r"methods.meanpool \(with train, for dataset demo\) lacks epochs"):
        resolve(p, "demo", "meanpool")


def test_backend_is_checked_resolved_and_in_the_training_fingerprint(params):
    from prvr.training import fingerprint, training_settings

    assert resolve(params, "demo")["backend"] == "auto"
    p = copy.deepcopy(params)
    p["backend"] = "CPU"
    cpu = resolve(p, "demo", "meanpool")
    assert cpu["backend"] == "cpu"
    ref = {**cpu, "backend": "reference"}
    assert training_settings(cpu)["backend"] == "cpu"
    assert fingerprint(cpu, None)["settings_hash"] != fingerprint(ref, None)["settings_hash"]
    assert fingerprint(cpu, None)["code_hash"] == fingerprint(ref, None)["code_hash"]


def test_evaluate_backend_option_overrides_and_is_checked(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "stages" / "evaluate.py"), "--params",
                           str(REPO / "params.yaml"), "--backend", "gpu", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "evaluate: error: command line: --backend 'gpu': expected one of auto, reference, cpu" in proc.stderr


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
    from prvr.methods import build_config

    for method, key, value, message in [("gmmformer_v2", "hiden_size", 8, r"unknown keys \['hiden_size'\]"),
                                        ("meanpool", "temprature", 0.1, r"unknown keys \['temprature'\]"),
                                        ("meanpool", "hidden_size", "big", r"hidden_size 'big': expected an integer")]:
        p = copy.deepcopy(params)
        p["methods"][method]["demo"][key] = value
        s = resolve(p, "demo", method)           # settings are read without the method...
        with pytest.raises(ConfigError, match=rf"params.yaml: methods.{method}: {message}"):
            build_config(s)                      # ...whose config dataclass checks its keys
    p = copy.deepcopy(params)
    p["methods"]["meanpool"]["all"]["visual_dim"] = 3
    with pytest.raises(ConfigError, match=r"methods.meanpool.all.visual_dim: a data fact"):
        resolve(p, "demo", "meanpool")
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
    # the module's dotted name; a package's __init__ counts as a module inside the package, so
    # that `from .x` (level 1) resolves to the package itself
    pkg = ".".join(path.relative_to(SRC).with_suffix("").parts) if path.is_relative_to(SRC) else ""
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


def _closure(*scripts: Path) -> set[Path]:
    """Every prvr source file the scripts reach through imports (packages: their __init__)."""
    todo, seen = list(scripts), set()
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


METHODS = sorted(p.parent.name for p in (SRC / "prvr" / "methods").glob("*/__init__.py"))


def _deps(stage: str, method: str) -> list[Path]:
    """The stage's dvc.yaml deps for a run of `method` (templating as DVC does it)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    return [REPO / d.replace("${model.name}", method).replace("${dataset}", "demo") for d in spec["deps"]]


def _run_files(stage: str, method: str) -> set[Path]:
    """What a run of `method` imports in the stage: the script's imports, and for train and
    evaluate the method's package and its CPU backend module, which are imported by name."""
    script = REPO / "stages" / f"{stage}.py"
    if stage not in ("train", "evaluate", "index", "search_eval"):
        return _closure(script)
    named = [SRC / "prvr" / "methods" / method / "__init__.py", SRC / "prvr" / "backends" / "cpu" / f"{method}.py"]
    return _closure(script, *[f for f in named if f.is_file()]) | {f for f in named if f.is_file()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stage", ["fetch", "validate", "train", "evaluate", "index", "search_eval", "report"])
def test_stage_deps_cover_every_module_the_stage_imports(stage, method):
    deps = _deps(stage, method)
    missing = [str(f.relative_to(REPO)) for f in sorted(_run_files(stage, method))
               if not any(f == d or d in f.parents for d in deps)]
    assert not missing, f"dvc.yaml stage '{stage}' ({method}) deps miss {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_a_methods_train_and_evaluate_depend_on_no_other_method(method):
    methods = SRC / "prvr" / "methods"
    for stage in ("train", "evaluate"):
        deps = _deps(stage, method)
        assert methods / method in deps and methods not in deps
        # the shared bases (GMMFormer v2's package, which Holmes, RAL and Holmes-DQ build on, and
        # Holmes', Holmes-DQ's; dvc.yaml cannot name a method's own bases): every method may
        # depend on them, on no other method
        others = [d for d in deps for m in METHODS if m not in (method, *SHARED_BASES)
                  and (methods / m == d or methods / m in d.parents)]
        assert not others, f"{stage} of {method} depends on {others}"


SHARED_BASES = ("gmmformer_v2", "holmes")


def test_only_the_shared_base_is_imported_across_method_packages():
    """What dvc.yaml's shared base deps cover: no method package imports another, except from
    the shared bases (the resume fingerprint follows these imports exactly)."""
    from prvr.training import method_packages

    for method in METHODS:
        bases = set(method_packages(method, SRC / "prvr")) - {method}
        assert bases <= set(SHARED_BASES), f"{method} imports {bases - set(SHARED_BASES)}"


def test_fetch_and_validate_depend_on_no_model_code():
    for stage in ("fetch", "validate"):
        deps = {str(d.relative_to(REPO)) for d in _deps(stage, "gmmformer_v2")}
        model_code = [d for d in deps if d.startswith(("src/prvr/methods", "src/prvr/backends"))
                      or d in ("src/prvr/losses.py", "src/prvr/kernels.py")]
        assert not model_code, f"{stage} depends on {model_code}"


def test_the_dependency_check_sees_function_level_imports():
    files = {str(f.relative_to(SRC)) for f in _closure(REPO / "stages" / "train.py")}
    # training.py imports checkpoint.py and optim.py only inside functions
    assert {"prvr/training.py", "prvr/checkpoint.py", "prvr/optim.py", "prvr/methods/__init__.py",
            "prvr/methods/base.py"} <= files      # base.py: `from .base import` in a package's __init__


# ------------------------------------------------------------------ what a stage imports


_STAGE_MODULES = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    print("exit", exc.code)
print(sorted(m for m in sys.modules if m.startswith("prvr")))
"""


@pytest.mark.parametrize("stage", ["fetch", "validate"])
def test_fetch_and_validate_import_no_model_code(stage, tmp_path):
    """Run in a fresh interpreter, the stage reads its settings and the data without importing
    prvr.methods, the backends or the losses (sys.modules after it finished)."""
    import subprocess
    import sys

    from msssl_factory import write_collection, write_params

    write_collection(tmp_path / "root")
    params = write_params(tmp_path / "params.yaml", tmp_path / "root")
    argv = ["--params", str(params), "--data-dir", str(tmp_path / "data"), "--no-progress"]
    for script in ("fetch", stage):       # validate reads what fetch wrote
        proc = subprocess.run([sys.executable, "-c", _STAGE_MODULES, str(REPO / "stages" / f"{script}.py"), *argv],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exit 0" in proc.stdout, proc.stderr[-2000:]
    loaded = ast.literal_eval(proc.stdout.splitlines()[-1])
    assert "prvr.config" in loaded and "prvr.data.layout" in loaded
    model_code = [m for m in loaded if m.startswith(("prvr.methods", "prvr.backends", "prvr.losses", "prvr.kernels"))]
    assert not model_code, f"stages/{stage}.py imported {model_code}"


def test_every_method_is_a_package_with_its_method():
    from prvr.methods import available, get_method
    from prvr.methods.meanpool import METHOD, MeanPoolConfig

    methods = SRC / "prvr" / "methods"
    assert available() == METHODS and "meanpool" in METHODS
    assert not [p.name for p in methods.glob("*.py") if p.stem not in ("__init__", "base", "layers")]
    assert METHOD is get_method("meanpool") and METHOD.config_class is MeanPoolConfig
