"""Multi-GPU / multi-node training with torchrun and DistributedDataParallel.

One model is trained by ``world_size`` processes (one per GPU, or several on CPU with gloo).
The semantics are those of one device with the *global* batch:

- every rank encodes its share of the batch's videos (and their captions); every tensor of the
  method's TrainOutput (``queries`` and ``videos``: the query encodings, the videos' fixed
  tensors and their sequence) is gathered from all ranks WITH gradient, the method's
  ``train_scores`` rebuilds the global score matrices, and the whole objective is computed on
  them by every rank, with the same ``torch.Generator`` state everywhere so negative sampling
  draws identically;
- the loss's ``local_sums`` (GMMFormer v2: the Hungarian matching of OML) stay local: each rank
  sums over its own videos and the (sum, count) pairs are combined across ranks;
- gradient scaling: the gather's backward sums the gradient that every rank computes for a
  rank's embeddings, i.e. it multiplies the single-device gradient by ``world_size``, and DDP
  divides by ``world_size`` when it averages parameter gradients. The local OML term is given
  the same ``world_size`` factor, so the averaged gradient equals the single-device gradient of
  the global batch exactly (up to float summation order).

``train.batch_size`` keeps meaning the global batch: each rank loads
``local_batch_size(batch_size)`` videos per step. With ``world_size == 1`` every method is the
plain single-process path (no process group, no wrapper, no gather).

Only rank 0 validates, checkpoints and logs; the others wait in ``barrier()``. A crash on one
rank ends the job: torchrun's agent terminates the remaining workers when one exits non-zero,
and every collective (barriers included) is bounded by the process-group timeout
(``PRVR_DIST_TIMEOUT`` seconds, default 1800) for the case where a peer on another node died.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
import subprocess
import sys
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .methods import TrainOutput, VideoEncoding, unwrap_model
from .methods.base import TOKEN_QUERY_KEYS

__all__ = [
    "DistContext",
    "DistError",
    "seed_for_rank",
    "maybe_relaunch",
    "relaunch_command",
    "under_torchrun",
    "gather_with_grad",
    "DEFAULT_TIMEOUT_S",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
_TIMEOUT_ENV = "PRVR_DIST_TIMEOUT"

# torch.distributed.nn.functional.all_gather (autograd-aware; reduce-scatter backward on NCCL,
# all-to-all on gloo) warns on every call that it is deprecated; it is still the supported
# eager autograd gather for every backend, so the warning is silenced for this one call site.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    category=FutureWarning)


class DistError(RuntimeError):
    """A distributed setting that cannot work (one-line message)."""


def seed_for_rank(seed: int, rank: int) -> int:
    """The seed a rank uses for its own randomness (dropout, data-loader workers).

    Rank 0 keeps the run seed, so a one-process run is unchanged; other ranks get a seed
    derived from (seed, rank) with numpy's SeedSequence (distinct, reproducible, < 2**31).
    Model initialisation and loss negative sampling must NOT use it: parameters are broadcast
    from rank 0 by DDP, and the loss generator is seeded with the run seed on every rank.
    """
    seed, rank = int(seed), int(rank)
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank == 0:
        return seed
    state = np.random.SeedSequence([seed % 2**32, rank]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


def under_torchrun(environ: dict | None = None) -> bool:
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or "RANK" in env


def relaunch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs script ``argv[0]`` with ``argv[1:]`` on ``nproc`` local
    processes (standalone rendezvous on a free port)."""
    if not argv:
        raise ValueError("argv must hold the script path")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nnodes", "1", "--nproc_per_node", str(int(nproc)), str(argv[0]), *map(str, argv[1:])]


