"""Packed-token versions of the shared layers (prvr.methods.layers): the same functions of the
same parameters, on packed real tokens (N, D) instead of padded (B, L, D)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...methods.layers import InputProjection, PositionEmbedding
from .kernels import dropout, norm_dropout_linear, softmax_dropout_matmul


class PackedInputProjection(InputProjection):
    """InputProjection on packed tokens; LayerNorm, dropout and Linear as one CPU node."""

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """x (N, D_in), or with `index` the rows x[index] (gathered inside the node, so training
        keeps x, not the gathered copy) -> (N, H)."""
        return F.relu(norm_dropout_linear(x, self.norm, self.linear, self.drop.p, self.training, index))


class PackedPositionEmbedding(PositionEmbedding):
    """PositionEmbedding on packed tokens with their positions (N,)."""

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return dropout(self.norm(x + self.embedding(positions)), self.drop.p, self.training)


LAYERS = {InputProjection: PackedInputProjection, PositionEmbedding: PackedPositionEmbedding}


def attention(q: Tensor, k: Tensor, v: Tensor, gauss: Tensor | None, mask_add: Tensor | None,
              p: float, training: bool) -> Tensor:
    """prvr.methods.layers.attention with an additive mask (..., 1, L) already made: the scale,
    Gaussian and mask in one addcmul, and softmax, dropout and the value matmul as one node."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2))
    if gauss is not None:
        scores = scores * (gauss * scale) if mask_add is None else torch.addcmul(mask_add, scores, gauss, value=scale)
    else:
        scores = scores * scale if mask_add is None else torch.add(mask_add, scores, alpha=scale)
    return softmax_dropout_matmul(scores, v, p, training)
