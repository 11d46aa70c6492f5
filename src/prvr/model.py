"""GMMFormer v2: the network, its scores and its optimiser parameter groups.

What it computes is fixed by /shared/spec/gmmformer_v2.md (the public release's behaviour);
how it computes it is our own design, built for speed:

* The eight Gaussian branches of a temporal-consolidation block run as ONE batched
  computation. Their parameters are stacked along a leading branch dimension
  (qkv (8, 3H, H), FFN (8, 4H, H) / (8, H, 4H), norms (8, H)) and the branch dimension is
  folded into the batch of every matmul.
* Token-wise work (input projection, position embedding, QKV, FFN, LayerNorms) runs on the
  PACKED valid tokens only; attention runs on the (B, L) padded layout at the batch's own
  longest length, not at 128. This is exact: padded keys are masked after the Gaussian
  multiply (so they carry zero weight) and padded query rows are discarded. Frame videos
  therefore use the top-left n x n corner of the 128 x 128 Gaussian matrices, as in the
  release. Frame videos are packed in order of real length (longest first) and the
  Gaussian-branch attention runs in up to three length buckets, each at its own longest
  length (`_Tokens.bucket`); outputs are scattered back to the input order.
* The shared weight token's cross-attention over the eight branch outputs is one batched
  pass. Its query is the same for every branch and video, so it is folded into the key
  projection (scores = O @ (W_k^T q) + b_k.q) and the value projection is applied after
  pooling (sum_j p_j (W_v o_j + b_v) = W_v (sum_j p_j o_j) + b_v sum_j p_j): the per-token
  keys and values of the cross-attention are never materialised.
* Dropout never touches padding, and on CPU draws its keep-mask from 16-bit chunks of
  64-bit random words (a quarter of the serial generator's work; rate p to 2^-16) and
  applies it as one multiply by a {0, 1/(1-p)} tensor, which is also all the backward pass
  needs; relu+dropout share one mask. In the FFNs, relu+dropout runs in place on the first
  matmul's output without the 1/(1-p) scale, which is folded into the second weight; a
  residual + dropout is one addcmul. (Large fresh tensors are costly on CPU: each pays its
  page faults.)

As in the release, a training forward encodes the queries twice: once for the scores and
once more, with fresh dropout, for the query-diverse and optimal-matching losses
(`ModelOutput.query_aux`; in eval mode the two would be equal, so it is skipped). One
deliberate difference in TRAIN mode (eval is the release's function to float tolerance):
the CPU dropout rate is p rounded to a multiple of 2^-16.

Parameter layout differs from the release (stacked branches, fused q/k/v); see
`prvr.release` for the exact mapping of a released state dict onto this one. Every
parameter that fuses several release tensors carries the attribute `release_chunks`
(how many equal row blocks it is made of) so an optimiser can reproduce the release's
per-tensor gradient clipping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GMMFormerConfig",
    "GMMFormer",
    "ModelOutput",
    "gaussian_matrix",
    "pair_scores",
    "retrieval_scores",
    "release_chunks",
    "unwrap_model",
]

RELEASE_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)
_MASK_ADD = -10000.0  # additive key mask of the release's attention


@dataclass
class GMMFormerConfig:
    visual_dim: int = 3072
    text_dim: int = 768
    hidden_size: int = 384
    n_heads: int = 4
    max_query_len: int = 30
    max_frames: int = 128
    n_clips: int = 32
    clip_scale_w: float = 0.7
    frame_scale_w: float = 0.3
    init_std: float = 0.02
    sft_factor: float = 0.09
    input_drop: float = 0.2
    drop: float = 0.2
    widths: tuple = RELEASE_WIDTHS

    def __post_init__(self) -> None:
        self.widths = tuple(None if w is None else float(w) for w in self.widths)
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
        if self.n_clips > self.max_frames:
            raise ValueError(f"n_clips {self.n_clips} exceeds max_frames {self.max_frames} "
                             "(the clip stream shares the 128-row position table size)")
        if not self.widths:
            raise ValueError("widths: need at least one branch")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GMMFormerConfig":
        """Build from a settings['model'] dict; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise ValueError(f"model settings: unknown keys {extra}")
        return cls(**dict(d))


