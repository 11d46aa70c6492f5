"""Speed kernels of the networks, apart from what the networks mean.

Everything here computes exactly what plain PyTorch would (dropout: the same keep rate and
scaling), only with less work or fewer fresh tensors on CPU, where each large fresh tensor
pays its page faults:

* `Tokens`: packed <-> padded bookkeeping, so token-wise work runs on real tokens only, and
  length buckets for attention (`Tokens.bucket`); `_ScatterHeads` / `_ScatterBuckets` write
  packed q/k/v straight into the attention layout and gather gradients straight back.
* dropout on CPU: one keep-mask multiply (also the whole backward); relu+dropout in place on a
  fresh matmul output with the keep scale folded into the next weight (`relu_dropout_unscaled`);
  residual + dropout as one addcmul (`add_dropout`).
* BLAS: the nodes' large matmuls (`matmul`, `linear`) on numpy's OpenBLAS, faster than torch's
  oneMKL on AMD CPUs; same products up to float rounding.

Switches (module state, `SWITCHES`, or the `switches(...)` context manager):
* `portable`: take the path every other device takes (F.dropout, plain ops) also on CPU, so the
  tests run the CUDA code path on CPU.
* `numpy_blas` (on): `matmul` / `linear` use numpy's OpenBLAS where found, under short
  OpenBLAS waits and for products of at least NUMPY_BLAS_MIN_FLOP; off: torch's BLAS.
Each kernel stays only while a benchmark shows it paying: benchmarks/results/kernels.md says
what each buys, which test proves it exact and when to remove it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_MASK_ADD = -10000.0  # additive key mask of the release's attention


@dataclass
class Switches:
    portable: bool = False
    numpy_blas: bool = False   # set from the settings by configure_blas


SWITCHES = Switches()


@contextlib.contextmanager
def switches(**kw):
    """Set kernel switches for a block: `with switches(portable=True): ...`."""
    for k in kw:
        if not hasattr(SWITCHES, k):
            raise AttributeError(f"unknown kernel switch '{k}'")
    old = {k: getattr(SWITCHES, k) for k in kw}
    for k, v in kw.items():
        setattr(SWITCHES, k, bool(v))
    try:
        yield SWITCHES
    finally:
        for k, v in old.items():
            setattr(SWITCHES, k, v)


def cpu_kernels(x: Tensor) -> bool:
    """True when x takes the CPU kernels (on CPU, not forced portable, and not under autocast:
    a bf16 forward takes the portable path, the one CUDA runs, whose ops autocast handles)."""
    return x.device.type == "cpu" and not SWITCHES.portable and not torch.is_autocast_enabled("cpu")


def as_bool(mask: Tensor) -> Tensor:
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
    if not cpu_kernels(x):
        return F.dropout(F.relu(x) if relu else x, p, True)
    keep, scale = _keep_mask(x, p)
    if relu:
        keep &= x > 0
    return _Dropped.apply(x, keep, scale)


class _Dropped(torch.autograd.Function):
    """x * keep * scale with a bool keep mask, which is all backward keeps, as packed bits
    (1/8 byte an entry, not the 4 of a float mask autograd would save for a plain multiply)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(_pack_bits(keep))
        ctx.scale, ctx.shape = scale, keep.shape
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep = _unpack_bits(ctx.saved_tensors[0], ctx.shape)
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def softmax_dropout_matmul(scores: Tensor, v: Tensor, p: float, training: bool) -> Tensor:
    """dropout(softmax(scores, -1)) @ v, the end of an attention (scores (..., L, L), v (..., L, d)
    with the same leading dimensions).

    In CPU training this is one autograd node that keeps the probabilities, the bool keep mask
    and v, and remakes the dropped probabilities in backward: autograd would keep the dropped
    probabilities as well (one more float (..., L, L) tensor per attention). The mask is the
    same draw `dropout` makes at this point, so values and gradients equal the plain ops'.
    """
    if not training or p <= 0.0 or p >= 1.0 or not cpu_kernels(scores) \
            or scores.shape[:-2] != v.shape[:-2]:
        return torch.matmul(dropout(torch.softmax(scores, dim=-1), p, training), v)
    probs = torch.softmax(scores.detach(), dim=-1)
    keep, scale = _keep_mask(probs, p)
    return _SoftmaxDropMatmul.apply(scores, probs, keep, scale, v)


