"""Building blocks the method networks share (the releases share them too): the input
projection and the learned position embedding of every stream, and the `release_chunks` mark
of a parameter that fuses several release tensors."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import dropout


def mark_release_chunks(param: nn.Parameter, chunks: int) -> nn.Parameter:
    """Record that `param` is `chunks` equal row blocks, each one release tensor (so the
    optimiser clips gradients per release tensor, as the releases do)."""
    param.release_chunks = chunks
    return param


class InputProjection(nn.Module):
    """LayerNorm(D_in) -> Dropout -> Linear(D_in, H) -> ReLU, on packed tokens."""

    def __init__(self, in_dim: int, hidden: int, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, hidden)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.linear(dropout(self.norm(x), self.p, self.training)))


class PositionEmbedding(nn.Module):
    """LayerNorm(x + learned position embedding) -> Dropout, on packed tokens."""

    def __init__(self, n_positions: int, hidden: int, p: float):
        super().__init__()
        self.embedding = nn.Embedding(n_positions, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.p = p

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return dropout(self.norm(x + self.embedding(positions)), self.p, self.training)
