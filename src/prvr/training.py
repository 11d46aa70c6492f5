"""The training loop of the release, made resumable and exactly reproducible.

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
  run's fingerprint (settings hash, data source, training code) differs: then it starts fresh
  and says why.
* Distributed (torchrun): only rank 0 validates, checkpoints and logs; the decision to stop is
  broadcast. All collective calls go through prvr.distributed.DistContext.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .atomic import atomic_path
from .config import settings_hash

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
STATE_VERSION = 1
LOSS_TERMS = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl", "oml", "total")
VAL_KEYS = ("r1", "r5", "r10", "r100", "sumr")
# Test hook: exit hard (no cleanup, like a crash) right after epoch N's checkpoint is written.
CRASH_ENV = "PRVR_TEST_CRASH_AFTER_EPOCH"
# Modules whose code defines what a training run computes (part of the resume fingerprint).
_CODE_MODULES = ("training.py", "model.py", "losses.py", "optim.py", "distributed.py",
                 "data/datasets.py", "data/features.py", "data/layout.py")


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# fingerprint and RNG


def training_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of the resolved settings that changes what training computes (not evaluation)."""
    s = copy.deepcopy(settings)
    s.pop("evaluate", None)
    s.pop("data_root", None)  # where the data is comes in through the data source record
    s.pop("archive", None)
    s.pop("sha256", None)
    return s


def code_hash() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for rel in _CODE_MODULES:
        p = root / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()


def fingerprint(settings: dict[str, Any], source: dict[str, Any] | None) -> dict[str, str]:
    return {"settings_hash": settings_hash(training_settings(settings)),
            "data_hash": settings_hash(source or {}),
            "code_hash": code_hash()}


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


def stream_kw(settings: dict[str, Any]) -> dict[str, int]:
    m = settings["model"]
    return {"n_clips": int(m["n_clips"]), "max_frames": int(m["max_frames"]),
            "max_query_len": int(m["max_query_len"])}


def train_dataset(corpus, settings: dict[str, Any]):
    from .data.datasets import TrainVideoDataset

    return TrainVideoDataset(corpus, split="train", **stream_kw(settings))


def train_loader(dataset, batch_size: int, num_workers: int, sampler) -> DataLoader:
    from .data.datasets import collate_train

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_train, drop_last=False,
                      persistent_workers=False)


def eval_loaders(corpus, split: str, video_batch_size: int, query_batch_size: int, num_workers: int,
                 settings: dict[str, Any]):
    from .data.datasets import make_eval_loaders

    return make_eval_loaders(corpus, split, video_batch_size, query_batch_size, num_workers,
                             **stream_kw(settings))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# outputs


HISTORY_FIELDS = (["epoch", "hard_negatives", "lr", "epoch_time_s"]
                  + [f"loss_{t}" for t in LOSS_TERMS] + [f"val_{k}" for k in VAL_KEYS])