class _SoftmaxDropMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, probs, keep, scale, v):
        ctx.save_for_backward(probs, _pack_bits(keep), v)
        ctx.scale, ctx.shape = scale, keep.shape
        return torch.matmul(torch.mul(probs, keep).mul_(scale), v)

    @staticmethod
    def backward(ctx, grad):
        probs, packed, v = ctx.saved_tensors
        keep = _unpack_bits(packed, ctx.shape)
        grad_v = None
        if ctx.needs_input_grad[4]:
            grad_v = torch.matmul(torch.mul(probs, keep).mul_(ctx.scale).transpose(-1, -2), grad)
        grad_probs = torch.matmul(grad, v.transpose(-1, -2)).mul_(keep).mul_(ctx.scale)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        return grad_scores, None, None, None, grad_v


def _keep_mask(x: Tensor | tuple, p: float) -> tuple[Tensor, float]:
    """CPU dropout draw for x (a tensor or a shape): (bool tensor, True = kept, the 1/(1-p)
    keep scale), 0 < p < 1.

    One uniform 32-bit integer per entry, kept when >= ceil(p * 2^32): the rate is p to within
    2^-32 (torch.rand's float32 draws resolve 2^-24). The integers come from numpy's SFC64
    generator, seeded by one 64-bit draw of torch's default CPU generator, so a torch seed fixes
    every mask; SFC64 fills faster than torch's serial Mersenne Twister, which was the
    largest single-threaded cost of a CPU training step (benchmarks/README.md).
    """
    return keep_bits(x.shape if isinstance(x, Tensor) else tuple(x), p, _mask_seed()), 1.0 / (1.0 - p)


def _mask_seed() -> int:
    """The one draw of torch's default generator that seeds a dropout mask's SFC64 words."""
    return int(torch.empty((), dtype=torch.int64).random_(0, 2 ** 62))


_MASK_CHUNK = 1 << 20


def keep_bits(shape, p: float, seed: int) -> Tensor:
    """uint32 words of SFC64(seed), in order, compared with ceil(p * 2^32): a bool tensor of
    `shape`, True where kept. Drawn through 4 MiB chunks, so no full-size integer tensor is
    ever allocated; the chunking does not change the draws."""
    return KeepStream(p, seed).take(shape)


