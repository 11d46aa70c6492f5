"""The accelerator side of training and evaluation: precision, TF32, torch.compile, pinned
memory and a device prefetcher. Every path here runs on CPU too (that is how it is tested).

* precision `fp32` | `bf16`: bf16 runs the forward passes (training and scoring) under
  torch.autocast(device_type, bfloat16). The weights, their gradients and the optimiser state
  stay fp32 (autocast casts per op, the parameters are never converted), and the losses and
  metrics are computed in fp32 (`fp32_output` casts the forward's outputs and the loss runs
  outside autocast; the evaluation stores float32 encodings and scores).
* TF32 (`train.tf32`): CUDA matmuls and cuDNN convolutions in TF32 during the training steps,
  where a 10-bit mantissa is well inside what stochastic training tolerates. Scoring for
  retrieval (validation, the evaluate stage) runs outside it, in full fp32 (torch's
  default), so near-ties in a ranking are not decided by rounding. A no-op on CPU.
* compile (`train.compile`): false, true (torch.compile's default backend, inductor) or a
  backend name (e.g. aot_eager). Only the training forward is compiled. When compiling fails
  (no C compiler, no triton, an unsupported op), one warning says so and the run goes on
  eagerly, with the RNG state it had before the attempt.
* pinned memory (`train.pin_memory`: auto | true | false; auto = on when the device is CUDA):
  the DataLoader copies each batch into page-locked memory (torch's pinned allocator, which
  keeps a block until the copies reading it have finished; the loaders' recycled batch
  buffers are never handed to the GPU themselves).
* `DevicePrefetcher`: on CUDA, batch k+1 is copied to the device (non_blocking, on a side
  stream) while batch k trains; on any other device it is a plain `.to(device)` per batch,
  which on CPU hands on the very same tensors.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Iterator

import torch

from .config import ConfigError, check_compile, check_pin_memory, check_precision

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# settings (their values are checked by prvr.config)


def compile_backend(setting: Any, key: str = "train.compile") -> str | None:
    """None (eager) or a torch.compile backend torch knows, else a ConfigError."""
    import torch._dynamo

    backend = check_compile(setting, key)
    if backend is not None and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"params.yaml: {key} {setting!r}: not a torch.compile backend "
                          f"(known: {', '.join(sorted(torch._dynamo.list_backends()))})")
    return backend


def use_pin_memory(setting: Any, device: torch.device | str, key: str = "train.pin_memory") -> bool:
    """auto: pinned host memory exactly when the device is CUDA; true: also only with CUDA
    (pinning needs it)."""
    name = check_pin_memory(setting, key)
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return cuda and name in ("auto", "true")


# ---------------------------------------------------------------------------------------------
# precision and TF32


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The forward-pass context of `precision`: bf16 autocast on the device's type, or nothing."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _fp32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in tensors.items()}


def fp32_output(out):
    """A TrainOutput with every floating tensor (queries, videos, scores) as float32, so the
    loss, run outside autocast, is computed in fp32 whatever the forward ran in (the casts
    are differentiable: the gradient flows back into the bf16 forward)."""
    from .methods import TrainOutput, VideoEncoding

    if not isinstance(out, TrainOutput):
        return out
    v = out.videos
    seq = v.seq.float() if v.seq is not None and v.seq.is_floating_point() else v.seq
    return TrainOutput(_fp32(out.queries), VideoEncoding(_fp32(v.fixed), seq, v.seq_mask), _fp32(out.scores))


@contextlib.contextmanager
def tf32(enabled: bool = True):
    """CUDA matmuls and cuDNN convolutions in TF32 (enabled) or IEEE fp32 inside the block; the
    previous setting is restored afterwards. Uses torch's fp32_precision switches (mixing them
    with the legacy allow_tf32 flags is an error in torch >= 2.9)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    mode = "tf32" if enabled else "ieee"
    matmul.fp32_precision, conv.fp32_precision = mode, mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


# ---------------------------------------------------------------------------------------------
# torch.compile


def _rng_states() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


class Compiled(torch.nn.Module):
    """`module` run through torch.compile(backend=...); if compiling fails, one warning and
    the eager module from then on (the RNG rewound to before the failed attempt, so the run
    draws what an eager run draws). Errors of the module itself surface from the eager rerun."""

    def __init__(self, module: torch.nn.Module, backend: str = "inductor"):
        super().__init__()
        self.module = module
        self.backend = backend
        object.__setattr__(self, "_compiled", torch.compile(module, backend=backend))
        self.eager = False

    def forward(self, *args, **kwargs):
        if self.eager:
            return self.module(*args, **kwargs)
        states = _rng_states()
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, loudly
            cause = getattr(exc, "inner_exception", None) or exc   # BackendCompilerFailed wraps it
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            log.warning("train.compile: torch.compile (backend %s) failed (%s: %s); training eagerly",
                        getattr(self.backend, "__name__", self.backend), type(cause).__name__, first)
            self.eager = True
            _set_rng_states(states)
            return self.module(*args, **kwargs)


def maybe_compile(module: torch.nn.Module, setting: Any) -> torch.nn.Module:
    backend = compile_backend(setting)
    return module if backend is None else Compiled(module, backend)


# ---------------------------------------------------------------------------------------------
# moving batches


def to_device(batch: dict[str, Any], device: torch.device, non_blocking: bool = True) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


class DevicePrefetcher:
    """Iterate `loader`'s batches already on `device`. On CUDA the copy of batch k+1 (on a
    side stream, non_blocking: asynchronous from pinned memory) is issued right after batch k
    is handed out, so it overlaps k's step; the compute stream waits for a batch's copy before
    it is used, and each tensor is recorded on that stream so its memory is not reused early.
    Elsewhere each batch is `.to(device)` as it comes (the same tensors on CPU)."""

    def __init__(self, loader: Iterable[dict[str, Any]], device: torch.device | str):
        self.loader = loader
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield to_device(batch, self.device)
            return
        side = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        it = iter(self.loader)
        nxt = self._issue(it, side)
        while nxt is not None:
            compute.wait_stream(side)
            for v in nxt.values():
                if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                    v.record_stream(compute)
            batch, nxt = nxt, None
            yield batch
            nxt = self._issue(it, side)

    def _issue(self, it: Iterator, stream) -> dict[str, Any] | None:
        try:
            batch = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(stream):
            return to_device(batch, self.device)