@dataclass
class ModelOutput:
    query: Tensor             # (Nq, H)
    clips: Tensor             # (B, n_clips, H)
    frames: Tensor            # (B, Lf, H), zero at padded positions
    frame_mask: Tensor        # (B, Lf) bool
    clip_scores: Tensor       # (Nq, B) max cosine over clips
    clip_scores_raw: Tensor   # (Nq, B) max dot product over clips
    frame_scores: Tensor      # (Nq, B) max cosine over the 128 frame slots
    frame_scores_raw: Tensor  # (Nq, B) max dot product over the 128 frame slots
    # (Nq, H) second query encoding (own dropout draw) for the query-diverse and matching
    # losses, as the release computes them; None outside training (then `query` serves).
    query_aux: Tensor | None = None


# ----------------------------------------------------------------------------- helpers

def release_chunks(param: Tensor) -> int:
    """How many release tensors (equal row blocks, in order) a parameter is made of."""
    return int(getattr(param, "release_chunks", 1))


def _mark(param: nn.Parameter, chunks: int) -> nn.Parameter:
    param.release_chunks = chunks
    return param


def gaussian_matrix(length: int, width: float | None) -> Tensor:
    """(length, length) float64 Gaussian attention weights of one branch (ones for None).

    Row i is the normal density over column positions linspace(0, 1, L) around centre
    i / L with sigma = max(width, 0.01) / 9, divided by its row maximum.
    """
    if width is None:
        return torch.ones(length, length, dtype=torch.float64)
    centre = torch.arange(length, dtype=torch.float64).unsqueeze(1) / length
    pos = torch.linspace(0.0, 1.0, length, dtype=torch.float64).unsqueeze(0)
    sigma = max(float(width), 0.01) / 9.0
    # density / row max == exp(-(d^2 - min d^2) / (2 sigma^2)): the same numbers, but a row
    # whose densities all underflow (tiny L, narrow width) stays finite instead of 0 / 0.
    d2 = (pos - centre) ** 2
    return torch.exp(-(d2 - d2.min(dim=1, keepdim=True).values) / (2.0 * sigma ** 2))


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0.5


def dropout(x: Tensor, p: float, training: bool, relu: bool = False) -> Tensor:
    """Inverted dropout (keep with prob 1-p, scale by 1/(1-p)), cheap on CPU.

    relu=True computes dropout(relu(x)) with one mask (keep and x > 0), which is also the
    whole backward pass of the pair.
    """
    if not training or p <= 0.0:
        return F.relu(x) if relu else x
    if p >= 1.0:
        return torch.zeros_like(x)
    if x.device.type != "cpu":
        return F.dropout(F.relu(x) if relu else x, p, True)
    keep, scale = _keep_mask(x, p)
    if relu:
        keep &= x > 0
    # one multiply by a {0, 1/(1-p)} tensor; autograd keeps only that tensor for backward
    return x * keep.to(x.dtype).mul_(scale)


