"""The memory-saving kernels compute what plain PyTorch computes (values and gradients)."""
from __future__ import annotations

import math

import numpy as np
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prvr import procenv
from prvr.backends.cpu import kernels
from prvr.backends.cpu.kernels import (Tokens, branch_layer_norm, branch_norm_ffn, dropout, norm_dropout_linear, norm_ffn,
                          pool_tokens, softmax_dropout_matmul)


def test_keep_mask_is_the_plain_sfc64_draw_and_follows_the_torch_seed():
    """Chunked drawing gives exactly the words of one plain SFC64 draw, compared with
    ceil(p * 2^32); the seed comes from torch's generator, so torch.manual_seed fixes it."""
    for n in (10, kernels._MASK_CHUNK + 7, 3 * kernels._MASK_CHUNK):
        words = np.random.SFC64(12345).random_raw((n + 1) // 2).view(np.uint32)[:n]
        plain = torch.from_numpy(words >= np.uint32(math.ceil(0.2 * 2 ** 32)))
        assert torch.equal(kernels.keep_bits((n,), 0.2, 12345), plain)
    x = torch.empty(4, 5000)
    torch.manual_seed(3)
    a, scale = kernels._keep_mask(x, 0.2)
    torch.manual_seed(3)
    b, _ = kernels._keep_mask(x, 0.2)
    c, _ = kernels._keep_mask(x, 0.2)  # the generator moved on: a new draw
    assert a.shape == x.shape and a.dtype == torch.bool and scale == 1.25
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert abs(a.float().mean().item() - 0.8) < 0.02


def test_keep_stream_pieces_are_the_one_draw():
    """A mask drawn in pieces (odd sizes and chunk-crossing ones included) is, concatenated,
    the one keep_bits draw of the total size: what lets the FFN draw its mask per branch."""
    sizes = (3, 8, kernels._MASK_CHUNK + 1, 5, 0, 2 * kernels._MASK_CHUNK - 3, 1)
    whole = kernels.keep_bits((sum(sizes),), 0.3, 777)
    stream = kernels.KeepStream(0.3, 777)
    pieces = torch.cat([stream.take((n,)) for n in sizes])
    assert torch.equal(pieces, whole)
    assert torch.equal(kernels.KeepStream(0.3, 777).take((2, 4, 3)), whole[:24].view(2, 4, 3))


def test_nodes_keep_their_dropout_masks_as_bits():
    """Every CPU dropout node saves its mask packed (1/8 byte an entry), and unpacks exactly the
    mask it drew: the gradient is zero where the forward dropped, scaled elsewhere."""
    from prvr.backends.cpu.kernels import add_dropout
    torch.manual_seed(0)
    x = torch.randn(4, 7, 9, requires_grad=True)
    for f in (lambda t: dropout(t, 0.4, True), lambda t: add_dropout(torch.zeros(()), t, 0.4, True)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = f(x)
        assert [t.dtype for t in saved] == [torch.uint8] and saved[0].numel() == math.ceil(x.numel() / 8)
        g, = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, (y != 0).float() / 0.6)
    packed = kernels._pack_bits(torch.tensor([True, False, True] * 5))
    assert torch.equal(kernels._unpack_bits(packed, (3, 5)), torch.tensor([True, False, True] * 5).view(3, 5))


def test_dropout_keeps_the_rate_scale_and_gradient():
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.2, True)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * 1.25)
    assert abs(kept.float().mean().item() - 0.8) < 0.02
    g, = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, kept.float() * 1.25)


def test_branch_layer_norm_matches_layer_norm_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.addcmul(b.unsqueeze(1), F.layer_norm(x, (8,)), w.unsqueeze(1))
    assert torch.allclose(branch_layer_norm(x, w, b), ref)
    assert torch.autograd.gradcheck(branch_layer_norm, (x, w, b))


def test_pool_tokens_is_bmm_over_the_padded_layout():
    torch.manual_seed(0)
    K, B, L, h, H = 3, 4, 5, 2, 6
    mask = torch.rand(B, L) > 0.3
    mask[:, 0] = True
    for tokens in (Tokens(mask, B, L, torch.device("cpu")), Tokens(None, B, L, torch.device("cpu"))):
        w = torch.rand(K, B, L, h, dtype=torch.float64, requires_grad=True)
        x = torch.randn(K, tokens.count, H, dtype=torch.float64, requires_grad=True)
        ref = torch.bmm(w.view(K * B, L, h).transpose(1, 2), tokens.unpack(x, dim=1).reshape(K * B, L, H))
        assert torch.allclose(pool_tokens(w, x, tokens), ref)
        assert torch.autograd.gradcheck(lambda w, x, t=tokens: pool_tokens(w, x, t), (w, x))


