"""The training loop of the releases, the same for every method, resumable and exactly
reproducible. `train` reads top-down: `setup` (data, network, loss, optimiser through the
method contract), `restore` (resume from last.pt), then per epoch `train_epoch` and, on rank 0,
`end_epoch` (validate, keep the best, checkpoint, log).

* An epoch visits every training VIDEO once, in batches of `train.batch_size` videos with all
  of their captions. The order of epoch e is a function of (seed, e) only, so a resumed run
  sees the same batches as an uninterrupted one.
* After every epoch the model is validated on the `train.val_split` split with the eval API;
  the checkpoint with the best validation SumR is kept (`best.pt`); training stops early when
  the best has not improved for more than `train.patience` epochs in a row; hard negatives are
  used from epoch `train.hard_negative_start_epoch` (epochs count from 0, as in the release);
  the schedule's t_total is steps_per_epoch * epochs.
* Every epoch ends with `last.pt` (written atomically): model, optimiser, RNG states (torch,
  CUDA, numpy, python, the loss's negative-sampling generator), best-so-far, early-stop
  counter, history and the MLflow run id. Rerunning after a crash resumes from it, unless the
  run's fingerprint (settings hash with the backend, data source, the code the run computes
  with: CODE_PATHS and its method's package) differs: then it moves the old checkpoints aside to
  runs/<ds>/<m>/stale/<UTC time>/ (the last three kept), starts fresh and says why.
* Distributed (torchrun): only rank 0 validates, checkpoints and logs; the decision to stop is
  broadcast. All collective calls go through prvr.distributed.DistContext.
* Accelerator (prvr.accel): `train.precision` bf16 runs the forwards (and the validation's)
  under bf16 autocast with fp32 weights, losses and metrics; `train.tf32` TF32 matmuls in the
  steps; `train.compile` compiles the training forward; `train.pin_memory` and a prefetcher
  overlap the next batch's copy with the current step. Precision, TF32 and compile are in the
  fingerprint (they change the numbers); pin_memory is not (the same values arrive).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .atomic import atomic_path
from .backends import resolve_backend
from .config import settings_hash
from .metrics import METRIC_KEYS

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
STALE = "stale"                   # <run>/stale/<UTC time>/: checkpoints that could not resume
STALE_TIME = "%Y%m%dT%H%M%S.%fZ"  # sorts in time order
KEEP_STALE = 3
_STALE_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
STATE_VERSION = 2


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# fingerprint and RNG


def training_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of the resolved settings that changes what training computes (not evaluation)."""
    s = copy.deepcopy(settings)
    s.pop("evaluate", None)
    s.pop("data_root", None)  # where the data is comes in through the data source record
    s.get("train", {}).pop("pin_memory", None)  # where a batch waits on the host: same values
    s.get("cpu", {}).pop("process_setup", None)  # the allocator and thread waits: same values
    s.pop("archive", None)
    s.pop("sha256", None)
    return s


# The code that decides what a training run computes, relative to src/prvr/ (a folder: its .py
# files), beside the run's own method package: the resume fingerprint hashes exactly these, so an
# edit to another method, the report, tracking (MLflow logging), procenv (allocator and thread
# waits) or the stages' plumbing leaves a run resumable.
# A static list, the same in every process; tests/test_resume.py holds it to what training.py
# imports.
CODE_PATHS = ("__init__.py", "accel.py", "atomic.py", "checkpoint.py", "config.py", "distributed.py",
              "evaluation.py", "losses.py", "metrics.py", "optim.py", "training.py", "data",
              "methods/__init__.py", "methods/base.py", "methods/layers.py", "backends")


_SIBLING_IMPORT = re.compile(r"^\s*from \.\.(\w+)[ .]", re.MULTILINE)


