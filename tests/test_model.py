"""GMMFormer v2 network, on both backends: Gaussian geometry, padding invariance, dropout modes,
determinism, scores, optimiser groups, and a slow per-branch reference written straight from
docs/gmmformer_v2.md. The CPU backend's own switches and kernels are tested at the end."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from prvr.backends.cpu.kernels import SWITCHES, Tokens, add_dropout, cpu_kernels, dropout, relu_dropout_unscaled, switches
from prvr.methods import TrainOutput, VideoEncoding, get_method
from prvr.methods.gmmformer_v2.model import (GMMFormer, GMMFormerConfig, gaussian_matrix, pair_scores,
                                             release_chunks)
from prvr.methods.gmmformer_v2.release import release_layout, to_release_state_dict

SMALL = dict(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20, n_clips=5)


BACKENDS = ("reference", "cpu")


def small_model(seed: int = 0, backend: str = "reference", **kw) -> GMMFormer:
    torch.manual_seed(seed)
    model = get_method("gmmformer_v2").build_model(GMMFormerConfig(**{**SMALL, **kw}), backend)
    with torch.no_grad():  # move norms/biases off their (1, 0) init so every tensor matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_inputs(cfg: GMMFormerConfig, frame_lens, query_lens, seed: int = 1, pad_to: int | None = None):
    g = torch.Generator().manual_seed(seed)
    B, Nq = len(frame_lens), len(query_lens)
    Lf = pad_to or max(frame_lens)
    Lq = max(query_lens)
    fmask = torch.arange(Lf)[None] < torch.tensor(frame_lens)[:, None]
    qmask = torch.arange(Lq)[None] < torch.tensor(query_lens)[:, None]
    return {
        "clip_feats": torch.randn(B, cfg.n_clips, cfg.visual_dim, generator=g),
        "frame_feats": torch.randn(B, Lf, cfg.visual_dim, generator=g) * fmask[..., None],
        "frame_mask": fmask,
        "query_feats": torch.randn(Nq, Lq, cfg.text_dim, generator=g) * qmask[..., None],
        "query_mask": qmask,
        "query_labels": torch.arange(Nq) % B,
    }


# ----------------------------------------------------------------------------- Gaussian matrices

def test_gaussian_matrix_matches_hand_computation():
    L, width = 4, 1.0
    sigma = 1.0 / 9
    pos = [0.0, 1 / 3, 2 / 3, 1.0]
    for i in range(L):
        centre = i / L
        dens = [math.exp(-(p - centre) ** 2 / (2 * sigma ** 2)) for p in pos]
        expected = [d / max(dens) for d in dens]
        assert gaussian_matrix(L, width)[i].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-300)
    # row 1: centre 0.25, nearest column 1/3 is the maximum
    assert gaussian_matrix(L, width)[1, 1].item() == 1.0
    assert gaussian_matrix(L, width)[1, 0].item() == pytest.approx(math.exp(-(0.25 ** 2 - (1 / 12) ** 2) * 40.5))


def test_gaussian_matrix_plain_branch_and_width_floor():
    assert torch.equal(gaussian_matrix(5, None), torch.ones(5, 5))
    assert torch.equal(gaussian_matrix(6, 0.001), gaussian_matrix(6, 0.01))  # sigma floored at 0.01 / 9
    assert not torch.equal(gaussian_matrix(6, 0.05), gaussian_matrix(6, 0.01))
    assert gaussian_matrix(128, 0.1).max(dim=1).values.eq(1).all()
    # all densities of a row underflow for L=2 and the narrowest width: still finite
    assert torch.isfinite(gaussian_matrix(2, 0.01)).all()


def test_frame_stream_uses_corner_of_max_frames_matrix():
    model = small_model()
    g = model.frame_consolidation.branches.gauss
    assert g.shape == (8, 20, 20)
    for k, w in enumerate(model.cfg.widths):
        assert torch.allclose(g[k], gaussian_matrix(20, w).float())
    assert model.clip_consolidation.branches.gauss.shape == (8, 5, 5)
    assert "gauss" not in "".join(model.state_dict())  # buffers are derived, not saved


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_changes_results(backend):
    model = small_model(backend=backend).eval()
    cfg = model.cfg
    a = make_inputs(cfg, [3, 9], [4, 2, 7])
    # b: the same videos padded to 17 slots; padded slots hold garbage that must be ignored
    b = {"frame_feats": torch.cat([a["frame_feats"], torch.full((2, 8, cfg.visual_dim), 5.0)], 1),
         "frame_mask": torch.cat([a["frame_mask"], torch.zeros(2, 8, dtype=torch.bool)], 1)}
    b["frame_feats"][0, 3:9] = -3.0
    a["frame_feats"][0, 3:] = 7.0
    qb = torch.cat([a["query_feats"], torch.full((3, 4, cfg.text_dim), 9.0)], 1)
    qmb = torch.cat([a["query_mask"], torch.zeros(3, 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        ca, fa, _ = model.encode_video_feats(a["clip_feats"], a["frame_feats"], a["frame_mask"])
        cb, fb, mb = model.encode_video_feats(a["clip_feats"], b["frame_feats"], b["frame_mask"])
        qa = model.encode_query_feats(a["query_feats"], a["query_mask"])
        qb = model.encode_query_feats(qb, qmb)
    assert fb.shape == (2, 17, 8) and mb.shape == (2, 17)
    assert torch.allclose(ca, cb, atol=1e-6)
    assert torch.allclose(fa, fb[:, :9], atol=1e-6)
    assert fb[:, 9:].abs().max() == 0 and fb[0, 3:].abs().max() == 0 and fa[0, 3:].abs().max() == 0
    assert torch.allclose(qa, qb, atol=1e-6)
    for x, y in zip(pair_scores(qa, ca, fa, a["frame_mask"], 20), pair_scores(qb, cb, fb, mb, 20)):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_alone_equals_video_in_batch_with_longer_one(backend):
    model = small_model(backend=backend).eval()
    cfg = model.cfg
    batch = make_inputs(cfg, [6, 20, 1], [3])
    with torch.no_grad():
        c_all, f_all, _ = model.encode_video_feats(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"])
        for i, n in enumerate([6, 20, 1]):
            c1, f1, _ = model.encode_video_feats(batch["clip_feats"][i:i + 1], batch["frame_feats"][i:i + 1, :n],
                                             batch["frame_mask"][i:i + 1, :n])
            assert torch.allclose(c1[0], c_all[i], atol=1e-6)
            assert torch.allclose(f1[0], f_all[i, :n], atol=1e-6)
        q_all = model.encode_query_feats(batch["query_feats"], batch["query_mask"])
        q_one = model.encode_query_feats(batch["query_feats"][:1], batch["query_mask"][:1])
    assert q_one.shape == (1, 8) and torch.allclose(q_one[0], q_all[0], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_masks_are_accepted(backend):
    model = small_model(backend=backend).eval()
    batch = make_inputs(model.cfg, [4, 11], [2, 5])
    with torch.no_grad():
        out_bool = model(batch)
        out_float = model({**batch, "frame_mask": batch["frame_mask"].float(),
                           "query_mask": batch["query_mask"].float()})
    assert out_float.videos.seq_mask.dtype == torch.bool
    assert torch.equal(out_bool.scores["frame"], out_float.scores["frame"])
    assert torch.equal(out_bool.queries["query"], out_float.queries["query"])


def test_more_frames_than_max_frames_is_an_error():
    model = small_model().eval()
    batch = make_inputs(model.cfg, [21], [2])
    with pytest.raises(ValueError, match="at most 20"):
        model.encode_video_feats(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_reaches_padded_frames(backend):
    model = small_model(backend=backend).train()
    batch = make_inputs(model.cfg, [5, 12], [3, 4])
    frames = batch["frame_feats"].requires_grad_(True)
    # hidden 8: about one dropout draw in 50 zeroes a whole frame vector; seed one that does not
    torch.manual_seed(0)
    out = model({**batch, "frame_feats": frames})
    (out.scores["frame"].sum() + out.scores["frame_raw"].sum() + out.scores["clip"].sum()).backward()
    assert frames.grad[0, 5:].abs().max() == 0
    assert frames.grad[0, :5].abs().max() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- modes and seeds

@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_is_deterministic_and_train_uses_dropout(backend):
    model = small_model(backend=backend)
    batch = make_inputs(model.cfg, [7, 13], [3, 6, 2])
    model.eval()
    with torch.no_grad():
        e1, e2 = model(batch), model(batch)
    assert torch.equal(e1.scores["clip"], e2.scores["clip"]) and torch.equal(e1.videos.seq, e2.videos.seq)
    model.train()
    with torch.no_grad():
        t1, t2 = model(batch), model(batch)
    assert not torch.allclose(t1.videos.seq, t2.videos.seq)
    assert not torch.allclose(t1.queries["query"], e1.queries["query"])
    # with every dropout rate at 0, train mode computes exactly the eval function
    nodrop = small_model(input_drop=0.0, drop=0.0, backend=backend).train()
    with torch.no_grad():
        a = nodrop(batch)
        nodrop.eval()
        b = nodrop(batch)
    assert torch.allclose(a.scores["frame"], b.scores["frame"], atol=1e-6)



@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_encodes_queries_a_second_time_for_qdl_and_oml(backend):
    """The release feeds its query-diverse and matching losses a second query encoding
    with its own dropout draw; in eval there is no second encoding."""
    from prvr.methods.gmmformer_v2.loss import GMMFormerLoss, _loss_query

    model = small_model(backend=backend)
    batch = make_inputs(model.cfg, [7, 13], [3, 6, 2, 4])
    model.eval()
    with torch.no_grad():
        assert set(model(batch).queries) == {"query"}
    model.train()
    torch.manual_seed(3)
    out = model(batch)
    query, aux = out.queries["query"], out.queries["query_aux"]
    assert aux.shape == query.shape
    assert not torch.allclose(aux, query)  # an independent dropout draw
    assert _loss_query(out) is aux
    # QDL/OML follow the second encoding: their gradient reaches it, not the scoring one
    cfg = GMMFormerConfig(**{**SMALL, "clip_nce": 0.0, "frame_nce": 0.0, "qdl": 1.0, "oml": 1.0})
    terms = GMMFormerLoss(cfg)(out, batch["query_labels"], hard_negatives=False)
    g_aux, g_q = torch.autograd.grad(terms["qdl"] + terms["oml"], [aux, query], allow_unused=True)
    assert g_aux is not None and g_aux.abs().sum() > 0 and g_q is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_is_deterministic_for_a_seed(backend):
    def run():
        model = small_model(seed=3, backend=backend).train()
        batch = make_inputs(model.cfg, [4, 16, 9], [2, 7, 5, 3])
        torch.manual_seed(11)
        out = model(batch)
        (out.scores["clip_raw"].sum() + out.scores["frame"].sum() + out.queries["query"].sum()).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    (o1, g1), (o2, g2) = run(), run()
    assert torch.equal(o1.videos.seq, o2.videos.seq) and torch.equal(o1.queries["query"], o2.queries["query"])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_dropout_rate_and_scale():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x, 0.2, True)
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.004)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1.25, rel=1e-5)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    assert dropout(x, 0.2, False) is x
    x = torch.randn(3, 5, requires_grad=True)
    y = dropout(x, 0.5, True)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() * 2.0)
    # relu=True is dropout(relu(x)): zero where x <= 0, 2x or 0 elsewhere, same mask in backward
    x = torch.randn(1000, requires_grad=True)
    y = dropout(x, 0.5, True, relu=True)
    y.sum().backward()
    assert (y[x <= 0] == 0).all()
    kept = y != 0
    assert torch.equal(y[kept], 2.0 * x[kept])
    assert 0.4 < kept[x > 0].float().mean().item() < 0.6
    assert torch.equal(x.grad, kept.float() * 2.0)
    assert torch.equal(dropout(x, 0.5, False, relu=True), torch.relu(x))


# ----------------------------------------------------------------------------- kernel switches

def _encodings(model, batch):
    with torch.no_grad():
        out = model(batch)
        scored = model.score(out.queries["query"], out.videos)
    return [out.queries["query"], out.videos.fixed["clips"], out.videos.seq, *out.scores.values(),
            *scored.values()]


def test_portable_switch_gives_the_cpu_kernel_eval_scores():
    """switches(portable=True) runs the code path of every other device on CPU; in eval
    both paths compute the same function, bit for bit."""
    model = small_model(seed=4, backend="cpu").eval()
    batch = make_inputs(model.cfg, [6, 20, 3, 11], [5, 2, 7], seed=5)
    cpu = _encodings(model, batch)
    with switches(portable=True) as sw:
        assert sw.portable and not cpu_kernels(torch.zeros(1))
        portable = _encodings(model, batch)
    assert not SWITCHES.portable and cpu_kernels(torch.zeros(1))  # restored after the block
    assert all(torch.equal(a, b) for a, b in zip(cpu, portable))
    with pytest.raises(AttributeError, match="unknown kernel switch 'fast'"):
        with switches(fast=True):
            pass


def test_portable_switch_routes_training_dropout_through_f_dropout(monkeypatch):
    """In training the portable path draws every mask with F.dropout, the CPU path never does
    (it draws its own keep masks); both train deterministically for a seed."""
    import prvr.backends.cpu.kernels as kernels

    calls = {"F.dropout": 0, "keep_mask": 0}
    f_dropout, keep_mask = F.dropout, kernels._keep_mask

    def counting_dropout(*a, **k):
        calls["F.dropout"] += 1
        return f_dropout(*a, **k)

    def counting_keep_mask(*a, **k):
        calls["keep_mask"] += 1
        return keep_mask(*a, **k)

    monkeypatch.setattr(kernels.F, "dropout", counting_dropout)
    monkeypatch.setattr(kernels, "_keep_mask", counting_keep_mask)

    def step(portable: bool):
        model = small_model(seed=3, backend="cpu").train()
        batch = make_inputs(model.cfg, [4, 16, 9], [2, 7, 5, 3])
        torch.manual_seed(11)
        with switches(portable=portable):
            out = model(batch)
            (out.scores["clip_raw"].sum() + out.scores["frame"].sum() + out.queries["query"].sum()).backward()
        return out.videos.seq.detach(), [p.grad.clone() for p in model.parameters()]

    for portable in (True, False):
        calls.update({"F.dropout": 0, "keep_mask": 0})
        (f1, g1), (f2, g2) = step(portable), step(portable)
        used, unused = ("F.dropout", "keep_mask") if portable else ("keep_mask", "F.dropout")
        assert calls[used] > 0 and calls[unused] == 0, calls
        assert torch.equal(f1, f2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
        assert all(torch.isfinite(g).all() for g in g1)


def _kernel_output(kind: str, x: Tensor, p: float) -> Tensor:
    """dropout as each kernel computes it (the keep scale applied), for x > 0."""
    if kind == "dropout":
        return dropout(x, p, True)
    if kind == "relu_dropout":
        return dropout(x, p, True, relu=True)
    if kind == "relu_dropout_unscaled":
        h, scale = relu_dropout_unscaled(x * 1.0, p, True)  # a fresh tensor: it is overwritten
        return h * scale
    return add_dropout(torch.zeros_like(x), x, p, True)


@pytest.mark.parametrize("kind", ["dropout", "relu_dropout", "relu_dropout_unscaled", "add_dropout"])
def test_cpu_dropout_keeps_the_rate_and_scale_of_f_dropout(kind):
    """Each CPU dropout kernel drops a share p of its entries and scales the kept ones by
    1 / (1 - p), as F.dropout (the portable path) does; the backward is the same mask.
    n = 2^20 draws: one binomial sigma of the drop share is 4e-4, the tolerance 10 sigma
    (and the seed is fixed), so the check cannot flake."""
    p, n = 0.2, 2 ** 20
    tol = 10 * math.sqrt(p * (1 - p) / n)
    scale = 1.0 / (1.0 - p)
    results = {}
    for portable in (False, True):
        torch.manual_seed(0)
        x = torch.ones(n, requires_grad=True)
        with switches(portable=portable):
            y = _kernel_output(kind, x, p)
        y.sum().backward()
        kept = y.detach() != 0
        values = torch.unique(y.detach()[kept])
        assert abs(1.0 - kept.float().mean().item() - p) < tol
        assert torch.equal(x.grad, y.detach())  # d y / d x = keep * scale, the forward's mask
        results[portable] = values
    ref = results[True]  # F.dropout
    assert ref.numel() == 1 and ref.item() == pytest.approx(1.0 / (1.0 - p), rel=1e-6)
    assert results[False].numel() == 1 and results[False].item() == pytest.approx(scale, rel=1e-6)
    assert results[False].item() == pytest.approx(ref.item(), rel=1e-5)


def test_cpu_relu_dropout_zeroes_negatives_like_relu_then_f_dropout():
    torch.manual_seed(1)
    x = torch.randn(2 ** 16)
    for kind in ("relu_dropout", "relu_dropout_unscaled"):
        for portable in (False, True):
            with switches(portable=portable):
                y = _kernel_output(kind, x.clone(), 0.5)
            assert (y[x <= 0] == 0).all()
            kept = y != 0
            assert torch.allclose(y[kept], 2.0 * x[kept])
            assert abs(kept[x > 0].float().mean().item() - 0.5) < 10 * math.sqrt(0.25 / int((x > 0).sum()))


# ----------------------------------------------------------------------------- scores

def test_pair_scores_include_zero_for_short_videos_only():
    H = 4
    query = torch.tensor([[1.0, 0, 0, 0]])
    clips = torch.tensor([[[0.0, 1, 0, 0], [-1.0, 0, 0, 0]]]).repeat(2, 1, 1)  # cosines 0 and -1
    frames = torch.zeros(2, 3, H)
    frames[:, :, 0] = -2.0  # every real frame has cosine -1, dot -2
    mask = torch.tensor([[True, True, True], [True, True, False]])
    frames[1, 2] = 0.0
    clip, clip_raw, frame, frame_raw = pair_scores(query, clips, frames, mask, max_frames=3)
    assert clip.tolist() == [[0.0, 0.0]] and clip_raw.tolist() == [[0.0, 0.0]]
    # video 0 has all 3 of max_frames real: no zero candidate; video 1 is short: 0 wins
    assert frame.tolist() == [[-1.0, 0.0]] and frame_raw.tolist() == [[-2.0, 0.0]]
    # with max_frames 128 both videos are short
    assert pair_scores(query, clips, frames, mask)[2].tolist() == [[0.0, 0.0]]
    model = GMMFormer(GMMFormerConfig(**{**SMALL, "max_frames": 3, "n_clips": 2}))
    got = model.score(query, VideoEncoding({"clips": clips}, frames, mask))
    assert set(got) == {"score", "clip", "frame"}
    assert torch.equal(got["clip"], clip) and torch.equal(got["frame"], frame)
    assert torch.allclose(got["score"], 0.7 * clip + 0.3 * frame)
    assert got["score"][0].tolist() == pytest.approx([-0.3, 0.0])


def test_pair_scores_without_the_dot_products_give_the_same_cosines():
    # score() (evaluation, search) skips the dot products that only training's losses read
    g = torch.Generator().manual_seed(0)
    query, clips, frames = torch.randn(5, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
    frames = frames * mask[..., None]
    full, lean = pair_scores(query, clips, frames, mask, 6), pair_scores(query, clips, frames, mask, 6, raw=False)
    assert lean[1] is None and lean[3] is None
    assert torch.equal(lean[0], full[0]) and torch.equal(lean[2], full[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_returns_train_output_of_contract_shapes(backend):
    model = small_model(backend=backend).eval()
    batch = make_inputs(model.cfg, [4, 9, 2], [3, 6, 2, 7])
    with torch.no_grad():
        out = model(batch)
        videos = model.encode_videos(batch)
        query = model.encode_queries(batch)
    assert isinstance(out, TrainOutput) and isinstance(out.videos, VideoEncoding)
    assert out.queries["query"].shape == (4, 8) and out.videos.fixed["clips"].shape == (3, 5, 8)
    assert out.videos.seq.shape == (3, 9, 8) and out.videos.seq_mask.shape == (3, 9) and len(out.videos) == 3
    assert set(out.scores) == {"clip", "clip_raw", "frame", "frame_raw"}
    for s in out.scores.values():
        assert s.shape == (4, 3)
    assert (out.scores["clip"].abs() <= 1 + 1e-6).all()
    # the contract's encoders give the same tensors as the training forward (eval mode)
    assert torch.equal(query, out.queries["query"])
    assert torch.equal(videos.fixed["clips"], out.videos.fixed["clips"]) and torch.equal(videos.seq, out.videos.seq)
    assert torch.equal(videos.seq_mask, batch["frame_mask"])
    # train_scores rebuilds the forward's scores from (e.g. gathered) encodings
    again = model.train_scores(out.queries, out.videos)
    assert all(torch.equal(again[k], out.scores[k]) for k in out.scores)
    scored = model.score(query, videos)
    assert torch.equal(scored["clip"], out.scores["clip"]) and torch.equal(scored["frame"], out.scores["frame"])


# ----------------------------------------------------------------------------- optimiser groups

def test_param_groups_follow_release_decay_rule():
    model = small_model()
    decay, no_decay = get_method("gmmformer_v2").param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert d.isdisjoint(nd) and d | nd == set(names.values())
    assert all(n.endswith("bias") or n.split(".")[0].endswith(("_proj", "_pos")) for n in nd)
    for n in ("query_proj.norm.weight", "frame_pos.norm.weight", "clip_proj.linear.bias",
              "frame_consolidation.branches.norm1_bias", "query_layer.qkv.bias"):
        assert n in nd
    for n in ("query_layer.norm1.weight", "frame_consolidation.branches.norm2_weight",
              "clip_consolidation.token_attention.norm1.weight", "weight_token", "query_pool.weight",
              "frame_pos.embedding.weight", "clip_consolidation.branches.qkv_weight"):
        assert n in d


def test_release_chunks_count_release_tensors():
    """An optimiser clipping each release tensor separately relies on these counts."""
    model = small_model()
    assert sum(release_chunks(p) for p in model.parameters()) == len(release_layout(model.cfg))
    for p in model.parameters():
        assert p.numel() % release_chunks(p) == 0


# ----------------------------------------------------------------------------- golden

# Frozen from this implementation once it matched the per-branch reference below and the
# public release (max abs diff 4e-6); any change to the computed function shows up here.
GOLDEN_CLIP = [[0.345212, 0.201922], [0.463899, 0.699998], [0.311213, 0.746225]]
GOLDEN_FRAME = [[0.823448, 0.861951], [0.527217, 0.710894], [0.699359, 0.709712]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_scores(backend):
    model = small_model(seed=5, backend=backend).eval()
    batch = make_inputs(model.cfg, [6, 14], [5, 3, 7], seed=6)
    with torch.no_grad():
        out = model(batch)
    assert torch.allclose(out.scores["clip"], torch.tensor(GOLDEN_CLIP), rtol=0, atol=1e-5)
    assert torch.allclose(out.scores["frame"], torch.tensor(GOLDEN_FRAME), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- slow reference

def _lin(x, P, name, bias=True):
    return x @ P[name + ".weight"].T + (P[name + ".bias"] if bias else 0)


def _ln(x, P, name):
    return F.layer_norm(x, x.shape[-1:], P[name + ".weight"], P[name + ".bias"])


def _ref_gauss(L, width):
    sigma = max(width, 0.01) / 9
    G = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        row = [math.exp(-((j / (L - 1) if L > 1 else 0.0) - i / L) ** 2 / (2 * sigma ** 2)) for j in range(L)]
        G[i] = torch.tensor(row, dtype=torch.float64) / max(row)
    return G.float()


def _ref_attention(q_in, kv_in, mask, P, prefix, n_heads, width=None):
    """One post-norm attention layer of the spec (queries q_in, keys/values kv_in)."""
    B, Lq, H = q_in.shape
    dh = H // n_heads

    def heads(x):
        return x.view(B, -1, n_heads, dh).transpose(1, 2)
    q, k, v = (heads(_lin(x, P, f"{prefix}.self.{n}")) for x, n in ((q_in, "query"), (kv_in, "key"), (kv_in, "value")))
    s = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if width is not None:
        s = s * _ref_gauss(s.shape[-1], width)
    s = s + (1 - mask)[:, None, None, :] * -10000.0
    ctx = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, Lq, H)
    x = _ln(q_in + ctx, P, f"{prefix}.norm1")
    return _ln(x + _lin(torch.relu(_lin(x, P, f"{prefix}.output.layer1")), P, f"{prefix}.output.layer2"),
               P, f"{prefix}.norm2")


def _ref_stream(feats, mask, P, proj, pos, block, cfg):
    x = torch.relu(_lin(_ln(feats, P, f"{proj}.LayerNorm"), P, f"{proj}.net.1"))
    x = _ln(x + P[f"{pos}.position_embeddings.weight"][: x.shape[1]], P, f"{pos}.LayerNorm")
    outs = [_ref_attention(x, x, mask, P, f"{block}.attn{k}", cfg.n_heads, w) for k, w in enumerate(cfg.widths)]
    token = P["weight_token"].expand(x.shape[0], 1, -1)
    t = torch.cat([_ref_attention(token, o, mask, P, f"{block}.ca", cfg.n_heads) for o in outs], 1)  # (B, 8, H)
    logits = _lin(torch.relu(_lin(t, P, f"{block}.layer1")), P, f"{block}.layer2")  # (B, 8, L)
    w = torch.softmax(logits.transpose(1, 2) / cfg.sft_factor, -1)  # (B, L, 8)
    return sum(w[..., k:k + 1] * o for k, o in enumerate(outs))


def _reference(model, batch):
    """Slow per-branch forward of the spec: (query, clips, frames padded to max_frames)."""
    cfg = model.cfg
    P = to_release_state_dict(model.state_dict(), cfg)
    B, Lf = batch["frame_mask"].shape
    # frames padded to max_frames, full 128-style geometry, every branch on every slot
    frames = torch.cat([batch["frame_feats"],
                        batch["frame_feats"].new_zeros(B, cfg.max_frames - Lf, cfg.visual_dim)], 1)
    fmask = torch.zeros(B, cfg.max_frames, dtype=frames.dtype)
    fmask[:, :Lf] = batch["frame_mask"].to(frames.dtype)
    ref_frames = _ref_stream(frames, fmask, P, "frame_input_proj", "frame_pos_embed", "frame_encoder_1", cfg)
    ref_frames = ref_frames * fmask[..., None]
    ref_clips = _ref_stream(batch["clip_feats"], torch.ones(B, cfg.n_clips, dtype=frames.dtype), P,
                            "clip_input_proj", "clip_pos_embed", "clip_encoder", cfg)
    qm = batch["query_mask"].to(frames.dtype)
    x = torch.relu(_lin(_ln(batch["query_feats"], P, "query_input_proj.LayerNorm"), P, "query_input_proj.net.1"))
    x = _ln(x + P["query_pos_embed.position_embeddings.weight"][: x.shape[1]], P, "query_pos_embed.LayerNorm")
    x = _ref_attention(x, x, qm, P, "query_encoder", cfg.n_heads)
    a = _lin(x, P, "modular_vector_mapping", bias=False).squeeze(-1)
    a = torch.softmax(a * qm + (1 - qm) * -1e10, 1)
    return (a[..., None] * x).sum(1), ref_clips, ref_frames


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_model_matches_per_branch_reference(backend):
    model = small_model(seed=2, backend=backend).eval()
    batch = make_inputs(model.cfg, [7, 20, 2], [4, 7, 1], seed=4)
    Lf = batch["frame_mask"].shape[1]
    ref_query, ref_clips, ref_frames = _reference(model, batch)
    with torch.no_grad():
        out = model(batch)
    assert torch.allclose(out.videos.fixed["clips"], ref_clips, atol=1e-5)
    assert torch.allclose(out.videos.seq, ref_frames[:, :Lf], atol=1e-5)
    assert torch.allclose(out.queries["query"], ref_query, atol=1e-5)
    qn, cn, fn = (F.normalize(t, dim=-1) for t in (ref_query, ref_clips, ref_frames))
    ref_clip_scores = torch.einsum("qh,bch->qbc", qn, cn).amax(-1)
    ref_frame_scores = torch.einsum("qh,bfh->qbf", qn, fn).amax(-1)  # the padded zeros take part
    assert torch.allclose(out.scores["clip"], ref_clip_scores, atol=1e-5)
    assert torch.allclose(out.scores["frame"], ref_frame_scores, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_per_branch_reference(backend):
    """The backward pass (packing, scatter/gather, batched branches) against autograd
    through the slow reference, in float64."""
    model = small_model(seed=7, backend=backend).double().eval()
    batch = make_inputs(model.cfg, [5, 13, 9], [3, 6, 2], seed=8)
    g = torch.Generator().manual_seed(9)
    wq, wc, wf = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (3, 5, 20))
    grads = []
    for fn in ("ours", "reference"):
        inputs = {k: v.double().requires_grad_(True) if v.is_floating_point() else v for k, v in batch.items()}
        if fn == "ours":
            out = model(inputs)
            q, c, f = out.queries["query"], out.videos.fixed["clips"], out.videos.seq
        else:
            q, c, f = _reference(model, inputs)
            f = f[:, :13]
        loss = (q * wq).sum() + (c * wc[None]).sum() + (f * wf[None, :13]).sum()
        loss.backward()
        grads.append([inputs[k].grad for k in ("frame_feats", "clip_feats", "query_feats")])
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-7)
    assert grads[0][0][0, 5:].abs().max() == 0  # padded frames get nothing


def test_scatter_heads_gradcheck():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    tokens = Tokens(mask, 2, 3, torch.device("cpu"))
    x = torch.randn(tokens.count, 2 * 3 * 4, dtype=torch.float64, requires_grad=True)

    def f(x):
        q, k, v = tokens.qkv_heads(x, 2, 2)
        return q * 1.0, k * 2.0, v * 3.0

    assert torch.autograd.gradcheck(f, (x,))
    q, k, v = tokens.qkv_heads(x, 2, 2)
    assert q.shape == (2, 2, 2, 3, 2) and q.is_contiguous() and k[:, 0, :, 2].abs().max() == 0


def test_bertadam_clips_each_release_tensor_of_a_fused_parameter():
    """The release clips every one of its tensors to norm 1; our stacked/fused parameters
    carry `release_chunks` so BertAdam clips the same blocks."""
    from prvr.optim import BertAdam

    model = small_model()
    branches = model.frame_consolidation.branches
    H = model.cfg.hidden_size
    opt = BertAdam([branches.qkv_weight], lr=1.0, warmup=-1, t_total=-1, max_grad_norm=1.0, weight_decay=0.0)
    grad = torch.zeros_like(branches.qkv_weight)
    grad[3, H:2 * H] = 10.0   # branch 3 key: clipped to norm 1
    grad[5, :H] = 1e-3        # branch 5 query: small, untouched
    branches.qkv_weight.grad = grad.clone()
    opt.step()
    clipped = branches.qkv_weight.grad
    assert clipped[3, H:2 * H].norm().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(clipped[5, :H], torch.full((H, H), 1e-3))