def write_history_csv(path: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
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


def _load_resume_state(ckpt_dir: Path, fp: dict[str, str]):
    """The last.pt state to resume from, or None (with the reason logged)."""
    from .checkpoint import load_checkpoint

    last = ckpt_dir / LAST
    if not last.is_file():
        return None
    try:
        ckpt = load_checkpoint(last, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is not fatal: start over
        log.warning("%s: cannot be read (%s); starting training from scratch", last, exc)
        return None
    extra = ckpt.get("extra") or {}
    old = extra.get("fingerprint") or {}
    if extra.get("state_version") != STATE_VERSION:
        log.warning("%s: written by another version of the training loop; starting from scratch", last)
        return None
    diffs = [k for k in ("settings_hash", "data_hash", "code_hash") if old.get(k) != fp[k]]
    if diffs:
        what = {"settings_hash": "settings", "data_hash": "data source",
                "code_hash": "training code"}
        log.warning("%s: found a run with different %s (%s); NOT resuming it, starting fresh",
                    last, " and ".join(what[d] for d in diffs),
                    ", ".join(f"{d} {str(old.get(d))[:12]} != {fp[d][:12]}" for d in diffs))
        return None
    if not (ckpt_dir / BEST).is_file():
        log.warning("%s: missing next to %s; starting training from scratch", ckpt_dir / BEST, last)
        return None
    return ckpt


def train(settings: dict[str, Any], ckpt_dir: str | os.PathLike, history_csv: str | os.PathLike | None = None,
          ctx=None, tracker=None, source: dict[str, Any] | None = None, progress: bool = True
          ) -> TrainResult:
    """Train (or resume) the model of `settings`; writes last.pt/best.pt under ckpt_dir."""
    from .checkpoint import save_checkpoint
    from .evaluation import evaluate
    from .losses import GMMFormerLoss
    from .model import GMMFormer, GMMFormerConfig
    from .optim import build_optimizer, current_lr

    if ctx is None:
        from .distributed import DistContext

        ctx = DistContext.from_env(settings["train"].get("device", "auto"))
    tr = settings["train"]
    seed = int(tr["seed"])
    epochs = int(tr["epochs"])
    patience = int(tr["patience"])
    hard_start = int(tr["hard_negative_start_epoch"])
    num_workers = int(tr.get("num_workers", 0))
    device = ctx.device
    ckpt_dir = Path(ckpt_dir)
    fp = fingerprint(settings, source)
    t_start = time.perf_counter()

    # ---- data
    corpus = build_corpus(settings)
    dataset = train_dataset(corpus, settings)
    local_bs = ctx.local_batch_size(int(tr["batch_size"]))
    sampler = ctx.train_sampler(dataset, seed=seed, shuffle=True)
    if sampler is None:
        sampler = EpochShuffleSampler(len(dataset), seed)
    loader = train_loader(dataset, local_bs, num_workers, sampler)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError("the training split has no videos")
    val_loaders = None
    if ctx.is_main:
        val_loaders = eval_loaders(corpus, str(tr.get("val_split", "val")),
                                   int(tr.get("val_video_batch_size", 100)),
                                   int(tr.get("val_query_batch_size", 50)), num_workers, settings)

    # ---- model, loss, optimiser (same init on every rank: seeded with the run seed)
    seed_everything(seed)
    model = GMMFormer(GMMFormerConfig.from_dict(settings["model"])).to(device)
    loss_fn = GMMFormerLoss.from_settings(settings["loss"])
    t_total = steps_per_epoch * epochs
    optimizer = build_optimizer(model, settings["optim"], t_total)
    loss_gen = torch.Generator()  # negative sampling; same stream on every rank
    loss_gen.manual_seed(seed)
    from .distributed import seed_for_rank

    rank_seed = seed_for_rank(seed, ctx.rank)
    seed_everything(rank_seed)

    # ---- resume
    start_epoch, best_epoch, es_count, finished = 0, -1, 0, False
    best_val = {k: 0.0 for k in VAL_KEYS}
    history: list[dict[str, Any]] = []
    run_id = None
    resumed_from = None
    state = None
    if ctx.is_main:
        for stale in ckpt_dir.glob(".*.pt.*.tmp"):  # half-written by a killed run
            stale.unlink(missing_ok=True)
        state = _load_resume_state(ckpt_dir, fp)
        if state is None:
            for name in (LAST, BEST):
                (ckpt_dir / name).unlink(missing_ok=True)
    state = ctx.broadcast_object(state) if ctx.distributed else state
    if state is not None:
        extra = state["extra"]
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        resumed_from = int(state["epoch"])
        best_epoch = int(extra["best_epoch"])
        best_val = {k: float(v) for k, v in extra["best_val"].items()}
        es_count = int(extra["es_count"])
        finished = bool(extra.get("finished", False))
        history = list(extra.get("history", []))
        run_id = extra.get("run_id")
        if ctx.is_main:
            set_rng_state(extra["rng"], loss_gen)
        else:  # other ranks: their streams restart from (rank seed, epoch)
            seed_everything(epoch_seed(rank_seed, start_epoch))
            loss_gen.set_state(extra["rng"]["loss_generator"].cpu())
        if ctx.is_main:
            if finished or start_epoch >= epochs:
                log.info("%s: training already finished for these settings (epoch %d, best %d); "
                         "delete %s to train again", ckpt_dir / LAST, resumed_from, best_epoch, ckpt_dir)
            else:
                log.info("resuming after epoch %d from %s (best SumR %.2f at epoch %d, early-stop "
                         "count %d)", resumed_from, ckpt_dir / LAST, best_val["sumr"], best_epoch, es_count)
    elif ctx.is_main:
        log.info("training from scratch: %d epochs x %d steps (%d videos, batch %d, device %s, "
                 "world size %d)", epochs, steps_per_epoch, len(dataset), int(tr["batch_size"]),
                 device, ctx.world_size)

    # ---- tracking (rank 0)
    if ctx.is_main and tracker is not None:
        from .tracking import flatten, run_tags

        fresh_run = tracker.start(run_id=run_id, run_name=f"{settings['dataset']}-train",
                                  tags=run_tags(settings["dataset"], str(device)))
        if fresh_run and fresh_run != run_id:
            tracker.log_params(flatten({k: v for k, v in settings.items()}))
            tracker.log_params({"settings_hash": fp["settings_hash"], "world_size": ctx.world_size,
                                "steps_per_epoch": steps_per_epoch, "t_total": t_total})
        tracker.set_tags({"resumed_after_epoch": resumed_from} if resumed_from is not None else {})
        run_id = tracker.run_id or run_id

    train_model = ctx.wrap(model)
    crash_after = os.environ.get(CRASH_ENV)
    crash_after = int(crash_after) if crash_after not in (None, "") else None

    epoch = start_epoch
    while not finished and epoch < epochs:
        t0 = time.perf_counter()
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        hard = epoch >= hard_start
        train_model.train()
        sums = {t: 0.0 for t in LOSS_TERMS}
        n_steps = 0
        lr = current_lr(optimizer)
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs - 1}", unit="batch", dynamic_ncols=True,
                   disable=not (progress and ctx.is_main), leave=False)
        for batch in bar:
            batch = to_device(batch, device)
            out = train_model(batch)
            terms = ctx.compute_loss(loss_fn, out, batch["query_labels"], hard, loss_gen)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            lr = current_lr(optimizer)
            optimizer.step()
            n_steps += 1
            for t in LOSS_TERMS:
                sums[t] += float(terms[t].detach())
            bar.set_postfix(loss=f"{float(terms['total'].detach()):.4f}")
        bar.close()
        losses = {t: ctx.all_reduce_mean(sums[t] / max(n_steps, 1)) for t in LOSS_TERMS}
        train_time = time.perf_counter() - t0

        stop = False
        if ctx.is_main:
            val, _ = evaluate(ctx.unwrap(train_model), val_loaders[0], val_loaders[1], device,
                              progress=progress)
            val = {k: float(val[k]) for k in VAL_KEYS}
            improved = val["sumr"] > best_val["sumr"]
            if improved:
                best_val, best_epoch, es_count = dict(val), epoch, 0
                save_checkpoint(ckpt_dir / BEST, model, None, epoch, val, settings,
                                {"fingerprint": fp, "run_id": run_id, "split": tr.get("val_split", "val")})
            else:
                es_count += 1
            stop = patience >= 0 and es_count > patience
            row = {"epoch": epoch, "hard_negatives": int(hard), "lr": lr,
                   "epoch_time_s": time.perf_counter() - t0,
                   **{f"loss_{t}": losses[t] for t in LOSS_TERMS},
                   **{f"val_{k}": val[k] for k in VAL_KEYS}}
            history.append(row)
            finished = stop or epoch + 1 >= epochs
            extra = {"state_version": STATE_VERSION, "fingerprint": fp, "rng": rng_state(loss_gen),
                     "best_epoch": best_epoch, "best_val": best_val, "es_count": es_count,
                     "finished": finished, "stopped_early": stop, "history": history, "run_id": run_id}
            save_checkpoint(ckpt_dir / LAST, model, optimizer, epoch, val, settings, extra)
            if history_csv is not None:
                write_history_csv(history_csv, history)
            log.info("epoch %d: loss %.4f (%.1f s train, %.1f s total) | val R@1 %.2f R@5 %.2f "
                     "R@10 %.2f R@100 %.2f SumR %.2f | %s", epoch, losses["total"], train_time,
                     row["epoch_time_s"], val["r1"], val["r5"], val["r10"], val["r100"], val["sumr"],
                     "new best" if improved else f"no improvement ({es_count}/{patience})")
            if tracker is not None:
                tracker.log_metrics({**{f"train_{t}": losses[t] for t in LOSS_TERMS}, "lr": lr,
                                     **{f"val_{k}": val[k] for k in VAL_KEYS},
                                     "val_best_sumr": best_val["sumr"], "epoch_time_s": row["epoch_time_s"],
                                     "hard_negatives": float(hard)}, step=epoch)
            if stop:
                log.info("early stop: best validation SumR %.2f at epoch %d has not improved for "
                         "%d epochs", best_val["sumr"], best_epoch, es_count)
            if crash_after is not None and epoch == crash_after:
                log.warning("%s=%d: exiting hard after epoch %d (test hook)", CRASH_ENV, crash_after, epoch)
                os._exit(75)
        stop = bool(ctx.broadcast_object(stop)) if ctx.distributed else stop
        ctx.barrier()
        epoch += 1
        if stop:
            break

    if ctx.is_main and history_csv is not None:
        write_history_csv(history_csv, history)
    if ctx.is_main and best_epoch < 0:
        raise TrainingError("no epoch was validated; nothing to keep")
    if ctx.is_main and not (ckpt_dir / BEST).is_file():
        raise TrainingError(f"{ckpt_dir / BEST}: missing although training finished; delete "
                            f"{ckpt_dir} and train again")
    stopped_early = bool(history) and len(history) < epochs
    return TrainResult(best_epoch=best_epoch, best_val=best_val, epochs_run=len(history),
                       stopped_early=stopped_early, resumed_from=resumed_from, run_id=run_id,
                       history=history, train_time_s=time.perf_counter() - t_start, fingerprint=fp,
                       epochs_trained_now=epoch - start_epoch)


def load_best(ckpt_dir: str | os.PathLike):
    from .checkpoint import load_checkpoint

    return load_checkpoint(Path(ckpt_dir) / BEST, map_location="cpu")