def method_packages(method: str, root: Path) -> list[str]:
    """`method` and the other method packages its code imports (`from ..<package>`, e.g.
    Holmes builds on gmmformer_v2), transitively; read from the source, nothing imported."""
    seen, todo = [], [method]
    while todo:
        name = todo.pop()
        if name in seen or not (root / "methods" / name).is_dir():
            continue
        seen.append(name)
        for path in sorted((root / "methods" / name).rglob("*.py")):
            todo += _SIBLING_IMPORT.findall(path.read_text(encoding="utf-8"))
    return seen


def code_files(method: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The source files a run of `method` computes with: CODE_PATHS and prvr/methods/<m>/ of
    the method and of the method packages it builds on, under `root` (default: this package)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    files: set[Path] = set()
    for rel in (*CODE_PATHS, *(f"methods/{m}" for m in method_packages(method, root))):
        path = root / rel
        files |= set(path.rglob("*.py")) if path.is_dir() else {path} if path.is_file() else set()
    return sorted(files)


def code_hash(method: str, root: str | os.PathLike | None = None) -> str:
    """sha256 over code_files(method, root), each by its path relative to root and its bytes."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in code_files(method, root):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def fingerprint(settings: dict[str, Any], source: dict[str, Any] | None) -> dict[str, str]:
    """What a resume must match: the training settings (backend included), the data source and
    the code of the run's method (code_hash)."""
    return {"settings_hash": settings_hash(training_settings(settings)),
            "data_hash": settings_hash(source or {}),
            "code_hash": code_hash(settings["method"])}


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s data order: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(1)[0])


class EpochShuffleSampler(Sampler[int]):
    """A permutation of range(n) per epoch, drawn from a generator seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(loss_gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _py_state_to_plain(random.getstate()),
        "loss_generator": loss_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], loss_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    random.setstate(_py_state_from_plain(state["python"]))
    loss_gen.set_state(state["loss_generator"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _py_state_to_plain(st) -> list:
    version, internal, gauss = st
    return [int(version), list(internal), gauss]


def _py_state_from_plain(st) -> tuple:
    version, internal, gauss = st
    return (int(version), tuple(int(x) for x in internal), gauss)


# ---------------------------------------------------------------------------------------------
# data (the data helper's API in one place)


def build_corpus(settings: dict[str, Any]):
    from .data.datasets import Corpus

    return Corpus.from_settings(settings)


def stream_kw(model_config: dict[str, Any]) -> dict[str, int]:
    """The data streams a method's config asks for (every config has these three fields)."""
    m = model_config
    return {"n_clips": int(m["n_clips"]), "max_frames": int(m["max_frames"]),
            "max_query_len": int(m["max_query_len"])}


def train_dataset(corpus, settings: dict[str, Any], split: str = "train"):
    from .data.datasets import TrainVideoDataset

    return TrainVideoDataset(corpus, split=split, **stream_kw(settings["model"]))


def data_splits(corpus, train_settings: dict[str, Any]) -> tuple[str, str]:
    """(training split, validation split) of `train.val_split`. With `holdout`, the seeded
    holdout of the training videos (train.holdout_fraction, train.holdout_seed) is registered
    on the corpus as 'holdout_train' / 'holdout_val'; otherwise the collection's 'train' and
    the named split."""
    mode = str(train_settings["val_split"])
    if mode != "holdout":
        return "train", mode
    from dataclasses import replace

    from .data.splits import holdout_split_data

    part_train, part_val = holdout_split_data(corpus.split("train"), float(train_settings["holdout_fraction"]),
                                              int(train_settings["holdout_seed"]))
    corpus.add_split(replace(part_train, name="holdout_train"))
    corpus.add_split(replace(part_val, name="holdout_val"))
    return "holdout_train", "holdout_val"


