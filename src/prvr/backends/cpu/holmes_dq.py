"""Holmes-DQ on the CPU fast path: Holmes' packed network (prvr.backends.cpu.holmes, the padded
semantics kept) with the token branch on packed modules. Same parameters and function as the
reference (tests/test_backend_equality.py)."""
from __future__ import annotations

from ...methods.holmes_dq.model import HolmesDQ, HolmesDQConfig
from . import switch_modules
from .holmes import TABLE as HOLMES_TABLE, PackedHolmes
from .token_queries import TABLE as TOKEN_TABLE


class PackedHolmesDQ(PackedHolmes, HolmesDQ):
    pass


TABLE = {**HOLMES_TABLE, **TOKEN_TABLE, HolmesDQ: PackedHolmesDQ}


def build_model(cfg: HolmesDQConfig | None = None) -> HolmesDQ:
    """The reference Holmes-DQ network with every module on its packed CPU forward."""
    return switch_modules(HolmesDQ(cfg), TABLE)