class KeepStream:
    """keep_bits(shape, p, seed) drawn in consecutive pieces: `take(s1)`, `take(s2)`, ... are,
    flattened and concatenated, exactly keep_bits of the total size (so a node can draw its
    mask a slice of the leading dimension at a time and never hold the whole mask)."""

    def __init__(self, p: float, seed: int):
        self.cut = np.uint32(min(max(math.ceil(p * 2.0 ** 32), 1), 2 ** 32 - 1))
        self.gen = np.random.SFC64(seed)
        self.spare = None  # the unused upper word of the last 64-bit draw, if any

    def take(self, shape) -> Tensor:
        shape = tuple(shape)
        keep = np.empty(math.prod(shape), dtype=np.bool_)
        i = 0
        if keep.size and self.spare is not None:
            keep[0] = self.spare >= self.cut
            self.spare, i = None, 1
        while i < keep.size:
            m = min(_MASK_CHUNK, keep.size - i)
            words = self.gen.random_raw((m + 1) // 2).view(np.uint32)
            np.greater_equal(words[:m], self.cut, out=keep[i:i + m])
            if m % 2:
                self.spare = words[m]
            i += m
        return torch.from_numpy(keep).view(shape)


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
    if not cpu_kernels(x):
        return F.dropout(F.relu(x), p, True), 1.0
    keep, scale = _keep_mask(x, p)
    return _DroppedRelu.apply(x, keep), scale


def branch_ffn(y: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor, p: float,
               training: bool) -> Tensor:
    """Per-branch feed-forward Linear -> ReLU -> Dropout -> Linear of y (K, N, H), weights
    w_in (K, F, H), w_out (K, H, F), biases (K, F), (K, H) -> (K, N, H), plain ops (the path
    every device but the CPU in training takes; there `branch_norm_ffn` fuses it)."""
    h = torch.baddbmm(b_in.unsqueeze(1), y, w_in.transpose(1, 2))
    h, scale = relu_dropout_unscaled(h, p, training)
    w = w_out if scale == 1.0 else w_out * scale
    return torch.baddbmm(b_out.unsqueeze(1), h, w.transpose(1, 2))


def branch_norm_ffn(x: Tensor, ln_w: Tensor, ln_b: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
                    b_out: Tensor, p: float, training: bool, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(y, ffn(y)) for y = branch_layer_norm(x, ln_w, ln_b) and ffn the per-branch `branch_ffn`
    (x (K, N, H), LN parameters (K, H)): the first LayerNorm of a post-norm layer and its FFN.

    In CPU training one autograd node that keeps only what the LayerNorm keeps (the normalised
    x and 1/std): neither y (backward remakes it with one multiply-add) nor the hidden layer
    (K, N, F) nor its dropout mask, ~0.5 GB on a TVR frame batch of GMMFormer v2. Forward and
    backward make the hidden layer _FFN_CHUNK branches at a time, at the cost of the first
    matmul once more in backward. The mask is the draw `dropout` makes here (KeepStream),
    kept as packed bits (1/8 of a bool mask; ~15 MB for the frames) instead of drawn again.
    Values equal the plain ops'.
    """
    if not training or p <= 0.0 or p >= 1.0 or not cpu_kernels(x):
        y = branch_layer_norm(x, ln_w, ln_b, eps)
        return y, branch_ffn(y, w_in, b_in, w_out, b_out, p, training)
    return _BranchNormFFN.apply(x, ln_w, ln_b, w_in, b_in, w_out, b_out, p, _mask_seed(), eps)


def norm_ffn(x: Tensor, norm: torch.nn.LayerNorm, ffn_in: torch.nn.Linear, ffn_out: torch.nn.Linear,
             p: float, training: bool) -> tuple[Tensor, Tensor]:
    """(y, ffn_out(dropout(relu(ffn_in(y))))) for y = norm(x), on tokens x (N, H): a post-norm
    layer's first LayerNorm and its FFN. In CPU training `branch_norm_ffn`'s node with one
    branch, which keeps neither y nor the (N, F) hidden layer; elsewhere the plain modules."""
    if training and 0.0 < p < 1.0 and cpu_kernels(x):
        y, f = branch_norm_ffn(x[None], norm.weight[None], norm.bias[None], ffn_in.weight[None],
                               ffn_in.bias[None], ffn_out.weight[None], ffn_out.bias[None], p, True, norm.eps)
        return y[0], f[0]
    y = norm(x)
    h, scale = relu_dropout_unscaled(ffn_in(y), p, training)
    return y, F.linear(h, ffn_out.weight if scale == 1.0 else ffn_out.weight * scale, ffn_out.bias)


# ----------------------------------------------------------------------------- BLAS
# torch's CPU wheel runs float matmuls through oneMKL, which on AMD CPUs takes a slower path
# than its Intel one; numpy's OpenBLAS can be faster there (benchmarks/bench_blas.py measures
# both on the FFN's shapes; figures in benchmarks/README.md). The large matmuls of the CPU nodes below go through `matmul`, which
# hands the arrays (zero-copy views) to numpy when numpy's OpenBLAS is found and can be told
# torch's thread count; otherwise, and under the `numpy_blas=False` switch, torch's own.


class _OpenBLAS:
    """numpy's bundled OpenBLAS, found lazily (no work at import): its thread count is kept
    equal to torch.get_num_threads(), so the two never oversubscribe the cores."""

    def __init__(self):
        self.probed, self.set_threads, self.threads = False, None, None

    def _probe(self) -> None:
        import ctypes
        import glob
        import os

        self.probed = True
        try:
            if np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"] != "scipy-openblas":
                return
            libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                          "libscipy_openblas*"))
            for path in libs:
                lib = ctypes.CDLL(path)
                for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
                    if hasattr(lib, name):
                        self.set_threads = getattr(lib, name)
                        self.set_threads.argtypes = [ctypes.c_int]
                        return
        except (OSError, KeyError, TypeError, AttributeError):
            self.set_threads = None

    def ready(self) -> bool:
        if not self.probed:
            self._probe()
        if self.set_threads is None:
            return False
        n = torch.get_num_threads()
        if n != self.threads:
            self.set_threads(n)
            self.threads = n
        return True


_OPENBLAS = _OpenBLAS()


# Only where the two pools wait briefly (prvr.procenv.THREAD_ENV, which the train stage sets at
# start-up): with OpenBLAS's default waits the two pools spin against each other.
# And only for large products: each hand-over between the pools costs a wake-up, which small
# matmuls (the demo's) do not earn back; every large matmul of a TVR-sized step is above this.
NUMPY_BLAS_MIN_FLOP = 4e9


def configure_blas(requested: bool) -> str:
    """Set the `numpy_blas` switch from the settings (cpu.numpy_blas) and say what was chosen.

    Asked for, it is taken only where this process started with short OpenBLAS waits
    (prvr.procenv.short_openblas_waits reads the start-up environment: the waits can only be
    set before numpy loads OpenBLAS); otherwise torch's BLAS, and the returned line says why."""
    from ...procenv import short_openblas_waits

    SWITCHES.numpy_blas = False
    if not requested:
        return "torch's BLAS (cpu.numpy_blas: false)"
    if not short_openblas_waits():
        return ("torch's BLAS: cpu.numpy_blas is on but this process started without short OpenBLAS "
                "waits (OPENBLAS_THREAD_TIMEOUT <= 8; the train stage sets them at start-up)")
    if not _OPENBLAS.ready():
        return "torch's BLAS: cpu.numpy_blas is on but numpy's OpenBLAS was not found"
    SWITCHES.numpy_blas = True
    return "numpy's OpenBLAS for matmuls of at least %.0e FLOP" % NUMPY_BLAS_MIN_FLOP


def numpy_blas_active(x: Tensor) -> bool:
    """True when `matmul` may hand x's matmuls to numpy's OpenBLAS: the switch is on (see
    configure_blas), x is a float CPU tensor, and OpenBLAS was found."""
    return (SWITCHES.numpy_blas and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and _OPENBLAS.ready())


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """a @ b (+ bias, broadcast) for 2-d or batched 3-d CPU tensors (views welcome) into `out`
    (fresh when None), outside autograd (for a node's own passes): numpy's OpenBLAS when
    `numpy_blas_active` and the product has at least NUMPY_BLAS_MIN_FLOP, torch's (b)addmm /
    bmm otherwise."""
    if out is None:
        out = a.new_empty(*a.shape[:-1], b.shape[-1])
    if 2.0 * out.numel() * a.shape[-1] >= NUMPY_BLAS_MIN_FLOP and numpy_blas_active(a) \
            and b.dtype == a.dtype == out.dtype:
        np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.detach().numpy())
        return out if bias is None else out.add_(bias)
    if bias is None:
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=out)
    return (torch.addmm if a.dim() == 2 else torch.baddbmm)(bias, a, b, out=out)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear for x (N, D_in); on CPU with numpy's OpenBLAS one autograd node whose three
    matmuls (forward, both gradients) run there. Keeps x and the weight, as F.linear does."""
    if x.dim() != 2 or not cpu_kernels(x) or not numpy_blas_active(x) or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return matmul(x, weight.t(), bias=bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = matmul(grad, weight) if ctx.needs_input_grad[0] else None
        gw = matmul(grad.t(), x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


_FFN_CHUNK = 2  # branches per chunk of _BranchNormFFN's hidden layer (forward and backward)


def _chunks(K: int):
    return [(a, min(a + _FFN_CHUNK, K)) for a in range(0, K, _FFN_CHUNK)]


def _hidden_chunks(y: Tensor, w_in: Tensor, b_in: Tensor, keeps):
    """(a, b, h) for branches a:b, _FFN_CHUNK at a time (`_chunks`): h = relu(y W_in^T + b_in)
    with the dropped entries zeroed, not rescaled; `keeps` yields each chunk's bool keep mask
    (b - a, N, F) in turn. The caller deletes its h before asking for the next chunk."""
    for (a, b), keep in zip(_chunks(y.shape[0]), keeps):
        h = matmul(y[a:b], w_in[a:b].transpose(1, 2), bias=b_in[a:b].unsqueeze(1))  # (k, N, F)
        torch.where(keep, h, h.new_zeros(()), out=h).relu_()
        del keep
        yield a, b, h
        del h


def _pack_bits(keep: Tensor) -> Tensor:
    """CPU bool tensor -> uint8 tensor of its bits (np.packbits order), 1/8 of its bytes: how
    the CPU nodes keep a dropout mask for backward (packing costs far less than drawing again)."""
    return torch.from_numpy(np.packbits(keep.numpy().reshape(-1)))


def _unpack_bits(packed: Tensor, shape) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape)).view(np.bool_)).view(shape)


class _BranchNormFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w_in, b_in, w_out, b_out, p, seed, eps):
        normed, rstd = _layer_norm_stats(x, ln_w.dtype, eps)
        y = torch.addcmul(ln_b.unsqueeze(1), normed, ln_w.unsqueeze(1))
        scale = 1.0 / (1.0 - p)
        w_out_scaled = w_out * scale
        out = y.new_empty(*y.shape[:2], w_out.shape[1])
        stream, packed = KeepStream(p, seed), []
        shapes = [(b - a, y.shape[1], w_in.shape[1]) for a, b in _chunks(y.shape[0])]

        def draws():  # the mask in order from the seed; backward gets its bits, not a re-draw
            for shape in shapes:
                keep = stream.take(shape)
                packed.append(_pack_bits(keep))
                yield keep

        for a, b, h in _hidden_chunks(y, w_in, b_in, draws()):
            matmul(h, w_out_scaled[a:b].transpose(1, 2), out=out[a:b], bias=b_out[a:b].unsqueeze(1))
            del h  # before the next chunk is made: one chunk alive at a time
        ctx.save_for_backward(normed, rstd, ln_w, ln_b, w_in, b_in, w_out, *packed)
        ctx.shapes, ctx.scale, ctx.x_dtype = shapes, scale, x.dtype
        return y, out

    @staticmethod
    def backward(ctx, grad_y, grad):
        normed, rstd, ln_w, ln_b, w_in, b_in, w_out, *packed = ctx.saved_tensors
        y = torch.addcmul(ln_b.unsqueeze(1), normed, ln_w.unsqueeze(1))       # remade
        gy, grad_w_in, grad_b_in = torch.empty_like(y), torch.empty_like(w_in), torch.empty_like(b_in)
        grad_w_out = torch.empty_like(w_out)
        keeps = (_unpack_bits(t, shape) for t, shape in zip(packed, ctx.shapes))   # the forward's draw
        for a, b, h in _hidden_chunks(y, w_in, b_in, keeps):
            g = grad[a:b]
            matmul(g.transpose(1, 2), h, out=grad_w_out[a:b]).mul_(ctx.scale)
            gh = matmul(g, w_out[a:b] * ctx.scale)
            gh = torch.ops.aten.threshold_backward.grad_input(gh, h, 0.0, grad_input=gh)
            del h
            torch.sum(gh, 1, out=grad_b_in[a:b])
            matmul(gh.transpose(1, 2), y[a:b], out=grad_w_in[a:b])
            matmul(gh, w_in[a:b], out=gy[a:b])
        del y
        if grad_y is not None:
            gy.add_(grad_y)
        grad_x, grad_ln_w, grad_ln_b = _layer_norm_backward(gy, normed, rstd, ln_w, ctx.x_dtype)
        return (grad_x, grad_ln_w, grad_ln_b, grad_w_in, grad_b_in, grad_w_out, grad.sum(1),
                None, None, None)


def add_dropout(x: Tensor, y: Tensor, p: float, training: bool) -> Tensor:
    """x + dropout(y) in one fused pass (addcmul) on CPU."""
    if not training or p <= 0.0 or p >= 1.0 or not cpu_kernels(y):
        return x + dropout(y, p, training)
    keep, scale = _keep_mask(y, p)
    return _AddDropped.apply(x, y, keep, scale)


class _AddDropped(torch.autograd.Function):
    """x + y * keep * scale (keep a bool tensor, all that backward keeps, as packed bits);
    backward: y's gradient is grad * keep * scale, the second multiply in place."""

    @staticmethod
    def forward(ctx, x, y, keep, scale):
        ctx.save_for_backward(_pack_bits(keep))
        ctx.scale, ctx.shape = scale, keep.shape
        ctx.x_shape = x.shape
        out = torch.mul(y, keep).mul_(scale)
        return out.add_(x) if torch.broadcast_shapes(x.shape, out.shape) == out.shape else out + x

    @staticmethod
    def backward(ctx, grad):
        keep = _unpack_bits(ctx.saved_tensors[0], ctx.shape)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = grad if grad.shape == ctx.x_shape else grad.sum_to_size(ctx.x_shape)
        gy = (grad * keep).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None