def selection_note(corpus, val_split: str, settings: dict[str, Any]) -> str | None:
    """The sentence saying the model is selected on (part of) the test split, else None."""
    from .data.splits import selection_warning, split_overlap

    mode, test = str(settings["train"]["val_split"]), str(settings["evaluate"]["split"])
    if mode == "holdout" or not corpus.paths.caption_file(test).is_file():
        return None

    def captions(name: str) -> list[tuple[str, str, str]]:
        d = corpus.split(name)
        return list(zip(d.query_ids, d.query_video_ids, d.texts))

    return selection_warning(split_overlap(captions(val_split), captions(test)), mode)


def train_loader(dataset, batch_size: int, num_workers: int, sampler, pin_memory: bool = False
                 ) -> DataLoader:
    """The epoch's batches in the sampler's order. Workers (num_workers > 0) give the same
    batches as the main process (tests/test_gpu_paths.py) and stay up across epochs."""
    from .data.datasets import collate_train

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_train, drop_last=False,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def eval_loaders(corpus, split: str, video_batch_size: int, query_batch_size: int, num_workers: int,
                 model_config: dict[str, Any], pin_memory: bool = False):
    from .data.datasets import make_eval_loaders

    return make_eval_loaders(corpus, split, video_batch_size, query_batch_size, num_workers,
                             pin_memory=pin_memory, **stream_kw(model_config))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from .accel import to_device as move

    return move(batch, device)


# ---------------------------------------------------------------------------------------------
# outputs


def history_fields(terms: tuple[str, ...]) -> list[str]:
    """Columns of train_history.csv for a loss with these term names."""
    return (["epoch", "hard_negatives", "lr", "epoch_time_s"] + [f"loss_{t}" for t in (*terms, "total")]
            + [f"val_{k}" for k in METRIC_KEYS])


def write_history_csv(path: str | os.PathLike, history: list[dict[str, Any]], terms: tuple[str, ...]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=history_fields(terms), extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    best_epoch: int
    best_val: dict[str, float]
    epochs_run: int               # epochs finished in total (including before a resume)
    stopped_early: bool
    resumed_from: int | None      # last finished epoch we resumed after, or None
    run_id: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0
    fingerprint: dict[str, str] = field(default_factory=dict)
    epochs_trained_now: int = 0   # epochs this call trained (0: the run had already finished)
    terms: tuple[str, ...] = ()   # the method's loss terms


@dataclass
class Run:
    """Everything one training run holds: what it trains, on what, and where it stands."""

    settings: dict[str, Any]
    method: Any                   # prvr.methods.base.Method
    ctx: Any                      # prvr.distributed.DistContext
    ckpt_dir: Path
    fp: dict[str, str]
    loader: DataLoader
    sampler: Any
    val_loaders: tuple | None
    model: torch.nn.Module
    train_model: torch.nn.Module  # model, or its DDP wrapper, compiled when train.compile
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_gen: torch.Generator     # negative sampling; the same stream on every rank
    # where it stands
    start_epoch: int = 0
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in METRIC_KEYS})
    es_count: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    resumed_from: int | None = None
    selection_warning: str | None = None  # set when validation sees the test split
    phase: dict[str, float] = field(default_factory=dict)   # the method's epoch hook, this epoch

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.loss_fn.terms)


