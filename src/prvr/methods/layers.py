"""Building blocks the reference networks share (the releases share them too): the input
projection and the learned position embedding of every stream, the `release_chunks` mark of a
parameter that fuses several release tensors, the masked (Gaussian-windowed) attention of the
GMMFormer blocks, and the release state-dict mapping helpers.

Everything here is plain PyTorch on padded batches (B, L, ...) with a bool mask (B, L), True at
real tokens. The CPU backend (prvr.backends.cpu) computes the same on packed real tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The releases' additive attention mask: padded keys get -10000 before the softmax.
MASK_ADD = -10000.0


def mark_release_chunks(param: nn.Parameter, chunks: int) -> nn.Parameter:
    """Record that `param` is `chunks` equal row blocks, each one release tensor (so the
    optimiser clips gradients per release tensor, as the releases do)."""
    param.release_chunks = chunks
    return param


class InputProjection(nn.Module):
    """LayerNorm(D_in) -> Dropout -> Linear(D_in, H) -> ReLU."""

    def __init__(self, in_dim: int, hidden: int, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.drop = nn.Dropout(p)
        self.linear = nn.Linear(in_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D_in) -> (..., H)"""
        return F.relu(self.linear(self.drop(self.norm(x))))


class PositionEmbedding(nn.Module):
    """LayerNorm(x + learned position embedding) -> Dropout."""

    def __init__(self, n_positions: int, hidden: int, p: float):
        super().__init__()
        self.embedding = nn.Embedding(n_positions, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, H) -> (B, L, H), position l gets embedding row l. Padding may run past the
        table (a batch padded longer than its real tokens): those slots get a zero row."""
        table = self.embedding.weight[: x.shape[1]]
        if table.shape[0] < x.shape[1]:
            table = F.pad(table, (0, 0, 0, x.shape[1] - table.shape[0]))
        return self.drop(self.norm(x + table))


def key_mask_add(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, L) bool, True at real keys -> (B, 1, 1, L) additive mask (0 real, MASK_ADD pad)."""
    if mask is None:
        return None
    return ((~mask).to(dtype) * MASK_ADD)[:, None, None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, gauss: Tensor | None, mask: Tensor | None,
              drop: nn.Module) -> Tensor:
    """drop(softmax((q k^T / sqrt(d)) * G + mask)) @ v.

    q, k, v: (..., B, nh, L, d); gauss broadcastable to (..., L, L) or None (no window);
    mask: (B, L) bool, True at real keys, or None. The Gaussian multiplies the scaled logits
    and the padding mask is added after it, as in the releases.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])   # (..., B, nh, L, L)
    if gauss is not None:
        scores = scores * gauss
    if mask is not None:
        scores = scores + key_mask_add(mask, scores.dtype)
    return torch.matmul(drop(torch.softmax(scores, dim=-1)), v)


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