def _norm_linear_and_rows():
    """A float64 LayerNorm(40) with non-trivial affine parameters, a Linear(40, 7), x (30, 40)."""
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(40).double(), nn.Linear(40, 7).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm, lin, torch.randn(30, 40, dtype=torch.float64)


def test_norm_dropout_linear_is_the_unfused_chain():
    norm, lin, x = _norm_linear_and_rows()
    outs = []
    for f in (lambda: norm_dropout_linear(x, norm, lin, 0.2, True), lambda: lin(dropout(norm(x), 0.2, True))):
        torch.manual_seed(5)
        y = f()
        outs.append((y, torch.autograd.grad((y * torch.arange(7.0)).sum(), list(norm.parameters()) + list(lin.parameters()))))
    (y1, g1), (y2, g2) = outs
    assert torch.allclose(y1, y2)
    assert all(torch.allclose(a, b) for a, b in zip(g1, g2))


def test_norm_dropout_linear_gathers_rows_inside_the_node():
    """With an index, the node equals the chain on x[index] (same draws, same gradients) and
    keeps x itself, not a gathered copy."""
    norm, lin, x = _norm_linear_and_rows()
    index = torch.tensor([29, 3, 3, 0, 17, 8])
    params = list(norm.parameters()) + list(lin.parameters())
    outs = []
    for f in (lambda: norm_dropout_linear(x, norm, lin, 0.2, True, index),
              lambda: lin(dropout(norm(x.index_select(0, index)), 0.2, True))):
        torch.manual_seed(5)
        y = f()
        outs.append((y, torch.autograd.grad((y * torch.arange(7.0)).sum(), params)))
    (y1, g1), (y2, g2) = outs
    assert y1.shape == (6, 7) and torch.allclose(y1, y2)
    assert all(torch.allclose(a, b) for a, b in zip(g1, g2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm_dropout_linear(x, norm, lin, 0.2, True, index)
    sizes = {tuple(t.shape) for t in saved}
    # the keep mask of the 6 gathered rows, as packed bits (6 * 40 / 8 bytes)
    assert (30, 40) in sizes and (30,) in {tuple(t.shape) for t in saved if t.dtype == torch.uint8}
    assert not any(t.shape == (6, 40) and t.dtype == torch.float64 for t in saved)


def test_softmax_dropout_matmul_equals_the_plain_ops_and_keeps_no_dropped_probabilities():
    """dropout(softmax(s)) @ v in one node: bit-identical output and gradients to the plain ops
    with the same seed, float64 gradcheck, and no saved float tensor besides probs and v."""
    torch.manual_seed(0)
    s = torch.randn(2, 3, 6, 6, requires_grad=True)
    v = torch.randn(2, 3, 6, 5, requires_grad=True)
    g = torch.randn(2, 3, 6, 5)
    res = []
    for f in (lambda: softmax_dropout_matmul(s, v, 0.3, True),
              lambda: torch.matmul(dropout(torch.softmax(s, -1), 0.3, True), v)):
        torch.manual_seed(9)
        out = f()
        res.append((out, *torch.autograd.grad(out, (s, v), g)))
    assert all(torch.equal(a, b) for a, b in zip(*res))
    assert (res[0][0] != torch.matmul(torch.softmax(s, -1), v)).any()  # dropout took place
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        softmax_dropout_matmul(s, v, 0.3, True)
    assert sorted(str(t.dtype) for t in saved) == ["torch.float32", "torch.float32", "torch.uint8"]
    assert [t.numel() for t in saved if t.dtype == torch.uint8] == [math.ceil(s.numel() / 8)]  # the mask's bits
    sd, vd = s.detach().double().requires_grad_(), v.detach().double().requires_grad_()

    def fixed_draw(a, b):
        torch.manual_seed(4)
        return softmax_dropout_matmul(a, b, 0.3, True)

    assert torch.autograd.gradcheck(fixed_draw, (sd, vd))
    assert torch.equal(softmax_dropout_matmul(s, v, 0.3, False), torch.matmul(torch.softmax(s, -1), v))


def test_branch_norm_ffn_is_the_plain_chain_and_keeps_only_the_norm():
    """LayerNorm -> (Linear -> ReLU -> Dropout -> Linear) as one node equals the plain chain
    with the same draw (y, the FFN output and every gradient, with gradients flowing into both
    outputs), passes a float64 gradcheck, and keeps neither y nor any (K, N, F) tensor."""
    torch.manual_seed(0)
    K, N, H, Fd = 3, 11, 6, 24
    x = torch.randn(K, N, H, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(K, H, dtype=torch.float64, requires_grad=True),
              torch.randn(K, H, dtype=torch.float64, requires_grad=True),
              torch.randn(K, Fd, H, dtype=torch.float64, requires_grad=True),
              torch.randn(K, Fd, dtype=torch.float64, requires_grad=True),
              torch.randn(K, H, Fd, dtype=torch.float64, requires_grad=True),
              torch.randn(K, H, dtype=torch.float64, requires_grad=True)]
    ln_w, ln_b, w_in, b_in, w_out, b_out = params
    g_y, g_f = torch.randn(K, N, H, dtype=torch.float64), torch.randn(K, N, H, dtype=torch.float64)

    def plain():
        y = torch.addcmul(ln_b.unsqueeze(1), F.layer_norm(x, (H,)), ln_w.unsqueeze(1))
        h = torch.relu(torch.baddbmm(b_in.unsqueeze(1), y, w_in.transpose(1, 2)))
        return y, torch.baddbmm(b_out.unsqueeze(1), dropout(h, 0.3, True), w_out.transpose(1, 2))

    res = []
    for f in (lambda: branch_norm_ffn(x, *params, 0.3, True), plain):
        torch.manual_seed(7)
        y, out = f()
        res.append((y, out, *torch.autograd.grad([y, out], [x, *params], [g_y, g_f])))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    torch.manual_seed(7)
    _, out = branch_norm_ffn(x, *params, 0.3, True)          # only the FFN output used
    torch.manual_seed(7)
    _, ref = plain()
    for a, b in zip(torch.autograd.grad(out, [x, *params], g_f), torch.autograd.grad(ref, [x, *params], g_f)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        branch_norm_ffn(x, *params, 0.3, True)
    assert [t.shape for t in saved].count((K, N, H)) == 1              # the normalised x only
    assert all(t.numel() < K * N * Fd for t in saved)
    # the dropout mask kept as bits (one byte per 8 entries, per chunk of branches), not re-drawn
    chunks = [min(kernels._FFN_CHUNK, K - a) for a in range(0, K, kernels._FFN_CHUNK)]
    assert sorted(t.numel() for t in saved if t.dtype == torch.uint8) == sorted(math.ceil(k * N * Fd / 8) for k in chunks)

    def fixed_draw(*a):
        torch.manual_seed(2)
        return branch_norm_ffn(*a, 0.3, True)

    assert torch.autograd.gradcheck(fixed_draw, (x, *params))


def test_norm_ffn_node_is_the_plain_modules():
    """The query encoder's LayerNorm + FFN through the one-branch node gives what its plain
    nn.LayerNorm / nn.Linear chain gives with the same dropout draw, values and gradients, and
    keeps no (N, F) hidden layer."""
    torch.manual_seed(0)
    N, H = 13, 8
    norm, ffn_in, ffn_out = nn.LayerNorm(H).double(), nn.Linear(H, 4 * H).double(), nn.Linear(4 * H, H).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    params = [x, norm.weight, norm.bias, ffn_in.weight, ffn_in.bias, ffn_out.weight, ffn_out.bias]
    g_y, g_f = torch.randn(N, H, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64)

    def plain():
        y = norm(x)
        return y, ffn_out(dropout(torch.relu(ffn_in(y)), 0.25, True))

    res = []
    for f in (lambda: norm_ffn(x, norm, ffn_in, ffn_out, 0.25, True), plain):
        torch.manual_seed(5)
        y, out = f()
        res.append((y, out, *torch.autograd.grad([y, out], params, [g_y, g_f])))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(res[0][1], norm_ffn(x, norm, ffn_in, ffn_out, 0.25, False)[1])  # dropout acted
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm_ffn(x, norm, ffn_in, ffn_out, 0.25, True)
    assert not [t for t in saved if t.shape[-2:] == (N, 4 * H)]        # no hidden layer kept


@pytest.fixture
def numpy_blas_on(monkeypatch):
    """numpy's OpenBLAS for every product (as configure_blas sets it in the train stage, any size)."""
    monkeypatch.setattr(kernels.SWITCHES, "numpy_blas", True)
    monkeypatch.setattr(kernels, "NUMPY_BLAS_MIN_FLOP", 0.0)


def test_numpy_blas_comes_from_the_setting_and_needs_short_waits_at_start_up(monkeypatch):
    x = torch.randn(3, 3)
    monkeypatch.setattr(kernels.SWITCHES, "numpy_blas", False)
    assert not kernels.numpy_blas_active(x)                        # the default: torch's BLAS
    for start_env, asked, chosen in (({}, True, False), ({"OPENBLAS_THREAD_TIMEOUT": "28"}, True, False),
                                     ({"OPENBLAS_THREAD_TIMEOUT": "4"}, False, False),
                                     ({"OPENBLAS_THREAD_TIMEOUT": "4"}, True, kernels._OPENBLAS.ready())):
        monkeypatch.setattr(procenv, "startup_env", lambda env=start_env: dict(env))
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")          # os.environ alone decides nothing
        note = kernels.configure_blas(asked)
        assert kernels.SWITCHES.numpy_blas is chosen and kernels.numpy_blas_active(x) is chosen, note
        assert ("OpenBLAS for" in note) is chosen
        if asked and not chosen and not start_env.get("OPENBLAS_THREAD_TIMEOUT") == "4":
            assert "without short OpenBLAS waits" in note
    assert procenv.THREAD_ENV["OPENBLAS_THREAD_TIMEOUT"] == "4"   # what the train stage sets
    monkeypatch.setattr(kernels.SWITCHES, "numpy_blas", True)
    seen = []
    monkeypatch.setattr(kernels.np, "matmul", lambda *a, **k: seen.append(1))
    kernels.matmul(x, x)                               # 54 FLOP: below NUMPY_BLAS_MIN_FLOP
    assert not seen


def test_startup_env_is_the_environment_the_process_started_with(monkeypatch):
    monkeypatch.setenv("PRVR_SET_LATER", "1")
    assert "PRVR_SET_LATER" not in procenv.startup_env()
    assert procenv.startup_env().get("PATH") == os.environ.get("PATH")


def test_matmul_is_torch_matmul_with_either_blas(numpy_blas_on):
    """kernels.matmul (numpy's OpenBLAS when found, torch's otherwise) gives the product of
    2-d and batched operands, transposed views included, with a broadcast bias, into `out`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, 6, dtype=torch.float64, generator=g)
    w = torch.randn(5, 4, 6, dtype=torch.float64, generator=g)    # used as w^T, a strided view
    bias = torch.randn(5, 1, 4, dtype=torch.float64, generator=g)
    want = torch.baddbmm(bias, a, w.transpose(1, 2))
    for numpy_blas in (True, False):
        with kernels.switches(numpy_blas=numpy_blas):
            out = torch.empty(5, 7, 4, dtype=torch.float64)
            got = kernels.matmul(a, w.transpose(1, 2), out=out, bias=bias)
            assert got.data_ptr() == out.data_ptr()
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
            x2, y2 = a[0].t(), torch.randn(7, 3, dtype=torch.float64, generator=g)
            assert torch.allclose(kernels.matmul(x2, y2), x2 @ y2, rtol=1e-12, atol=1e-12)
    with kernels.switches(numpy_blas=False):                       # off: torch's own kernels, bit for bit
        assert torch.equal(kernels.matmul(a, w.transpose(1, 2), bias=bias), want)


def test_numpy_blas_follows_torch_thread_count(numpy_blas_on):
    """Where numpy's OpenBLAS is used, its thread count is set to torch's before each use."""
    x = torch.randn(3, 3)
    if not kernels.numpy_blas_active(x):
        assert not kernels._OPENBLAS.ready()
        return
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        kernels.matmul(x, x)
        assert kernels._OPENBLAS.threads == 1
    finally:
        torch.set_num_threads(before)
    kernels.matmul(x, x)
    assert kernels._OPENBLAS.threads == before
    with kernels.switches(numpy_blas=False):
        assert not kernels.numpy_blas_active(x)


def test_linear_node_is_f_linear_and_gradchecks(numpy_blas_on):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    y = kernels.linear(x, w, b)
    assert torch.allclose(y, F.linear(x, w, b), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(kernels.linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda w_: kernels.linear(x.detach(), w_, None), (w,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.linear(x, w, b)
    assert sorted(tuple(t.shape) for t in saved) == [(4, 6), (9, 6)]   # x and the weight, as F.linear
