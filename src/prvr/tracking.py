"""MLflow tracking that can never stop the pipeline.

One MLflow experiment per dataset (``prvr-<dataset>``). A training run logs the resolved
settings (flattened) as params, tags (git commit, DVC experiment name, dataset, device),
per-epoch metrics, the best checkpoint, the report, the final test metrics and the model.

The default store is ``sqlite:///<repo root>/mlflow.db`` with artifacts under
``<repo root>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides the store. The repo root is that
of the ORIGINAL repository also under ``dvc exp run --queue`` / ``--temp``, which run each
experiment in a copy under ``.dvc/tmp/exps/`` that DVC deletes afterwards
(:func:`tracking_root`). DVC outputs stay the
source of truth: every MLflow call goes through :meth:`Tracker._call`, which on the first
failure logs ONE warning and switches tracking off for the rest of the process, so a tracking
server that goes away mid-run costs at most one short timeout. MLflow's HTTP retries are
capped through its environment variables (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) unless the user set
them.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "prvr-"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# A dead tracking server must cost seconds, not MLflow's default minutes of retries.
_HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}


def mlflow_installed() -> bool:
    """Whether mlflow can be found, without importing it (tracking is optional: a machine
    without it runs every stage with tracking off)."""
    import importlib.util

    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}{dataset}"


_EXP_TMP = (".dvc", "tmp", "exps")  # where DVC puts the copies of queued and temp experiments


def tracking_root(root: str | os.PathLike = ".") -> Path:
    """The repository whose mlflow.db and mlartifacts/ a run uses.

    DVC sets DVC_ROOT for every stage it runs: the workspace for `dvc repro` / `dvc exp run`,
    and the ORIGINAL repository (not the copy under .dvc/tmp/exps/) for `dvc exp run --queue`
    and `--temp`, so DVC_ROOT wins. Without it, a `root` inside `<repo>/.dvc/tmp/exps/` means
    `<repo>`; else `root` itself."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).absolute()
    path = Path(root).absolute()
    parts = path.parts
    for i in range(len(parts) - len(_EXP_TMP), 0, -1):
        if parts[i:i + len(_EXP_TMP)] == _EXP_TMP:
            return Path(*parts[:i])
    return path


def default_tracking_uri(root: str | os.PathLike = ".") -> str:
    """MLFLOW_TRACKING_URI when set, else an SQLite store in the repository root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(tracking_root(root) / DB_FILE).as_posix()}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists and None become strings."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def git_commit(root: str | os.PathLike = ".") -> str | None:
    """HEAD's commit (with '-dirty' when tracked files differ), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(dataset: str, device: str, method: str, root: str | os.PathLike = ".") -> dict[str, str]:
    """Tags of a training run: dataset, method, device, git commit and, under `dvc exp run`, the
    DVC experiment name and baseline revision (DVC sets DVC_EXP_NAME / DVC_EXP_BASELINE_REV)."""
    tags = {"dataset": dataset, "method": method, "device": str(device)}
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev"),
                     ("DVC_STAGE", "dvc_stage")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


class Tracker:
    """A guarded MLflow client bound to one run.

    ``enabled=False`` (or any MLflow failure) turns every method into a no-op; ``run_id`` is
    None until a run was started or attached.
    """

    def __init__(self, dataset: str, enabled: bool = True, tracking_uri: str | None = None,
                 root: str | os.PathLike = "."):
        self.dataset = dataset
        self.root = tracking_root(root)
        self.enabled = bool(enabled)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.root)
        self.run_id: str | None = None
        self._client = None
        self._warned = False
        if self.enabled and not mlflow_installed():
            self.enabled, self._warned = False, True
            log.warning("MLflow tracking is on but mlflow is not installed: tracking is off for this "
                        "run (pip install mlflow, or pass --no-mlflow); training and the DVC outputs "
                        "are unaffected")
        if self.enabled:
            for key, value in _HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # ---- plumbing ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.enabled and self.run_id is not None

    def _disable(self, what: str, exc: BaseException) -> None:
        self.enabled = False
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking (%s) failed during %s: %s: %s -- tracking is off for "
                        "the rest of this run; training and the DVC outputs are unaffected",
                        self.tracking_uri, what, type(exc).__name__, str(exc).splitlines()[0]
                        if str(exc) else "")

    def _call(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        if not self.enabled:
            return default
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the pipeline
            self._disable(what, exc)
            return default

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        client = self.client()
        name = experiment_name(self.dataset)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:") or self.tracking_uri.startswith("file:") \
                or "://" not in self.tracking_uri:
            location = (self.root / ARTIFACT_DIR).as_uri()
        return client.create_experiment(name, artifact_location=location)

    # ---- runs -------------------------------------------------------------------------
    def start(self, run_id: str | None = None, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> str | None:
        """Attach to `run_id` when it exists (a resumed training), else create a new run."""

        def go():
            client = self.client()
            if run_id:
                try:
                    run = client.get_run(run_id)
                    if run.info.lifecycle_stage == "active":
                        client.update_run(run_id, status="RUNNING")
                        return run_id
                except Exception:  # noqa: BLE001 - a run that is gone: start a new one
                    log.info("MLflow run %s not found; starting a new run", run_id)
            exp_id = self._experiment_id()
            run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            return run.info.run_id

        self.run_id = self._call("start run", go)
        if self.run_id:
            log.info("MLflow run %s (experiment %s, store %s)", self.run_id,
                     experiment_name(self.dataset), self.tracking_uri)
        return self.run_id

    def attach(self, run_id: str | None) -> bool:
        """Bind to an existing run (e.g. the training run, from the evaluate/report stages)."""
        if not run_id:
            return False
        ok = self._call("attach run", lambda: self.client().get_run(run_id) is not None, False)
        self.run_id = run_id if ok else None
        return bool(ok)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]

        def go():
            client = self.client()
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

        self._call("log params", go)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set tags", lambda: self.client().log_batch(self.run_id, tags=items,
                                                                 synchronous=True))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        self._call("log metrics", lambda: self.client().log_batch(self.run_id, metrics=items,
                                                                    synchronous=True))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.active or not Path(path).exists():
            return
        self._call(f"log artifact {path}",
                   lambda: self.client().log_artifact(self.run_id, str(path), artifact_path))

    def log_model(self, model, name: str = "model") -> None:
        """The model as an MLflow PyTorch model (pickled module, torch pinned; no dependency
        inference, signature or example, so it costs one torch.save)."""
        if not self.active:
            return

        def go():
            import mlflow
            import mlflow.pytorch
            import torch

            mlflow.set_tracking_uri(self.tracking_uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(model, name=name, serialization_format="pickle",
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

        self._call("log model", go)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._call("end run", lambda: self.client().set_terminated(self.run_id, status=status))
