"""RAL on the CPU fast path: GMMFormer v2's packed network (prvr.backends.cpu.gmmformer_v2: the
frame stream on real frames only, valid as RAL keeps v2's learned weight token) with the token
branch on packed modules. The Gaussian heads and the token scores are the reference's. Same
parameters and function as the reference (tests/test_backend_equality.py)."""
from __future__ import annotations

from ...methods.ral.model import RAL, RALConfig
from . import switch_modules
from .gmmformer_v2 import TABLE as V2_TABLE, PackedGMMFormer
from .token_queries import TABLE as TOKEN_TABLE


class PackedRAL(PackedGMMFormer, RAL):
    pass


TABLE = {**V2_TABLE, **TOKEN_TABLE, RAL: PackedRAL}


def build_model(cfg: RALConfig | None = None) -> RAL:
    """The reference RAL network with every module on its packed CPU forward."""
    return switch_modules(RAL(cfg), TABLE)
