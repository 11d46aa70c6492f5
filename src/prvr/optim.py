"""The release's "BertAdam" optimiser and warm-up-linear schedule, with batched (foreach) updates.

Per step and per parameter tensor (see docs/gmmformer_v2.md):

    g <- g * min(1, max_grad_norm / (||g|| + 1e-6))      (clipping per tensor, in place)
    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    update = m / (sqrt(v) + e) + weight_decay * p
    p <- p - lr_t * update,   lr_t = lr * warmup_linear(step / t_total, warmup)

with no bias correction, and ``step`` counted per tensor from 0 (so, with warm-up, the very first
update uses lr_t = 0, as in the release). The arithmetic is done with ``torch._foreach_*`` kernels
over all tensors of a group that share a step count, device and dtype; clipping norms are still
computed per tensor.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer


__all__ = ["BertAdam", "warmup_linear", "build_optimizer", "current_lr"]


def warmup_linear(progress: float, warmup: float) -> float:
    """Multiplier at training progress ``progress`` (= step / t_total).

    Rises linearly from 0 to 1 over the first ``warmup`` fraction, then falls linearly to 0 at
    progress 1 (and stays 0 beyond): ``p / warmup`` while ``p < warmup``, else
    ``max((p - 1) / (warmup - 1), 0)``.
    """
    progress = float(progress)
    warmup = max(float(warmup), 0.0)
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


class BertAdam(Optimizer):
    """Adam without bias correction, decoupled weight decay, per-tensor gradient clipping and a
    warm-up-linear learning-rate schedule (the release's BertAdam).

    ``t_total <= 0`` disables the schedule (constant lr). ``warmup = -1`` means no warm-up.
    ``max_grad_norm <= 0`` disables clipping. Group options: lr, warmup, t_total, b1, b2, e,
    weight_decay, max_grad_norm. State per parameter: ``step`` (int), ``next_m``, ``next_v``.
    """

    def __init__(self, params: Iterable, lr: float, warmup: float = 0.01, t_total: int = -1,
                 max_grad_norm: float = 1.0, weight_decay: float = 0.01, b1: float = 0.9,
                 b2: float = 0.999, e: float = 1e-6):
        if lr < 0.0:
            raise ValueError(f"BertAdam: invalid learning rate {lr} (must be >= 0)")
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"BertAdam: invalid warmup {warmup} (must be in [0, 1) or -1)")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"BertAdam: invalid b1 {b1} (must be in [0, 1))")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"BertAdam: invalid b2 {b2} (must be in [0, 1))")
        if not e >= 0.0:
            raise ValueError(f"BertAdam: invalid epsilon {e} (must be >= 0)")
        if weight_decay < 0.0:
            raise ValueError(f"BertAdam: invalid weight_decay {weight_decay} (must be >= 0)")
        defaults = dict(lr=float(lr), warmup=float(warmup), t_total=int(t_total), b1=float(b1),
                        b2=float(b2), e=float(e), weight_decay=float(weight_decay),
                        max_grad_norm=float(max_grad_norm))
        super().__init__(params, defaults)

    @staticmethod
    def _multiplier(group: dict[str, Any], step: int) -> float:
        t_total = group["t_total"]
        if t_total <= 0:
            return 1.0
        return warmup_linear(step / float(t_total), group["warmup"])

    def scheduled_lrs(self) -> list[float]:
        """Learning rate the next ``step()`` applies, per group (from the group's step count)."""
        lrs = []
        for group in self.param_groups:
            step = 0
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    step = int(st["step"])
                    break
            lrs.append(group["lr"] * self._multiplier(group, step))
        return lrs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["next_v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                key = (int(state["step"]), p.device, p.dtype)
                buckets.setdefault(key, []).append(p)

            b1, b2, e = group["b1"], group["b2"], group["e"]
            wd, max_norm = group["weight_decay"], group["max_grad_norm"]
            for (step, _, _), params in buckets.items():
                grads = [p.grad for p in params]
                ms = [self.state[p]["next_m"] for p in params]
                vs = [self.state[p]["next_v"] for p in params]
                if max_norm > 0:
                    # a parameter fusing several release tensors (attribute `release_chunks`,
                    # see prvr.model) is clipped block by block, as the release clips each
                    pieces = [piece for p, g in zip(params, grads)
                              for piece in (g.view(int(getattr(p, "release_chunks", 1)), -1).unbind(0)
                                            if g.is_contiguous() else (g,))]
                    norms = torch.stack(torch._foreach_norm(pieces))
                    coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
                    torch._foreach_mul_(pieces, list(coefs.unbind()))
                torch._foreach_mul_(ms, b1)
                torch._foreach_add_(ms, grads, alpha=1.0 - b1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
                update = torch._foreach_sqrt(vs)
                torch._foreach_add_(update, e)
                update = torch._foreach_div(ms, update)
                if wd > 0.0:
                    torch._foreach_add_(update, torch._foreach_mul(params, wd))
                lr_t = group["lr"] * self._multiplier(group, step)
                torch._foreach_mul_(update, lr_t)
                torch._foreach_sub_(params, update)
                for p in params:
                    self.state[p]["step"] = step + 1
        return loss


def current_lr(optimizer: Optimizer) -> float:
    """Learning rate the next step applies to the first group (for logging)."""
    if isinstance(optimizer, BertAdam):
        return float(optimizer.scheduled_lrs()[0])
    return float(optimizer.param_groups[0]["lr"])


_OPTIM_KEYS = ("lr", "weight_decay", "warmup_proportion", "grad_clip_norm")


def build_optimizer(groups: list[dict], optim_settings: dict[str, Any], t_total: int) -> BertAdam:
    """BertAdam over a method's parameter groups (`Method.param_groups`) with the settings'
    ``optim`` section (lr, weight_decay, warmup_proportion, grad_clip_norm) and ``t_total``
    scheduled steps."""
    missing = [k for k in _OPTIM_KEYS if k not in optim_settings]
    if missing:
        raise ValueError(f"optim settings: missing key(s) {', '.join(missing)}")
    if int(t_total) <= 0:
        raise ValueError(f"build_optimizer: t_total must be a positive number of steps, got {t_total}")
    wd = float(optim_settings["weight_decay"])
    return BertAdam(groups, lr=float(optim_settings["lr"]),
                    warmup=float(optim_settings["warmup_proportion"]), t_total=int(t_total),
                    max_grad_norm=float(optim_settings["grad_clip_norm"]), weight_decay=wd)
