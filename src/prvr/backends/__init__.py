"""Backends: how a method's network is computed, never what it computes.

`reference` is the plain PyTorch network of each method (prvr.methods.<m>.model): padded
batches, masks, nn.Dropout. `cpu` (prvr.backends.cpu) is the CPU fast path: the same network,
the same parameters and state dict, computed on packed real tokens with fused autograd nodes
that keep less for backward. Equality tests (tests/test_backend_equality.py) hold the two to the
same scores, losses and gradients; dropout draws differ (same keep rate and scale), which is why
the backend is part of a training run's fingerprint.

`backend: auto` in params.yaml picks `cpu` on a CPU device and `reference` everywhere else.
"""
from __future__ import annotations

BACKENDS = ("auto", "reference", "cpu")


class BackendError(ValueError):
    """An unknown backend name."""


def resolve_backend(name: str, device) -> str:
    """'reference' or 'cpu' for a setting (auto | reference | cpu) on `device` (a torch.device
    or its name): auto is the CPU fast path on the CPU and the reference network elsewhere."""
    name = str(name or "auto").lower()
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return "cpu" if kind == "cpu" else "reference"