def branch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim of (K, N, H) with per-branch affine parameters (K, H).

    On CPU one autograd node whose backward keeps the normalised input and 1/std only; plain
    layer_norm + addcmul (the path elsewhere) would keep the input as well (a (K, N, H) tensor
    per call, ~100 MB on a TVR frame batch)."""
    if x.dim() != 3 or weight.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"branch_layer_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if not cpu_kernels(x):
        return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), weight.unsqueeze(1))
    return _BranchLayerNorm.apply(x, weight, bias, eps)


class _BranchLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        normed, rstd = _layer_norm_stats(x, weight.dtype, eps)
        ctx.save_for_backward(normed, rstd, weight)
        ctx.x_dtype = x.dtype
        return torch.addcmul(bias.unsqueeze(1), normed, weight.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = _layer_norm_backward(grad, normed, rstd, weight, ctx.x_dtype,
                                                      ctx.needs_input_grad[:3])
        return grad_x, grad_w, grad_b, None


def _layer_norm_stats(x: Tensor, dtype: torch.dtype, eps: float) -> tuple[Tensor, Tensor]:
    """(normalised x, 1/std) over the last dim, computed in `dtype`, the affine parameters'
    (under bf16 autocast x arrives in bf16, and a layer norm runs in fp32 there: autocast's
    own policy; its input gradient goes back in x's dtype)."""
    normed, _, rstd = torch.native_layer_norm(x.to(dtype), x.shape[-1:], None, None, eps)
    return normed, rstd


def _layer_norm_backward(grad: Tensor, normed: Tensor, rstd: Tensor, weight: Tensor, x_dtype,
                         needs=(True, True, True)) -> tuple:
    """Gradients (x in x_dtype, weight, bias) of addcmul(bias, normed, weight) per branch."""
    grad_w = torch.linalg.vecdot(grad, normed, dim=1) if needs[1] else None
    grad_b = grad.sum(1) if needs[2] else None
    grad_x = None
    if needs[0]:
        # d/dx of LN: rstd * (g - mean(g) - normed * mean(g * normed)), g = grad * weight
        g = grad * weight.unsqueeze(1)
        c = torch.linalg.vecdot(g, normed, dim=-1).div_(g.shape[-1]).unsqueeze(-1)
        grad_x = g.sub_(g.mean(-1, keepdim=True)).sub_(normed * c).mul_(rstd).to(x_dtype)
    return grad_x, grad_w, grad_b


def norm_dropout_linear(x: Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear, p: float,
                        training: bool, index: Tensor | None = None) -> Tensor:
    """linear(dropout(norm(x[index]))) on input features (x needs no gradient; index None = all
    rows), as one autograd node on CPU in training: backward keeps x, the index, the bool keep
    mask and the norm statistics, and remakes the gathered rows and the dropped normalised
    input for the weight gradient instead of keeping them (two (N, D_in) float tensors, ~100 MB
    each for a TVR frame batch; x itself is the caller's batch). Same draws as `dropout`."""
    if not training or p <= 0.0 or p >= 1.0 or x.requires_grad or not cpu_kernels(x):
        return linear(dropout(norm(x if index is None else x.index_select(0, index)), p, training))
    keep, scale = _keep_mask(x if index is None else (index.shape[0], x.shape[1]), p)
    return _NormDropLinear.apply(x, index, norm.weight, norm.bias, linear.weight, linear.bias, keep,
                                 scale, norm.eps)


class _NormDropLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, ln_w, ln_b, w, b, keep, scale, eps):
        rows = x if index is None else x.index_select(0, index)
        z, mean, rstd = torch.native_layer_norm(rows, rows.shape[-1:], ln_w, ln_b, eps)
        ctx.save_for_backward(x, index, mean, rstd, _pack_bits(keep), ln_w, ln_b, w)
        ctx.scale, ctx.shape = scale, keep.shape
        return matmul(z.mul_(keep).mul_(scale), w.t(), bias=b)

    @staticmethod
    def backward(ctx, grad):
        x, index, mean, rstd, packed, ln_w, ln_b, w = ctx.saved_tensors
        keep = _unpack_bits(packed, ctx.shape)
        xhat = (x if index is None else x.index_select(0, index)).sub(mean).mul_(rstd)
        dropped = torch.addcmul(ln_b, xhat, ln_w).mul_(keep).mul_(ctx.scale)
        grad_w = matmul(grad.t(), dropped)
        del dropped
        grad_z = matmul(grad, w).mul_(keep).mul_(ctx.scale)                # (N, D_in)
        grad_ln_b = grad_z.sum(0)
        grad_ln_w = torch.linalg.vecdot(grad_z, xhat, dim=0)
        return None, None, grad_ln_w, grad_ln_b, grad_w, grad.sum(0), None, None, None


