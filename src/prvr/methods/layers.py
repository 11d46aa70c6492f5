"""Building blocks the method networks share (the releases share them too): the input
projection and the learned position embedding of every stream, and the `release_chunks` mark
of a parameter that fuses several release tensors, and the (Gaussian-windowed) masked
attention of the GMMFormer blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import dropout, norm_dropout_linear, softmax_dropout_matmul


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

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """x (N, D_in), or with `index` the rows x[index] (gathered inside the node, so training
        keeps x, not the gathered copy)."""
        return F.relu(norm_dropout_linear(x, self.norm, self.linear, self.p, self.training, index))


class PositionEmbedding(nn.Module):
    """LayerNorm(x + learned position embedding) -> Dropout, on packed tokens."""

    def __init__(self, n_positions: int, hidden: int, p: float):
        super().__init__()
        self.embedding = nn.Embedding(n_positions, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.p = p

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return dropout(self.norm(x + self.embedding(positions)), self.p, self.training)


# ----------------------------------------------------------------------------- release layouts
# Each method maps its release's state dict with one rule, `groups`: pairs (our tensor, the
# release tensors it is the row-wise concatenation of, in order). Both directions use it.

def fuse_release_tensors(sd, groups, shapes) -> dict:
    """Release tensors -> ours: each of our tensors is its group's flattened concatenation,
    viewed to `shapes[ours]`. Every tensor of `shapes` must be covered (else a layout bug)."""
    import torch

    out = {ours: torch.cat([sd[n].detach().reshape(-1) for n in names]).view(shapes[ours]).clone()
           for ours, names in groups}
    if set(out) != set(shapes):  # a layout bug, not a user error
        raise AssertionError(f"release mapping does not cover {sorted(set(shapes) ^ set(out))}")
    return out


def split_release_tensors(our_sd, groups, layout) -> dict:
    """Ours -> the release's names and shapes, in the release order of `layout` [(name, shape)]
    (the inverse of fuse_release_tensors)."""
    import math

    shapes = dict(layout)
    out = {}
    for ours, names in groups:
        if ours not in our_sd:
            raise ValueError(f"state dict: missing tensor '{ours}'")
        flat = our_sd[ours].detach().reshape(-1)
        sizes = [math.prod(shapes[n]) for n in names]
        if sum(sizes) != flat.numel():
            raise ValueError(f"state dict: tensor '{ours}' has {flat.numel()} values, expected {sum(sizes)}")
        for n, part in zip(names, flat.split(sizes)):
            out[n] = part.view(shapes[n]).clone()
    return {n: out[n] for n, _ in layout}


def strip_module_prefix(sd):
    """A state dict saved from a DataParallel/DDP wrapper has `module.`-prefixed names."""
    if sd and all(str(k).startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_release_layout(sd, layout, cfg, what: str = "release state dict") -> None:
    """ValueError naming the first missing, non-tensor or mis-shaped tensor of `layout`
    [(name, shape)] in `sd` (release order), or the unexpected extra names."""
    from torch import Tensor as _Tensor

    for name, shape in layout:
        if name not in sd:
            raise ValueError(f"{what}: missing tensor '{name}' (expected shape {shape})")
        if not isinstance(sd[name], _Tensor):
            raise ValueError(f"{what}: '{name}' is a {type(sd[name]).__name__}, not a tensor")
        got = tuple(sd[name].shape)
        if got != shape:
            raise ValueError(f"{what}: tensor '{name}' has shape {got}, expected {shape} "
                             f"for hidden_size={cfg.hidden_size}, text_dim={cfg.text_dim}, "
                             f"visual_dim={cfg.visual_dim}")
    extra = sorted(set(sd) - {n for n, _ in layout})
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ValueError(f"{what}: unexpected tensors {extra[:5]}{more}")


def attention(q: Tensor, k: Tensor, v: Tensor, gauss: Tensor | None, mask_add: Tensor | None,
              p: float, training: bool) -> Tensor:
    """softmax((q k^T / sqrt(d)) * G + mask) @ v, with dropout on the probabilities.

    q, k, v: (..., L, d); gauss broadcastable to (..., L, L); mask_add to (..., 1, L).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2))
    if gauss is not None:
        scores = scores * (gauss * scale) if mask_add is None else torch.addcmul(mask_add, scores, gauss, value=scale)
    else:
        scores = scores * scale if mask_add is None else torch.add(mask_add, scores, alpha=scale)
    return softmax_dropout_matmul(scores, v, p, training)