def _keep_mask(x: Tensor, p: float) -> tuple[Tensor, float]:
    """CPU dropout draw for x: (bool tensor, True = kept, the 1/(1-p) keep scale), 0 < p < 1.

    16-bit uniform integers, four per 64-bit random word (the CPU generator is serial, so
    this quarters its cost); drop when below the p-quantile. The drop rate is p rounded to
    a multiple of 2^-16 (0.2 -> 0.199997) and the scale uses that same rate, so the
    expectation is exactly preserved.
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
    bits = words.view(torch.int16)[:n].view(x.shape)
    cut = min(max(int(round(p * 65536)), 1), 65535)
    return bits >= cut - 32768, 65536.0 / (65536 - cut)


class _DroppedRelu(torch.autograd.Function):
    """relu(x) with the dropped entries zeroed, NOT rescaled, IN PLACE on x (x must be a
    fresh result nobody else needs, e.g. a matmul output). Backward is one fused pass
    (gradient where the output is positive) from the output the next matmul saves anyway,
    written over the incoming gradient: a large fresh tensor pays its page faults on this
    box, so neither pass allocates one."""

    @staticmethod
    def forward(ctx, x, keep):
        torch.where(keep, x, x.new_zeros(()), out=x).relu_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved_tensors
        if grad.is_contiguous() and grad.shape == out.shape and not grad.requires_grad:
            return torch.ops.aten.threshold_backward.grad_input(grad, out, 0.0, grad_input=grad), None
        return torch.ops.aten.threshold_backward(grad, out, 0.0), None


def relu_dropout_unscaled(x: Tensor, p: float, training: bool) -> tuple[Tensor, float]:
    """(h, s) with s * h == dropout(relu(x)): the caller folds the keep scale s into the
    next linear map's weight (a small tensor) instead of passing over the large h.
    On CPU in training, x is overwritten: pass a fresh matmul output only."""
    if not training or p <= 0.0:
        return F.relu(x), 1.0
    if p >= 1.0:
        return torch.zeros_like(x), 1.0
    if x.device.type != "cpu":
        return F.dropout(F.relu(x), p, True), 1.0
    keep, scale = _keep_mask(x, p)
    return _DroppedRelu.apply(x, keep), scale


def add_dropout(x: Tensor, y: Tensor, p: float, training: bool) -> Tensor:
    """x + dropout(y) in one fused pass (addcmul) on CPU."""
    if not training or p <= 0.0 or p >= 1.0 or y.device.type != "cpu":
        return x + dropout(y, p, training)
    keep, scale = _keep_mask(y, p)
    return _AddDropped.apply(x, y, keep.to(y.dtype), scale)


class _AddDropped(torch.autograd.Function):
    """x + y * keep * scale (keep a {0, 1} float tensor); backward: y's gradient is
    grad * keep * scale, the second multiply in place."""

    @staticmethod
    def forward(ctx, x, y, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return torch.addcmul(x, y, keep, value=scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = grad if grad.shape == ctx.x_shape else grad.sum_to_size(ctx.x_shape)
        gy = (grad * keep).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None


def _branch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm of (K, N, H) with per-branch affine parameters (K, H)."""
    return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:]), weight.unsqueeze(1))