def pool_tokens(weights: Tensor, x: Tensor, tokens: "Tokens") -> Tensor:
    """Weighted sums of each video's tokens: weights (K, B, L, h) over the padded slots,
    x (K, N, H) packed -> (K * B, h, H), i.e. bmm(weights^T, unpack(x)).

    The padded copy of x is made for the matmul and dropped; backward makes it again
    instead of keeping it (a (K, B * L, H) tensor, ~200 MB on a TVR frame batch)."""
    K, B, L, h = weights.shape
    w = weights.reshape(K * B, L, h).transpose(1, 2)
    if tokens.index is None:
        return torch.bmm(w, x.reshape(K * B, L, x.shape[-1]))
    return _PoolPacked.apply(w, x, tokens.index, B * L)


class _PoolPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, x, index, slots):
        ctx.save_for_backward(w, x, index)
        ctx.slots = slots
        return torch.bmm(w, _padded(x, index, slots, w.shape[0]))

    @staticmethod
    def backward(ctx, grad):
        w0, x0, index = ctx.saved_tensors
        # under autocast the forward's bmm ran in grad's dtype (bf16): so does the backward's,
        # and each gradient goes back in its input's dtype
        w, x = w0.to(grad.dtype), x0.to(grad.dtype)
        grad_w = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.bmm(grad, _padded(x, index, ctx.slots, w.shape[0]).transpose(1, 2)).to(w0.dtype)
        if ctx.needs_input_grad[1]:
            g = torch.bmm(w.transpose(1, 2), grad)                           # (KB, L, H)
            grad_x = g.view(x.shape[0], ctx.slots, -1).index_select(1, index).to(x0.dtype)
        return grad_w, grad_x, None, None