def setup(settings: dict[str, Any], ckpt_dir: str | os.PathLike, ctx, source: dict[str, Any] | None) -> Run:
    """Data, network, loss and optimiser of a fresh run (same init on every rank)."""
    from .accel import maybe_compile, use_pin_memory
    from .distributed import seed_for_rank
    from .methods import build_config, get_method
    from .optim import build_optimizer

    tr = settings["train"]
    seed, method, cfg = int(tr["seed"]), get_method(settings["method"]), build_config(settings)
    model_config = dataclasses.asdict(cfg)   # the data streams, defaults included
    corpus = build_corpus(settings)
    train_split, val_split = data_splits(corpus, tr)
    dataset = train_dataset(corpus, {"model": model_config}, train_split)
    sampler = ctx.train_sampler(dataset, seed=seed, shuffle=True) or EpochShuffleSampler(len(dataset), seed)
    num_workers, pin = int(tr["num_workers"]), use_pin_memory(tr["pin_memory"], ctx.device)
    loader = train_loader(dataset, ctx.local_batch_size(int(tr["batch_size"])), num_workers, sampler, pin)
    if len(loader) == 0:
        raise TrainingError("the training split has no videos")
    val_loaders = None
    if ctx.is_main:
        val_loaders = eval_loaders(corpus, val_split, int(tr["val_video_batch_size"]),
                                   int(tr["val_query_batch_size"]), num_workers, model_config, pin)
    seed_everything(seed)
    backend = resolve_backend(settings["backend"], ctx.device)
    model = method.build_model(cfg, backend).to(ctx.device)
    if backend == "cpu":
        from .backends.cpu.kernels import configure_blas

        log.info("backend cpu; BLAS: %s", configure_blas(settings["cpu"]["numpy_blas"]))
    else:
        log.info("backend %s", backend)
    optimizer = build_optimizer(method.param_groups(model, float(settings["optim"]["weight_decay"])),
                                settings["optim"], len(loader) * int(tr["epochs"]))
    loss_gen = torch.Generator()
    loss_gen.manual_seed(seed)
    seed_everything(seed_for_rank(seed, ctx.rank))
    run = Run(settings, method, ctx, Path(ckpt_dir), fingerprint(settings, source), loader, sampler,
              val_loaders, model, maybe_compile(ctx.wrap(model), tr["compile"]),
              method.build_loss(cfg), optimizer, loss_gen)
    run.selection_warning = selection_note(corpus, val_split, settings) if ctx.is_main else None
    return run


def _load_resume_state(ckpt_dir: Path, fp: dict[str, str]) -> tuple[dict | None, str | None]:
    """(the last.pt state to resume from, None), or (None, why the checkpoints there cannot be
    resumed), or (None, None) when there is nothing to resume."""
    from .checkpoint import load_checkpoint

    last = ckpt_dir / LAST
    if not last.is_file():
        return None, (f"{BEST} without {LAST}" if (ckpt_dir / BEST).is_file() else None)
    try:
        ckpt = load_checkpoint(last, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is not fatal: start over
        return None, f"cannot be read ({exc})"
    extra = ckpt.get("extra") or {}
    old = extra.get("fingerprint") or {}
    if extra.get("state_version") != STATE_VERSION:
        return None, "written by another version of the training loop"
    diffs = [k for k in ("settings_hash", "data_hash", "code_hash") if old.get(k) != fp[k]]
    if diffs:
        what = {"settings_hash": "settings", "data_hash": "data source", "code_hash": "code"}
        return None, (f"found a run with different {' and '.join(what[d] for d in diffs)} ("
                      + ", ".join(f"{d} {str(old.get(d))[:12]} != {fp[d][:12]}" for d in diffs) + ")")
    if not (ckpt_dir / BEST).is_file():
        return None, f"{BEST} is missing beside it"
    return ckpt, None


def set_aside(ckpt_dir: str | os.PathLike, keep: int = KEEP_STALE) -> Path | None:
    """Move the last.pt and best.pt of a run that cannot resume into <run>/stale/<UTC time>/
    (moved, never deleted: the run may be wanted back) and delete all but the newest `keep`
    (>= 1) such folders. Returns the folder, or None when there was nothing to move."""
    ckpt_dir = Path(ckpt_dir)
    names = [n for n in (LAST, BEST) if (ckpt_dir / n).is_file()]
    if not names:
        return None
    root = ckpt_dir.parent / STALE
    dest = root / datetime.now(timezone.utc).strftime(STALE_TIME)
    dest.mkdir(parents=True)
    for name in names:
        os.replace(ckpt_dir / name, dest / name)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _STALE_NAME.fullmatch(p.name))
    for old in folders[:-max(int(keep), 1)]:
        shutil.rmtree(old)
    return dest