class _Tokens:
    """Where the valid tokens of a (B, L) mask sit: packed <-> padded bookkeeping."""

    def __init__(self, mask: Tensor | None, batch: int, length: int, device: torch.device):
        self.batch, self.length = batch, length
        if mask is None or bool(mask.all()):
            self.index = None  # every slot is valid: packing is a reshape
            self.count = batch * length
            self.mask = None
            self.positions = torch.arange(length, device=device).repeat(batch)
        else:
            self.mask = mask
            self.index = mask.reshape(-1).nonzero().squeeze(1)
            self.count = int(self.index.numel())
            self.positions = self.index % length
            self.rows = torch.div(self.index, length, rounding_mode="floor")  # video of each token
            self.pads = None  # (video, slot) of padded slots, made when first needed
        self.groups = None  # length buckets for attention, see `bucket`

    def bucket(self, max_groups: int = 3, overhead: float = 0.03) -> None:
        """Split the videos (rows must be sorted by real length, longest first) into at most
        three contiguous groups for attention, each run at its own longest length.

        Sets `groups` to [(first token, end token, _Tokens of the group)]. Split points
        minimise sum(videos * length^2) plus `overhead` of the full cost per extra group.
        Exact: every group keeps all of its videos' real slots.
        """
        if self.mask is None or self.batch < 2:
            return
        slots = torch.arange(1, self.length + 1, device=self.mask.device)
        ends = (self.mask * slots).amax(1).clamp_min(1).cpu()           # real length, descending
        counts = self.mask.sum(1).cpu()
        B = self.batch
        sq = torch.cat([ends.double() ** 2, torch.zeros(1, dtype=torch.float64)])
        i = torch.arange(1, B + 1)[:, None]                              # groups [0,i) [i,j) [j,B)
        j = torch.arange(1, B + 1)[None, :]
        cost = i * sq[0] + (j - i) * sq[i] + (B - j) * sq[j]
        if max_groups < 3:
            cost = cost.masked_fill(j < B, math.inf)
        n_groups = 1 + (j > i).double() + (j < B).double()
        cost = (cost + overhead * B * sq[0] * (n_groups - 1)).masked_fill(j < i, math.inf)
        if max_groups < 2:
            return
        best = int(cost.argmin())
        cuts = sorted({0, best // B + 1, best % B + 1, B})
        if len(cuts) == 2:
            return
        starts = torch.cat([torch.zeros(1, dtype=counts.dtype), counts.cumsum(0)]).tolist()
        self.groups = []
        for b0, b1 in zip(cuts[:-1], cuts[1:]):
            Lg = int(ends[b0])
            sub = self.mask[b0:b1, :Lg]
            self.groups.append((int(starts[b0]), int(starts[b1]),
                                _Tokens(sub, b1 - b0, Lg, self.mask.device)))

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (N, ...)"""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: Tensor, dim: int = 0, fill: float = 0.0) -> Tensor:
        """(..., N, ...) with tokens on `dim` -> same with B*L slots on `dim` (pads = fill)."""
        if self.index is None:
            return x
        shape = list(x.shape)
        shape[dim] = self.batch * self.length
        return x.new_full(shape, fill).index_copy_(dim, self.index, x)  # in place: no second copy

    def qkv_heads(self, x: Tensor, branches: int, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        """packed (N, branches * 3 * H) projections -> q, k, v, each (branches, B, n_heads, L, dh),
        zero at padded slots, each contiguous for the attention matmuls."""
        B, L = self.batch, self.length
        x = x.view(-1, branches, 3, n_heads, x.shape[-1] // (3 * n_heads * branches))
        if self.index is None:  # (B, L, K, 3, nh, dh) -> 3 x (K, B, nh, L, dh)
            return x.view(B, L, *x.shape[1:]).permute(3, 2, 0, 4, 1, 5).unbind(0)
        if self.pads is None:
            self.pads = (~self.mask).nonzero().unbind(1)
        return _ScatterHeads.apply(x, self.rows, self.positions, self.pads[0], self.pads[1], B, L)

    def scatter_spec(self) -> tuple:
        """(rows, positions, pad rows, pad positions, B, L) of the valid and padded slots."""
        if self.index is None:
            dev = self.positions.device
            rows = torch.arange(self.batch, device=dev).repeat_interleave(self.length)
            empty = rows[:0]
            return rows, self.positions, empty, empty, self.batch, self.length
        if self.pads is None:
            self.pads = (~self.mask).nonzero().unbind(1)
        return self.rows, self.positions, self.pads[0], self.pads[1], self.batch, self.length

    def from_heads(self, x: Tensor) -> Tensor:
        """padded (..., B, n_heads, L, dh) -> packed (..., N, n_heads * dh)."""
        lead = x.shape[:-4]
        x = x.transpose(-3, -2)  # (..., B, L, nh, dh)
        if self.index is None:
            return x.reshape(*lead, self.batch * self.length, -1)
        sl = (slice(None),) * len(lead)
        return x[sl + (self.rows, self.positions)].reshape(*lead, self.count, x.shape[-2] * x.shape[-1])

    def key_mask_add(self, dtype: torch.dtype) -> Tensor | None:
        """(B, 1, 1, L) additive key mask (0 valid, -10000 pad), or None."""
        if self.mask is None:
            return None
        return ((~self.mask).to(dtype) * _MASK_ADD)[:, None, None, :]


class _ScatterHeads(torch.autograd.Function):
    """(N, K, 3, nh, dh) packed projections -> q, k, v each (K, B, nh, L, dh), pads 0.

    Written straight into the attention layout, and the backward pass gathers each
    gradient straight back (autograd's generic path would stack, clone and re-gather)."""

    @staticmethod
    def forward(ctx, x, rows, positions, pad_rows, pad_positions, B, L):
        N, K, _, nh, dh = x.shape
        out = x.new_empty(3, K, B, nh, L, dh)
        view = out.permute(2, 4, 1, 0, 3, 5)              # (B, L, K, 3, nh, dh)
        view[rows, positions] = x
        view[pad_rows, pad_positions] = 0.0
        ctx.save_for_backward(rows, positions)
        ctx.shape = x.shape
        return tuple(out.unbind(0))

    @staticmethod
    def backward(ctx, gq, gk, gv):
        rows, positions = ctx.saved_tensors
        grad = gq.new_zeros(ctx.shape) if any(g is None for g in (gq, gk, gv)) else gq.new_empty(ctx.shape)
        for j, g in enumerate((gq, gk, gv)):
            if g is not None:
                grad[:, :, j] = g.permute(1, 3, 0, 2, 4)[rows, positions]
        return grad, None, None, None, None, None, None


class _ScatterBuckets(torch.autograd.Function):
    """(N, K, 3, nh, dh) packed projections whose tokens are the contiguous runs [t0, t1) of
    length buckets -> q, k, v of every bucket, each (K, b, nh, l, dh), pads 0 (a flat tuple,
    three per bucket). The backward pass gathers each bucket's gradients straight into one
    (N, ...) gradient, without a per-bucket gradient and a concatenation."""

    @staticmethod
    def forward(ctx, x, specs):
        N, K, _, nh, dh = x.shape
        outs = []
        for t0, t1, rows, positions, pad_rows, pad_positions, B, L in specs:
            out = x.new_empty(3, K, B, nh, L, dh)
            view = out.permute(2, 4, 1, 0, 3, 5)                          # (B, L, K, 3, nh, dh)
            view[rows, positions] = x[t0:t1]
            if pad_rows.numel():
                view[pad_rows, pad_positions] = 0.0
            outs.extend(out.unbind(0))
        ctx.specs = [(t0, t1, rows, positions) for t0, t1, rows, positions, *_ in specs]
        ctx.shape = x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grad = grads[0].new_zeros(ctx.shape) if any(g is None for g in grads) else grads[0].new_empty(ctx.shape)
        for i, (t0, t1, rows, positions) in enumerate(ctx.specs):
            for j in range(3):
                g = grads[3 * i + j]
                if g is not None:
                    grad[t0:t1, :, j] = g.permute(1, 3, 0, 2, 4)[rows, positions]
        return grad, None


def _attention(q: Tensor, k: Tensor, v: Tensor, gauss: Tensor | None, mask_add: Tensor | None,
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
    probs = dropout(torch.softmax(scores, dim=-1), p, training)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------- modules

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
    """x + learned position embedding -> LayerNorm -> Dropout, on packed tokens."""

    def __init__(self, n_positions: int, hidden: int, p: float):
        super().__init__()
        self.embedding = nn.Embedding(n_positions, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.p = p

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return dropout(self.norm(x + self.embedding(positions)), self.p, self.training)


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer without output projection (the query encoder)."""

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads, self.p = n_heads, p
        self.qkv = nn.Linear(hidden, 3 * hidden)
        _mark(self.qkv.weight, 3), _mark(self.qkv.bias, 3)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, tokens: _Tokens) -> Tensor:
        q, k, v = (t.squeeze(0) for t in tokens.qkv_heads(self.qkv(x), 1, self.n_heads))
        ctx = _attention(q, k, v, None, tokens.key_mask_add(x.dtype), self.p, self.training)
        ctx = tokens.from_heads(ctx)
        x = self.norm1(add_dropout(x, ctx, self.p, self.training))
        h, keep_scale = relu_dropout_unscaled(self.ffn_in(x), self.p, self.training)
        w_out = self.ffn_out.weight if keep_scale == 1.0 else self.ffn_out.weight * keep_scale
        return self.norm2(add_dropout(x, F.linear(h, w_out, self.ffn_out.bias), self.p, self.training))


class GaussianBranches(nn.Module):
    """K post-norm self-attention layers (one per Gaussian width) run as one batch.

    Input packed tokens (N, H); output (K, N, H).
    """

    def __init__(self, hidden: int, n_heads: int, widths: Sequence[float | None], max_len: int, p: float):
        super().__init__()
        K, H = len(widths), hidden
        self.n_heads, self.p, self.widths = n_heads, p, tuple(widths)
        self.qkv_weight = _mark(nn.Parameter(torch.empty(K, 3 * H, H)), 3 * K)
        self.qkv_bias = _mark(nn.Parameter(torch.zeros(K, 3 * H)), 3 * K)
        self.ffn_in_weight = _mark(nn.Parameter(torch.empty(K, 4 * H, H)), K)
        self.ffn_in_bias = _mark(nn.Parameter(torch.zeros(K, 4 * H)), K)
        self.ffn_out_weight = _mark(nn.Parameter(torch.empty(K, H, 4 * H)), K)
        self.ffn_out_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.norm1_weight = _mark(nn.Parameter(torch.ones(K, H)), K)
        self.norm1_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.norm2_weight = _mark(nn.Parameter(torch.ones(K, H)), K)
        self.norm2_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        gauss = torch.stack([gaussian_matrix(max_len, w) for w in widths]).float()
        self.register_buffer("gauss", gauss, persistent=False)  # (K, max_len, max_len)

    def forward(self, x: Tensor, tokens: _Tokens) -> Tensor:
        K, H, nh = self.qkv_weight.shape[0], x.shape[-1], self.n_heads
        # Q, K, V of all branches in one matmul on packed tokens, then to (3, K, B, nh, L, dh).
        qkv = F.linear(x, self.qkv_weight.reshape(K * 3 * H, H), self.qkv_bias.reshape(-1))
        # attention per length bucket (one bucket = the whole batch at its longest length)
        groups = tokens.groups or [(0, tokens.count, tokens)]
        # every bucket's q, k, v in one autograd node whose backward writes one gradient
        heads = _ScatterBuckets.apply(qkv.view(-1, K, 3, nh, H // nh),
                                      [(t0, t1, *sub.scatter_spec()) for t0, t1, sub in groups])
        heads = [heads[i:i + 3] for i in range(0, len(heads), 3)]
        parts = []
        for (q, k, v), (_, _, sub) in zip(heads, groups):                 # each (K, b, nh, l, dh)
            gauss = self.gauss[:, None, None, :sub.length, :sub.length]
            ctx = _attention(q, k, v, gauss, sub.key_mask_add(x.dtype), self.p, self.training)
            parts.append(sub.from_heads(ctx))                              # (K, n, H)
        ctx = parts[0] if len(parts) == 1 else torch.cat(parts, 1)         # (K, N, H)
        y = _branch_layer_norm(add_dropout(x, ctx, self.p, self.training), self.norm1_weight, self.norm1_bias)
        h = torch.baddbmm(self.ffn_in_bias.unsqueeze(1), y, self.ffn_in_weight.transpose(1, 2))
        h, keep_scale = relu_dropout_unscaled(h, self.p, self.training)
        w_out = self.ffn_out_weight if keep_scale == 1.0 else self.ffn_out_weight * keep_scale
        f = torch.baddbmm(self.ffn_out_bias.unsqueeze(1), h, w_out.transpose(1, 2))
        return _branch_layer_norm(add_dropout(y, f, self.p, self.training), self.norm2_weight, self.norm2_bias)


class WeightTokenAttention(nn.Module):
    """Post-norm cross-attention of one token over each branch output, all branches at once.

    Its FFN is Linear(H, H) -> ReLU -> Dropout -> Linear(H, H).
    """

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads, self.p = n_heads, p
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        _mark(self.key_value.weight, 2), _mark(self.key_value.bias, 2)
        self.ffn_in = nn.Linear(hidden, hidden)
        self.ffn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, token: Tensor, branches: Tensor, tokens: _Tokens) -> Tensor:
        """token (H,), branches (K, N, H) packed -> (K, B, H)."""
        K, H, nh = branches.shape[0], branches.shape[-1], self.n_heads
        B, L, dh = tokens.batch, tokens.length, H // nh
        w_k, w_v = self.key_value.weight.view(2, nh, dh, H).unbind(0)
        b_k, b_v = self.key_value.bias.view(2, nh, dh).unbind(0)
        q = self.query(token).view(nh, dh) / math.sqrt(dh)
        # scores[k, n, h] = q_h . (W_k o + b_k)_h, with q folded into the key projection.
        key_q = torch.einsum("hd,hdc->ch", q, w_k)                       # (H, nh)
        scores = torch.matmul(branches, key_q) + (q * b_k).sum(-1)       # (K, N, nh)
        fill = torch.finfo(scores.dtype).min
        scores = tokens.unpack(scores, dim=1, fill=fill).view(K, B, L, nh)
        probs = dropout(torch.softmax(scores, dim=2), self.p, self.training)  # (K, B, L, nh)
        seq = tokens.unpack(branches, dim=1).view(K * B, L, H)
        pooled = torch.bmm(probs.view(K * B, L, nh).transpose(1, 2), seq)     # (KB, nh, H)
        # values: W_v applied after pooling; the bias is weighted by the kept probability mass.
        ctx = torch.einsum("nhc,hdc->nhd", pooled, w_v) + probs.sum(2).view(K * B, nh, 1) * b_v
        t = self.norm1(add_dropout(token, ctx.reshape(K, B, H), self.p, self.training))
        f = self.ffn_out(dropout(self.ffn_in(t), self.p, self.training, relu=True))
        return self.norm2(add_dropout(t, f, self.p, self.training))


class TemporalConsolidation(nn.Module):
    """Gaussian branches + weight-token mixing of one stream (clips or frames)."""

    def __init__(self, cfg: GMMFormerConfig, length: int):
        super().__init__()
        H = cfg.hidden_size
        self.branches = GaussianBranches(H, cfg.n_heads, cfg.widths, length, cfg.drop)
        self.token_attention = WeightTokenAttention(H, cfg.n_heads, cfg.drop)
        self.mix_hidden = nn.Linear(H, H)
        self.mix_out = nn.Linear(H, length)  # one logit per position and branch
        self.p, self.sft_factor = cfg.drop, cfg.sft_factor

    def forward(self, x: Tensor, token: Tensor, tokens: _Tokens) -> Tensor:
        """packed (N, H) -> packed (N, H)"""
        outs = self.branches(x, tokens)                                   # (K, N, H)
        t = self.token_attention(token, outs, tokens)                     # (K, B, H)
        h = dropout(self.mix_hidden(t), self.p, self.training, relu=True)
        L = tokens.length
        logits = F.linear(h, self.mix_out.weight[:L], self.mix_out.bias[:L])  # (K, B, L)
        mix = torch.softmax(logits / self.sft_factor, dim=0).reshape(len(outs), -1)
        if tokens.index is not None:
            mix = mix.index_select(1, tokens.index)                       # (K, N)
        return (outs * mix.unsqueeze(-1)).sum(0)  # (einsum would run N tiny matmuls here)


class GMMFormer(nn.Module):
    def __init__(self, cfg: GMMFormerConfig | None = None):
        super().__init__()
        cfg = cfg or GMMFormerConfig()
        self.cfg = cfg
        H = cfg.hidden_size
        self.query_proj = InputProjection(cfg.text_dim, H, cfg.input_drop)
        self.query_pos = PositionEmbedding(cfg.max_query_len, H, cfg.input_drop)
        self.query_layer = EncoderLayer(H, cfg.n_heads, cfg.drop)
        self.query_pool = nn.Linear(H, 1, bias=False)

        self.clip_proj = InputProjection(cfg.visual_dim, H, cfg.input_drop)
        self.clip_pos = PositionEmbedding(cfg.max_frames, H, cfg.input_drop)  # the release sizes it 128 too
        self.clip_consolidation = TemporalConsolidation(cfg, cfg.n_clips)

        self.frame_proj = InputProjection(cfg.visual_dim, H, cfg.input_drop)
        self.frame_pos = PositionEmbedding(cfg.max_frames, H, cfg.input_drop)
        self.frame_consolidation = TemporalConsolidation(cfg, cfg.max_frames)

        self.weight_token = nn.Parameter(torch.empty(H))  # shared by both streams
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear/Embedding weights N(0, init_std), biases 0, LayerNorms (1, 0), token N(0, 1)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, GaussianBranches):
                for name, p in module.named_parameters(recurse=False):
                    if name.startswith("norm") and name.endswith("weight"):
                        nn.init.ones_(p)
                    elif name.endswith("bias"):
                        nn.init.zeros_(p)
                    else:
                        nn.init.normal_(p, 0.0, std)
        nn.init.normal_(self.weight_token, 0.0, 1.0)

    # ------------------------------------------------------------------ encoders
    def encode_query(self, query_feats: Tensor, query_mask: Tensor) -> Tensor:
        """(Nq, Lq, Dt), (Nq, Lq) -> (Nq, H)"""
        Nq, Lq = query_mask.shape
        tokens = _Tokens(_as_bool(query_mask), Nq, Lq, query_feats.device)
        x = self.query_proj(tokens.pack(query_feats))
        x = self.query_pos(x, tokens.positions)
        x = self.query_layer(x, tokens)                                   # (N, H)
        logits = tokens.unpack(self.query_pool(x).squeeze(1), fill=-1e10).view(Nq, Lq)
        attn = tokens.pack(torch.softmax(logits, dim=1).unsqueeze(-1))   # (N, 1)
        rows = torch.div(tokens.index, Lq, rounding_mode="floor") if tokens.index is not None \
            else torch.arange(Nq, device=x.device).repeat_interleave(Lq)
        return x.new_zeros(Nq, x.shape[1]).index_add(0, rows, attn * x)

    def encode_videos(self, clip_feats: Tensor, frame_feats: Tensor, frame_mask: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """-> clips (B, n_clips, H), frames (B, Lf, H) zero at pads, frame_mask (B, Lf) bool."""
        token = self.weight_token
        B, C = clip_feats.shape[:2]
        clip_tokens = _Tokens(None, B, C, clip_feats.device)
        c = self.clip_pos(self.clip_proj(clip_tokens.pack(clip_feats)), clip_tokens.positions)
        clips = self.clip_consolidation(c, token, clip_tokens).view(B, C, -1)

        frame_mask = _as_bool(frame_mask)
        Lf = frame_mask.shape[1]
        if Lf > self.cfg.max_frames:
            raise ValueError(f"frame_feats has {Lf} frames; the model takes at most {self.cfg.max_frames}")
        # attention runs at the batch's longest real length, not at the padded Lf
        used = frame_mask.any(0).nonzero()
        L = int(used.max()) + 1 if used.numel() else 1
        valid = frame_mask[:, :L]
        # videos sorted by real length (longest first) so attention can run in length buckets;
        # tokens are gathered straight from the inputs in that order and scattered back.
        ends = (valid * torch.arange(1, L + 1, device=valid.device)).amax(1)
        order = torch.argsort(ends, descending=True, stable=True)
        frame_tokens = _Tokens(valid.index_select(0, order), B, L, frame_feats.device)
        frame_tokens.bucket()
        rows = frame_tokens.rows if frame_tokens.index is not None \
            else torch.arange(B, device=valid.device).repeat_interleave(L)
        source = order[rows] * Lf + frame_tokens.positions                # slots in (B, Lf)
        f = frame_feats.reshape(B * Lf, -1).index_select(0, source)
        f = self.frame_pos(self.frame_proj(f), frame_tokens.positions)
        f = self.frame_consolidation(f, token, frame_tokens)
        frames = f.new_zeros(B * Lf, f.shape[-1]).index_copy(0, source, f).view(B, Lf, -1)
        return clips, frames, frame_mask

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        query = self.encode_query(batch["query_feats"], batch["query_mask"])
        clips, frames, frame_mask = self.encode_videos(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"])
        scores = pair_scores(query, clips, frames, frame_mask, self.cfg.max_frames)
        query_aux = self.encode_query(batch["query_feats"], batch["query_mask"]) if self.training else None
        return ModelOutput(query, clips, frames, frame_mask, *scores, query_aux=query_aux)

    # ------------------------------------------------------------------ optimiser
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The release's decay rule: no decay for biases and for the LayerNorms of the
        input projections and position embeddings; decay for everything else (encoder
        norm1/norm2 weights included)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            embed_norm = name.split(".")[0].endswith(("_proj", "_pos")) and ".norm." in name
            (no_decay if name.endswith("bias") or embed_norm else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (else `model`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


# ----------------------------------------------------------------------------- scores

def pair_scores(query: Tensor, clips: Tensor, frames: Tensor, frame_mask: Tensor, max_frames: int = 128
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(clip, clip_raw, frame, frame_raw) scores, each (Nq, B).

    Max over clips / frames of cosine (and of the plain dot product). A video with fewer
    than `max_frames` real frames has zero vectors in its remaining slots (as the release
    pads every video to 128), so 0 is among its frame candidates.
    """
    frame_mask = _as_bool(frame_mask)
    qn = F.normalize(query, dim=-1)
    clip_raw = torch.einsum("qh,bch->qbc", query, clips).amax(-1)
    clip = torch.einsum("qh,bch->qbc", qn, F.normalize(clips, dim=-1)).amax(-1)
    neg = torch.finfo(frames.dtype).min
    pad = (~frame_mask)[None]                                  # (1, B, Lf)
    short = (frame_mask.sum(1) < max_frames)[None]             # (1, B): 0 is a candidate
    fr = torch.einsum("qh,bfh->qbf", query, frames).masked_fill(pad, neg).amax(-1)
    fn = torch.einsum("qh,bfh->qbf", qn, F.normalize(frames, dim=-1)).masked_fill(pad, neg).amax(-1)
    frame_raw = torch.where(short, fr.clamp_min(0.0), fr)
    frame = torch.where(short, fn.clamp_min(0.0), fn)
    return clip, clip_raw, frame, frame_raw


def retrieval_scores(query: Tensor, clips: Tensor, frames: Tensor, frame_mask: Tensor,
                     cfg: GMMFormerConfig) -> Tensor:
    """(Nq, B) = clip_scale_w * clip score + frame_scale_w * frame score."""
    clip, _, frame, _ = pair_scores(query, clips, frames, frame_mask, cfg.max_frames)
    return cfg.clip_scale_w * clip + cfg.frame_scale_w * frame