def maybe_relaunch(nproc: int, argv: Sequence[str] | None = None) -> None:
    """Re-run this script through torchrun when ``nproc > 1`` and not already under torchrun.

    Call it first thing in a stage's main(); it returns (doing nothing) for ``nproc <= 1`` or
    inside a torchrun worker. Otherwise it runs ``relaunch_command`` and exits with its return
    code, forwarding SIGINT/SIGTERM to torchrun (which forwards them to the workers).
    """
    nproc = int(nproc)
    if nproc < 1:
        raise DistError(f"params.yaml: train.nproc must be >= 1, got {nproc}")
    if nproc == 1 or under_torchrun():
        return
    argv = list(sys.argv if argv is None else argv)
    cmd = relaunch_command(nproc, argv)
    log.info("train.nproc=%d: relaunching through torchrun: %s", nproc, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if rc < 0:                                     # killed by a signal: shell convention
        rc = 128 - rc
    if rc != 0:
        log.error("torchrun exited with code %d", rc)
    sys.exit(rc)


def _timeout_from_env() -> datetime.timedelta:
    raw = os.environ.get(_TIMEOUT_ENV)
    if raw is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise DistError(f"{_TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise DistError(f"{_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def gather_with_grad(tensor: Tensor) -> list[Tensor]:
    """all_gather whose backward sends every rank's gradient for a slice back to its owner and
    sums them (reduce-scatter). All ranks must pass tensors of the same shape."""
    import torch.distributed.nn.functional as dist_nn

    return list(dist_nn.all_gather(tensor))


class DistContext:
    """Where this process sits in a (possibly one-process) training job.

    Attributes: ``rank``, ``world_size``, ``local_rank``, ``is_main`` (rank 0), ``device``,
    ``backend`` (None for one process).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | str = "cpu", backend: str | None = None):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_rank = int(local_rank)
        self.device = torch.device(device)
        self.backend = backend
        self.is_main = self.rank == 0
        self._generator_checked = False

    def __repr__(self) -> str:
        return (f"DistContext(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, device={self.device}, backend={self.backend})")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_env(cls, device_setting: str = "auto") -> "DistContext":
        """Read torchrun's environment. WORLD_SIZE > 1: init the process group (NCCL with one
        GPU per local rank when the device is CUDA, gloo on CPU) with a bounded timeout.
        Otherwise the device is ``resolve_device(device_setting)`` and nothing is initialised."""
        from .config import resolve_device

        env = os.environ
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise DistError("WORLD_SIZE/RANK/LOCAL_RANK: expected integers "
                            f"(got {env.get('WORLD_SIZE')!r}/{env.get('RANK')!r}/"
                            f"{env.get('LOCAL_RANK')!r})") from None
        device = resolve_device(device_setting)
        if world_size <= 1:
            return cls(0, 1, 0, device, None)
        if device.type == "cuda":
            n_gpu = torch.cuda.device_count()
            if local_rank >= n_gpu:
                raise DistError(f"LOCAL_RANK {local_rank} has no GPU (this node has {n_gpu}); "
                                f"use at most {n_gpu} processes per node")
            if device.index is not None and device.index != local_rank:
                log.warning("device %s ignored under torchrun: local rank %d uses cuda:%d",
                            device, local_rank, local_rank)
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise DistError(f"train.device {device_setting!r}: distributed training supports "
                            "cuda (nccl) and cpu (gloo)")
        timeout = _timeout_from_env()
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
            if backend == "nccl":
                kwargs["device_id"] = device
            dist.init_process_group(**kwargs)
        ctx = cls(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)
        log.info("rank %d/%d (local %d) on %s, backend %s, timeout %ss", ctx.rank, ctx.world_size,
                 local_rank, device, backend, int(timeout.total_seconds()))
        return ctx

    # ---- model and data -----------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` (already on ``self.device``) when distributed; else ``model``."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The model's buffers are constants built from its config (the Gaussian matrices), so
        # they are synced once at wrap time, not before every forward.
        if self.device.type == "cuda":
            return DDP(model, device_ids=[self.device.index], output_device=self.device.index,
                       forward_sync_buffers=False)
        return DDP(model, forward_sync_buffers=False)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return unwrap_model(model)

    def local_batch_size(self, batch_size: int) -> int:
        """Videos per rank per step so that the global batch is ``batch_size``."""
        batch_size = int(batch_size)
        if batch_size % self.world_size:
            raise DistError(f"params.yaml: train.batch_size {batch_size} is not divisible by "
                            f"the number of processes {self.world_size}")
        return batch_size // self.world_size

    def train_sampler(self, dataset, seed: int, shuffle: bool = True):
        """A DistributedSampler giving each rank a disjoint share of the videos (reshuffled per
        epoch: call ``sampler.set_epoch(epoch)``), or None for one process.

        ``drop_last=True``: when the number of videos is not a multiple of world_size, up to
        world_size-1 videos (a different random set each epoch) are skipped in an epoch rather
        than duplicated, so a global batch never holds the same video twice.
        """
        if not self.distributed:
            return None
        from torch.utils.data import DistributedSampler

        if len(dataset) < self.world_size:
            raise DistError(f"{len(dataset)} training videos cannot be shared by "
                            f"{self.world_size} processes")
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                  shuffle=shuffle, seed=int(seed), drop_last=True)

    # ---- synchronisation ----------------------------------------------------------------
    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_reduce_mean(self, value: float) -> float:
        """Mean of a float over ranks (for logging)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        """Tear down the process group (idempotent; no-op for one process)."""
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the global loss ----------------------------------------------------------------
    def compute_loss(self, loss_fn: Callable, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                     generator: torch.Generator | None, model: nn.Module) -> dict[str, Tensor]:
        """The objective of the global batch.

        One process: ``loss_fn(out, labels, hard_negatives, generator)``. Distributed: gather
        ``out.queries`` and ``out.videos`` of every rank with gradient (sequences, and the query
        token axis of TOKEN_QUERY_KEYS, padded to a common length; labels offset by each rank's
        first video), rebuild the scores with the
        method's ``train_scores``, and run ``loss_fn`` on the global output with its
        ``local_sums`` combined over ranks. Every rank returns the same values; after DDP
        averages, the gradients equal those of one device on the global batch. ``generator``
        must be in the same state on every rank (the run seed, not ``seed_for_rank``).
        """
        if not self.distributed:
            return loss_fn(out, labels, hard_negatives, generator)
        if not isinstance(out, TrainOutput):
            raise DistError(f"compute_loss: expected a TrainOutput, got {type(out).__name__}")
        labels = labels.to(out.queries["query"].device)
        if not self._generator_checked:
            self._check_same_generator(generator)
            self._generator_checked = True
        queries, videos, g_labels = self._gather(out, labels)
        g_out = TrainOutput(queries, videos, unwrap_model(model).train_scores(queries, videos))
        local = {}
        for name, (local_sum, local_count) in loss_fn.local_sums(out, labels).items():
            # value: global sum; gradient: world_size x the local one (DDP's average then gives
            # the single-device gradient)
            stats = torch.stack([local_sum.detach().to(torch.float64),
                                 torch.tensor(float(local_count), dtype=torch.float64,
                                              device=local_sum.device)]).to(self.device)
            dist.all_reduce(stats)
            total = stats[0].to(local_sum.dtype)
            local[name] = (total + self.world_size * (local_sum - local_sum.detach()),
                           int(round(stats[1].item())))
        return loss_fn(g_out, g_labels, hard_negatives, generator, local=local)

    def _check_same_generator(self, generator: torch.Generator | None) -> None:
        if generator is None:
            raise DistError("compute_loss: distributed training needs an explicit torch.Generator "
                            "seeded identically on every rank (negative sampling)")
        state = generator.get_state().cpu().numpy().tobytes()
        word = int.from_bytes(hashlib.sha256(state).digest()[:8], "little", signed=True)
        digest = torch.tensor([word, len(state)], dtype=torch.long, device=self.device)
        all_digests = [torch.empty_like(digest) for _ in range(self.world_size)]
        dist.all_gather(all_digests, digest)
        if any(not torch.equal(d, all_digests[0]) for d in all_digests):
            raise DistError("compute_loss: the loss generator differs between ranks; seed it "
                            "with the run seed (not seed_for_rank) on every rank")

    def _all_sizes(self, out: TrainOutput, labels: Tensor) -> list[list[int]]:
        """Every rank's (Nq, B, L, digest of its field names and trailing shapes, query tokens)."""
        v = out.videos
        layout = [(k, tuple(t.shape[2:] if k in TOKEN_QUERY_KEYS else t.shape[1:]))
                  for k, t in sorted(out.queries.items())]
        layout += [(k, tuple(t.shape[1:])) for k, t in sorted(v.fixed.items())]
        layout += [("<seq>", tuple(v.seq.shape[2:]) if v.seq is not None else None)]
        digest = int.from_bytes(hashlib.sha256(repr(layout).encode()).digest()[:7], "little")
        n_f = int(v.seq.shape[1]) if v.seq is not None else 0
        n_t = max((int(t.shape[1]) for k, t in out.queries.items() if k in TOKEN_QUERY_KEYS), default=0)
        sizes = torch.tensor([labels.numel(), len(v), n_f, digest, n_t], dtype=torch.long,
                             device=labels.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes)
        table = torch.stack(all_sizes).tolist()
        if any(row[3] != table[0][3] for row in table):
            raise DistError("compute_loss: ranks disagree on the TrainOutput fields or their "
                            f"shapes (train vs eval mode?): {[r[:3] for r in table]}")
        return table

    def _gather(self, out: TrainOutput, labels: Tensor):
        """(queries, VideoEncoding, labels) of the global batch, in rank order.

        One autograd collective for all float tensors (so the backward issues exactly one
        collective per step, in the same order on every rank) and one plain collective for the
        integer side (labels, sequence mask)."""
        table = self._all_sizes(out, labels)
        mq, mv, mf, mt = (max(r[i] for r in table) for i in (0, 1, 2, 4))
        v = out.videos
        dtype = out.queries["query"].dtype
        pieces = [(k, "t" if k in TOKEN_QUERY_KEYS else "q", t) for k, t in sorted(out.queries.items())]
        pieces += [(k, "v", t) for k, t in sorted(v.fixed.items())]
        if v.seq is not None:
            pieces.append(("<seq>", "s", v.seq))
        blocks = []
        for _, kind, t in pieces:
            pad = [0, 0] * (t.dim() - (2 if kind in "st" else 1))
            pad += [0, mf - t.shape[1], 0, mv - t.shape[0]] if kind == "s" else \
                [0, mt - t.shape[1], 0, mq - t.shape[0]] if kind == "t" else \
                [0, (mq if kind == "q" else mv) - t.shape[0]]
            blocks.append(F.pad(t, pad).reshape(-1).to(dtype))
        parts = gather_with_grad(torch.cat(blocks))
        ints = [F.pad(labels.long(), (0, mq - labels.numel()))]
        if v.seq is not None:
            ints.append(F.pad(v.seq_mask.long(), (0, mf - v.seq.shape[1], 0, mv - len(v))).reshape(-1))
        ints = torch.cat(ints)
        int_parts = [torch.empty_like(ints) for _ in range(self.world_size)]
        dist.all_gather(int_parts, ints)
        return self._unpack(pieces, table, (mq, mv, mf, mt), parts, int_parts, v.seq is not None)

    def _unpack(self, pieces, table, maxima, parts, int_parts, has_seq):
        mq, mv, mf, mt = maxima
        got: dict[str, list[Tensor]] = {k: [] for k, _, _ in pieces}
        labels, masks, offset = [], [], 0
        for (rq, rv, *_), part, ipart in zip(table, parts, int_parts):
            start = 0
            for key, kind, t in pieces:
                lead = {"q": (mq,), "t": (mq, mt), "v": (mv,), "s": (mv, mf)}[kind]
                tail = t.shape[len(lead):]
                n = int(np.prod(lead + tuple(tail)))
                block = part[start:start + n].view(*lead, *tail).to(t.dtype)
                got[key].append(block[:rq] if kind in "qt" else block[:rv])
                start += n
            labels.append(ipart[:rq] + offset)
            if has_seq:
                masks.append(ipart[mq:].view(mv, mf)[:rv].bool())
            offset += rv
        queries = {k: torch.cat(got[k]) for k, kind, _ in pieces if kind in "qt"}
        fixed = {k: torch.cat(got[k]) for k, kind, _ in pieces if kind == "v"}
        videos = VideoEncoding(fixed, torch.cat(got["<seq>"]) if has_seq else None,
                               torch.cat(masks) if has_seq else None)
        return queries, videos, torch.cat(labels)