def _padded(x: Tensor, index: Tensor, slots: int, kb: int) -> Tensor:
    """packed (K, N, H) -> (K * B, L, H), zeros at the padded slots."""
    out = x.new_zeros(x.shape[0], slots, x.shape[-1]).index_copy_(1, index, x)
    return out.view(kb, slots * x.shape[0] // kb, x.shape[-1])


class Tokens:
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

        Sets `groups` to [(first token, end token, Tokens of the group)]. Split points
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
                                Tokens(sub, b1 - b0, Lg, self.mask.device)))

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




# ----------------------------------------------------------------------------- GMMFormer v1 additions

def dropout_unscaled(x: Tensor, p: float, training: bool) -> tuple[Tensor, float]:
    """(h, s) with s * h == dropout(x): the dropped entries of x zeroed, not rescaled; the
    caller folds the keep scale s into the next linear map's weight (a small tensor) instead
    of passing over the large h. On CPU in training, x is overwritten and only the bool keep
    mask is kept for backward: pass a fresh result whose backward does not need it (e.g. a
    LayerNorm output)."""
    if not training or p <= 0.0:
        return x, 1.0
    if p >= 1.0:
        return torch.zeros_like(x), 1.0
    if not cpu_kernels(x):
        return F.dropout(x, p, True), 1.0
    keep, scale = _keep_mask(x, p)
    return _DroppedInPlace.apply(x, keep.logical_not_()), scale