def restore(run: Run) -> None:
    """Resume `run` from last.pt when its fingerprint matches; else move the old checkpoints
    aside (set_aside) and say why, in one line."""
    ctx, ckpt_dir = run.ctx, run.ckpt_dir
    state = None
    if ctx.is_main:
        for stale in ckpt_dir.glob(".*.pt.*.tmp"):  # half-written by a killed run
            stale.unlink(missing_ok=True)
        state, why = _load_resume_state(ckpt_dir, run.fp)
        if why is not None:
            log.warning("%s: %s; NOT resuming it: moved the old checkpoints to %s; starting fresh",
                        ckpt_dir / LAST, why, set_aside(ckpt_dir))
    state = ctx.broadcast_object(state) if ctx.distributed else state
    if state is None:
        return
    extra = state["extra"]
    run.model.load_state_dict(state["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.resumed_from = int(state["epoch"])
    run.start_epoch = run.resumed_from + 1
    run.best_epoch, run.es_count = int(extra["best_epoch"]), int(extra["es_count"])
    run.best_val = {k: float(v) for k, v in extra["best_val"].items()}
    run.finished = bool(extra.get("finished", False))
    run.history, run.run_id = list(extra.get("history", [])), extra.get("run_id")
    if ctx.is_main:
        set_rng_state(extra["rng"], run.loss_gen)
    else:  # other ranks: their streams restart from (rank seed, epoch)
        from .distributed import seed_for_rank

        seed_everything(epoch_seed(seed_for_rank(int(run.settings["train"]["seed"]), ctx.rank),
                                   run.start_epoch))
        run.loss_gen.set_state(extra["rng"]["loss_generator"].cpu())


def train_epoch(run: Run, epoch: int, progress: bool = True) -> tuple[dict[str, float], float]:
    """One pass over the training videos: (mean loss terms over ranks, last learning rate).

    The forward runs under train.precision's autocast, the loss in fp32 outside it, all of it
    with TF32 matmuls when train.tf32; batch k+1 is moved to the device while k trains. The
    loss sums stay on the device (float64, the values a Python float sum gives): no host
    sync per step, only every 10th when the progress bar shows the loss."""
    from .accel import DevicePrefetcher, autocast, fp32_output, tf32
    from .optim import current_lr

    tr, ctx = run.settings["train"], run.ctx
    if hasattr(run.sampler, "set_epoch"):
        run.sampler.set_epoch(epoch)
    hard = epoch >= int(tr["hard_negative_start_epoch"])
    run.phase = dict(run.method.start_epoch(run.model, run.loss_fn, epoch))
    if run.phase and ctx.is_main:
        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:g}" for k, v in run.phase.items()))
    precision, names = str(tr["precision"]), (*run.terms, "total")
    sums = {t: torch.zeros((), dtype=torch.float64, device=ctx.device) for t in names}
    n_steps, lr, show = 0, current_lr(run.optimizer), progress and ctx.is_main
    run.train_model.train()
    bar = tqdm(DevicePrefetcher(run.loader, ctx.device), desc=f"epoch {epoch}/{int(tr['epochs']) - 1}",
               unit="batch", dynamic_ncols=True, disable=not show, leave=False)
    with tf32(bool(tr["tf32"])):
        for batch in bar:
            with autocast(ctx.device, precision):
                out = run.train_model(batch)
            terms = ctx.compute_loss(run.loss_fn, fp32_output(out), batch["query_labels"], hard,
                                     run.loss_gen, run.model)
            # zeroed, not freed, as the release's zero_grad() (torch 1.9) does: the gradient
            # buffers stay where they are instead of being allocated afresh every step
            run.optimizer.zero_grad(set_to_none=False)
            terms["total"].backward()
            lr = current_lr(run.optimizer)
            run.optimizer.step()
            n_steps += 1
            for t in names:
                sums[t] += terms[t].detach().double()
            if show and n_steps % 10 == 1:
                bar.set_postfix(loss=f"{float(terms['total'].detach()):.4f}")
    bar.close()
    return {t: ctx.all_reduce_mean(float(sums[t]) / max(n_steps, 1)) for t in names}, lr


def end_epoch(run: Run, epoch: int, losses: dict[str, float], lr: float, t0: float,
              history_csv, tracker, progress: bool) -> bool:
    """Rank 0: validate, keep the best, write last.pt and the history, log. True = stop."""
    from .checkpoint import save_checkpoint
    from .evaluation import evaluate

    tr, name = run.settings["train"], run.settings["method"]
    val, _ = evaluate(run.model, run.val_loaders[0], run.val_loaders[1], run.ctx.device, progress=progress,
                      precision=str(tr["precision"]),
                      memory_budget_mb=run.settings["evaluate"]["memory_budget_mb"])
    val = {k: float(val[k]) for k in METRIC_KEYS}
    improved = val["sumr"] > run.best_val["sumr"]
    if improved:
        run.best_val, run.best_epoch, run.es_count = dict(val), epoch, 0
        save_checkpoint(run.ckpt_dir / BEST, run.model, name, None, epoch, val, run.settings,
                        {"fingerprint": run.fp, "run_id": run.run_id, "split": tr["val_split"]})
    else:
        run.es_count += 1
    patience = int(tr["patience"])
    stop = patience >= 0 and run.es_count > patience
    row = {"epoch": epoch, "hard_negatives": int(epoch >= int(tr["hard_negative_start_epoch"])),
           "lr": lr, "epoch_time_s": time.perf_counter() - t0, **run.phase,
           **{f"loss_{t}": v for t, v in losses.items()}, **{f"val_{k}": val[k] for k in METRIC_KEYS}}
    run.history.append(row)
    run.finished = stop or epoch + 1 >= int(tr["epochs"])
    if history_csv is not None:
        write_history_csv(history_csv, run.history, run.terms)
    log.info("epoch %d: loss %.4f (%.1f s) | val %s | %s", epoch, losses["total"], row["epoch_time_s"],
             " ".join(f"{k}={val[k]:.2f}" for k in METRIC_KEYS),
             "new best" if improved else f"no improvement ({run.es_count}/{patience})")
    if tracker is not None:
        tracker.log_metrics({**{f"train_{t}": v for t, v in losses.items()}, "lr": lr,
                             **{f"val_{k}": val[k] for k in METRIC_KEYS},
                             "val_best_sumr": run.best_val["sumr"], "epoch_time_s": row["epoch_time_s"],
                             "hard_negatives": float(row["hard_negatives"]),
                             **{k: float(v) for k, v in run.phase.items()}}, step=epoch)
    # last.pt is the epoch's commit point: written after the history and the MLflow metrics, so
    # a crash after it has lost nothing (one before it reruns the epoch)
    extra = {"state_version": STATE_VERSION, "fingerprint": run.fp, "rng": rng_state(run.loss_gen),
             "best_epoch": run.best_epoch, "best_val": run.best_val, "es_count": run.es_count,
             "finished": run.finished, "stopped_early": stop, "history": run.history, "run_id": run.run_id}
    save_checkpoint(run.ckpt_dir / LAST, run.model, name, run.optimizer, epoch, val, run.settings, extra)
    if stop:
        log.info("early stop: best validation SumR %.2f at epoch %d has not improved for %d epochs",
                 run.best_val["sumr"], run.best_epoch, run.es_count)
    return stop


def _start_tracking(run: Run, tracker) -> None:
    from .data.splits import SELECTION_TAG
    from .tracking import flatten, run_tags

    s = run.settings
    fresh = tracker.start(run_id=run.run_id, run_name=f"{s['method']}-{s['dataset']}",
                          tags=run_tags(s["dataset"], str(run.ctx.device), s["method"]))
    if fresh and fresh != run.run_id:
        tracker.log_params(flatten(s))
        tracker.log_params({"settings_hash": run.fp["settings_hash"], "world_size": run.ctx.world_size,
                            "steps_per_epoch": len(run.loader),
                            "n_parameters": sum(p.numel() for p in run.model.parameters())})
    tracker.set_tags({"resumed_after_epoch": run.resumed_from} if run.resumed_from is not None else {})
    if run.selection_warning:  # the run's description (shown first in the MLflow UI) and a tag
        tracker.set_tags({SELECTION_TAG: run.selection_warning, "mlflow.note.content": run.selection_warning})
    run.run_id = tracker.run_id or run.run_id


def _log_start(run: Run) -> None:
    s, ctx = run.settings, run.ctx
    if run.selection_warning:
        log.warning("%s", run.selection_warning)
    if run.resumed_from is None:
        log.info("training from scratch (%s): %d epochs x %d steps (%d videos, batch %d, device %s, "
                 "world size %d)", s["method"], int(s["train"]["epochs"]), len(run.loader),
                 len(run.loader.dataset), int(s["train"]["batch_size"]), ctx.device, ctx.world_size)
    elif run.finished or run.start_epoch >= int(s["train"]["epochs"]):
        log.info("%s: training already finished for these settings (epoch %d, best %d); delete %s "
                 "to train again", run.ckpt_dir / LAST, run.resumed_from, run.best_epoch, run.ckpt_dir)
    else:
        log.info("resuming after epoch %d from %s (best SumR %.2f at epoch %d, early-stop count %d)",
                 run.resumed_from, run.ckpt_dir / LAST, run.best_val["sumr"], run.best_epoch, run.es_count)


def train(settings: dict[str, Any], ckpt_dir: str | os.PathLike, history_csv: str | os.PathLike | None = None,
          ctx=None, tracker=None, source: dict[str, Any] | None = None, progress: bool = True
          ) -> TrainResult:
    """Train (or resume) the method of `settings`; writes last.pt/best.pt under ckpt_dir."""
    if ctx is None:
        from .distributed import DistContext

        ctx = DistContext.from_env(settings["train"]["device"])
    t_start = time.perf_counter()
    run = setup(settings, ckpt_dir, ctx, source)
    restore(run)
    if ctx.is_main:
        _log_start(run)
        if tracker is not None:
            _start_tracking(run, tracker)
    epoch, epochs = run.start_epoch, int(settings["train"]["epochs"])
    while not run.finished and epoch < epochs:
        t0 = time.perf_counter()
        losses, lr = train_epoch(run, epoch, progress)
        stop = end_epoch(run, epoch, losses, lr, t0, history_csv, tracker, progress) if ctx.is_main else False
        stop = bool(ctx.broadcast_object(stop)) if ctx.distributed else stop
        ctx.barrier()
        epoch += 1
        if stop:
            break
    return _result(run, history_csv, epoch, time.perf_counter() - t_start)


def _result(run: Run, history_csv, epoch: int, seconds: float) -> TrainResult:
    if run.ctx.is_main:
        if history_csv is not None:
            write_history_csv(history_csv, run.history, run.terms)
        if run.best_epoch < 0:
            raise TrainingError("no epoch was validated; nothing to keep")
        if not (run.ckpt_dir / BEST).is_file():
            raise TrainingError(f"{run.ckpt_dir / BEST}: missing although training finished; delete "
                                f"{run.ckpt_dir} and train again")
    epochs = int(run.settings["train"]["epochs"])
    return TrainResult(best_epoch=run.best_epoch, best_val=run.best_val, epochs_run=len(run.history),
                       stopped_early=bool(run.history) and len(run.history) < epochs,
                       resumed_from=run.resumed_from, run_id=run.run_id, history=run.history,
                       train_time_s=seconds, fingerprint=run.fp,
                       epochs_trained_now=epoch - run.start_epoch, terms=run.terms)