class _DroppedInPlace(torch.autograd.Function):
    """x with the entries where `drop` is True zeroed, IN PLACE; backward zeroes the same
    entries of the incoming gradient (in place when autograd hands over a fresh one)."""

    @staticmethod
    def forward(ctx, x, drop):
        x.masked_fill_(drop, 0.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(_pack_bits(drop))
        ctx.shape = drop.shape
        return x

    @staticmethod
    def backward(ctx, grad):
        drop = _unpack_bits(ctx.saved_tensors[0], ctx.shape)
        if grad.is_contiguous() and grad.shape == drop.shape and not grad.requires_grad:
            return grad.masked_fill_(drop, 0.0), None
        return grad.masked_fill(drop, 0.0), None


def gather_heads(x: Tensor, tokens: "Tokens") -> Tensor:
    """`tokens.from_heads(x)` for x (K, B, n_heads, L, dh) -> packed (K, N, n_heads * dh), whose
    backward writes each token's gradient once into its slot (autograd's generic path
    accumulates into a zero tensor, a serial pass on CPU)."""
    if tokens.index is None:
        return tokens.from_heads(x)
    rows, positions, pad_rows, pad_positions, _, _ = tokens.scatter_spec()
    return _GatherHeads.apply(x, rows, positions, pad_rows, pad_positions)


class _GatherHeads(torch.autograd.Function):
    """(K, B, nh, L, dh) -> (K, N, nh * dh) at the valid (row, position) slots; backward puts
    the gradient back at those slots and zeros at the padded ones (no accumulation: every
    slot is written at most once)."""

    @staticmethod
    def forward(ctx, x, rows, positions, pad_rows, pad_positions):
        K, _, nh, _, dh = x.shape
        ctx.save_for_backward(rows, positions, pad_rows, pad_positions)
        ctx.shape = x.shape
        return x.transpose(2, 3)[:, rows, positions].reshape(K, rows.numel(), nh * dh)

    @staticmethod
    def backward(ctx, grad):
        rows, positions, pad_rows, pad_positions = ctx.saved_tensors
        K, B, nh, L, dh = ctx.shape
        out = grad.new_empty(ctx.shape)
        view = out.transpose(2, 3)                                          # (K, B, L, nh, dh)
        view[:, rows, positions] = grad.reshape(K, -1, nh, dh)
        if pad_rows.numel():
            view[:, pad_rows, pad_positions] = 0.0
        return out, None, None, None, None
