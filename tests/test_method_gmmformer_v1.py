"""GMMFormer v1 as a method: release layout, Gaussian-window attention, loss, batch dependence,
release checkpoints, determinism. Small sizes; no fetched release needed."""
from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from prvr.methods import get_method
from prvr.methods.gmmformer_v1.model import MASK_ADD
from prvr.methods.gmmformer_v1.release import (RELEASE_GLOBALS, convert_release_state_dict, release_layout,
                                               to_release_state_dict)

ROOT = Path(__file__).resolve().parents[1]
M = get_method("gmmformer_v1")
DATA = {"visual_dim": 24, "text_dim": 12}


def small_cfg(**kw):
    return M.config({"hidden_size": 16, "n_heads": 2, **kw}, DATA)


def video_batch(lengths, dv=24, seed=0, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    L = pad_to or max(lengths)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return {"clip_feats": torch.randn(len(lengths), 32, dv, generator=g),
            "frame_feats": torch.randn(len(lengths), L, dv, generator=g) * mask[..., None], "frame_mask": mask}


def train_batch(n_caps=(2, 1, 3, 2), lengths=(7, 3, 9, 5), seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(len(n_caps)).repeat_interleave(torch.tensor(n_caps))
    qlen = torch.randint(2, 7, (len(labels),), generator=g)
    qmask = torch.arange(6)[None] < qlen[:, None]
    return {**video_batch(list(lengths), seed=seed), "query_feats": torch.randn(len(labels), 6, 12, generator=g),
            "query_mask": qmask, "query_labels": labels}


# ----------------------------------------------------------------------------- release layout

def test_release_layout_round_trip_and_names():
    cfg = small_cfg()
    layout = dict(release_layout(cfg))
    # what the release's modules register (3 position tables, 3 input projections, the query
    # BertAttention, 4 GMM blocks x 4 BertAttentions, 2 pooling vectors)
    assert len(layout) == 9 + 12 + 10 + 4 * 4 * 10 + 2
    assert layout["query_input_proj.net.1.weight"] == (16, 12)
    assert layout["clip_pos_embed.position_embeddings.weight"] == (128, 16)
    assert layout["frame_encoder_2.attn3.output.LayerNorm.bias"] == (16,)
    assert layout["clip_encoder_2.attn0.self.value.weight"] == (16, 16)
    assert layout["modular_vector_mapping_2.weight"] == (1, 16)
    g = torch.Generator().manual_seed(0)
    release = {n: torch.randn(s, generator=g) for n, s in layout.items()}
    ours = convert_release_state_dict(release, cfg)
    model = M.build_model(cfg)
    model.load_state_dict(ours)  # every one of our tensors, right shapes
    # fused q/k/v: branch 1's key weight is rows H..2H of branch 1
    assert torch.equal(ours["frame_block1.attn.qkv_weight"][1, 16:32], release["frame_encoder_1.attn1.self.key.weight"])
    back = to_release_state_dict(ours, cfg)
    assert list(back) == list(layout)
    assert all(torch.equal(back[n], release[n]) for n in layout)
    wrapped = {f"module.{n}": t for n, t in release.items()}  # DataParallel-saved
    assert all(torch.equal(convert_release_state_dict(wrapped, cfg)[k], v) for k, v in ours.items())


def test_param_groups_follow_release_decay_rule():
    from prvr.methods.gmmformer_v1.release import _groups

    cfg = small_cfg()
    model = M.build_model(cfg)
    groups = M.param_groups(model, 0.01)
    no_decay = {id(p) for p in groups[1]["params"]}
    params = dict(model.named_parameters())
    release_rule = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    for ours, names in _groups(cfg):
        release_no_decay = {any(nd in n for nd in release_rule) for n in names}
        assert release_no_decay == {id(params[ours]) in no_decay}, ours
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- Gaussian-window attention

def reference_window(L, width):
    """The release's window, written out: row i is N(p_j; i/L, (width/9)^2) / row max."""
    pos = torch.linspace(0, 1, L, dtype=torch.float64)
    rows = []
    for i in range(L):
        sigma = max(width, 0.01) / 9
        dens = 0.3989422804014327 / sigma * torch.exp(-(pos - i / L) ** 2 / (2 * sigma ** 2))
        rows.append(dens / dens.max())
    return torch.stack(rows)


def embed(pos, proj, x):
    """Input projection and position embedding of one sequence (l, D) in eval mode, written out
    from the modules' parameters (either backend's modules)."""
    h = F.layer_norm(x, x.shape[-1:], proj.norm.weight, proj.norm.bias)
    h = F.relu(F.linear(h, proj.linear.weight, proj.linear.bias))
    return F.layer_norm(h + pos.embedding.weight[: x.shape[0]], h.shape[-1:], pos.norm.weight, pos.norm.bias)


def reference_block(block, x, length, window_len):
    """One GMM block on one video (x (l, H), first `length` rows real), branch by branch."""
    a = block.attn
    H, nh = x.shape[-1], a.n_heads
    dh = H // nh
    outs = []
    for k, w in enumerate(block.widths):
        Wq, Wk, Wv = a.qkv_weight[k].split(H)
        bq, bk, bv = a.qkv_bias[k].split(H)
        q, kk, v = x @ Wq.t() + bq, x @ Wk.t() + bk, x @ Wv.t() + bv
        ctx = torch.zeros_like(x)
        for h in range(nh):
            sl = slice(h * dh, (h + 1) * dh)
            s = q[:, sl] @ kk[:, sl].t() / math.sqrt(dh)
            if w is not None:
                s = s * reference_window(window_len, w)[:x.shape[0], :x.shape[0]].float()
            s = s + torch.where(torch.arange(x.shape[0]) < length, 0.0, MASK_ADD)[None]
            ctx[:, sl] = torch.softmax(s, -1) @ v[:, sl]
        y = ctx @ a.out_weight[k].t() + a.out_bias[k] + x
        outs.append(F.layer_norm(y, (H,), a.norm_weight[k], a.norm_bias[k]))
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_frame_encoder_matches_per_video_loop(own, backend):
    torch.manual_seed(0)
    model = M.build_model(small_cfg(own_length_windows=own), backend).eval()
    lengths = [5, 9, 2, 9, 1, 6]
    b = video_batch(lengths, pad_to=11)
    with torch.no_grad():
        got = model.encode_frames(b["frame_feats"], b["frame_mask"])
        for i, n in enumerate(lengths):
            pos = torch.arange(n)
            x = embed(model.frame_pos, model.frame_proj, b["frame_feats"][i, :n])
            window_len = n if own else max(lengths)  # release: the batch's longest video
            x = reference_block(model.frame_block1, x, n, window_len)
            x = reference_block(model.frame_block2, x, n, window_len)
            att = torch.softmax(model.frame_pool(x).squeeze(-1), 0)
            torch.testing.assert_close(got[i], att @ x, rtol=1e-5, atol=1e-5)
        clips = model.encode_clips(b["clip_feats"][:1])[0]
        x = embed(model.clip_pos, model.clip_proj, b["clip_feats"][0])
        x = reference_block(model.clip_block2, reference_block(model.clip_block1, x, 32, 32), 32, 32)
        torch.testing.assert_close(clips, x, rtol=1e-5, atol=1e-5)


def test_gaussian_window_formula():
    from prvr.methods.gmmformer_v1.model import gaussian_windows

    for L in (1, 2, 7, 32):
        g = gaussian_windows(torch.tensor([L]), L, (None, 0.5, 5.0))
        assert torch.equal(g[0, 0], torch.ones(L, L))
        torch.testing.assert_close(g[1, 0].double(), reference_window(L, 0.5), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g[2, 0].double(), reference_window(L, 5.0), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- batch dependence

def test_batch_dependence_is_the_release_s_and_the_option_removes_it():
    torch.manual_seed(0)
    short = video_batch([4, 6], seed=3)
    longer = video_batch([4, 6, 15], seed=3)
    longer["frame_feats"][:2, :6] = short["frame_feats"]
    longer["clip_feats"][:2] = short["clip_feats"]
    padded = video_batch([4, 6], seed=3, pad_to=20)
    padded["frame_feats"][:, :6] = short["frame_feats"]
    padded["clip_feats"] = short["clip_feats"]
    for own in (False, True):
        torch.manual_seed(0)
        model = M.build_model(small_cfg(own_length_windows=own)).eval()
        with torch.no_grad():
            for block in (model.frame_block1, model.frame_block2):  # logits of order 1, so
                block.attn.qkv_weight.mul_(30.0)                     # the windows matter
            alone = model.encode_videos(short).fixed
            with_long = model.encode_videos(longer).fixed
            extra_pad = model.encode_videos(padded).fixed
        torch.testing.assert_close(with_long["clips"][:2], alone["clips"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(extra_pad["frame_vec"], alone["frame_vec"], rtol=1e-6, atol=1e-6)
        diff = float((with_long["frame_vec"][:2] - alone["frame_vec"]).abs().max())
        if own:
            assert diff < 1e-6   # a video's encoding no longer depends on its batch
        else:
            assert diff > 1e-3   # the release's windows follow the batch's longest video


# ----------------------------------------------------------------------------- loss

def reference_terms(s, query, labels, cfg):
    """The objective with loops, hard negatives and a pool of 1 (every negative is the hardest)."""
    nq, nv = s["clip"].shape
    lab = labels.tolist()

    def nce(S):
        t2v = sum(torch.logsumexp(S[q], 0) - S[q, lab[q]] for q in range(nq)) / nq
        v2t = 0.0
        for v in range(nv):
            own = [q for q in range(nq) if lab[q] == v]
            v2t = v2t + torch.logsumexp(S[:, v], 0) - torch.logsumexp(S[own, v], 0)
        return t2v + v2t / nv

    def trip(S):
        t2v = sum(max(0.0, cfg.margin + max(S[q, v] for v in range(nv) if v != lab[q]) - S[q, lab[q]])
                  for q in range(nq)) / nq
        v2t = 0.0
        for v in range(nv):
            pos = sum(S[q, v] for q in range(nq) if lab[q] == v) / lab.count(v)
            neg = max(S[q, v] for q in range(nq) if lab[q] != v)
            v2t += max(0.0, cfg.margin + neg - pos)
        return t2v + v2t / nv

    x = F.normalize(query, dim=-1)
    qdl = 0.0
    for j in range(nq):
        tot = sum(math.exp(cfg.qdl_alpha * (float(x[i] @ x[j]) + cfg.qdl_margin))
                  for i in range(nq) if i != j and lab[i] == lab[j])
        qdl += math.log(1 + tot)
    return {"clip_nce": float(nce(s["clip_raw"])), "clip_trip": float(trip(s["clip"])),
            "frame_nce": float(nce(s["frame_raw"])), "frame_trip": float(trip(s["frame"])), "qdl": qdl / nq}


def test_loss_terms_match_loops():
    torch.manual_seed(0)
    cfg = small_cfg(hard_pool_size=1, qdl_alpha=4.0)
    model, loss = M.build_model(cfg), M.build_loss(cfg)
    batch = train_batch()
    out = model(batch)
    got = loss(out, batch["query_labels"], True, torch.Generator().manual_seed(0))
    ref = reference_terms({k: v.detach() for k, v in out.scores.items()}, out.queries["query_aux"].detach(),
                          batch["query_labels"], cfg)
    for k in loss.terms:
        assert float(got[k].detach()) == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    total = (cfg.clip_nce * ref["clip_nce"] + ref["clip_trip"] + cfg.frame_nce * ref["frame_nce"]
             + ref["frame_trip"] + cfg.qdl * ref["qdl"])
    assert float(got["total"].detach()) == pytest.approx(total, rel=1e-5)
    assert M.build_loss(cfg).local_sums(out, batch["query_labels"]) == {}


# ----------------------------------------------------------------------------- release checkpoints

def _release_ckpt(cfg, sd=None):
    sd = sd if sd is not None else to_release_state_dict(M.build_model(cfg).state_dict(), cfg)
    return {"config": {"hidden_size": 16, "n_heads": 2, "q_feat_size": 12, "visual_feat_dim": 24,
                       "loss_factor": [0.02, 0.04, 0.015], "neg_factor": [0.2, 32], "margin": 0.2},
            "epoch": 7, "model_val": [1.0, 2.0, 3.0, 4.0, 10.0], "state_dict": sd, "optimizer": {}}


def test_release_checkpoint_loads_and_is_told_apart():
    cfg = small_cfg()
    ckpt = _release_ckpt(cfg)
    assert M.is_release_checkpoint(ckpt)
    assert not M.is_release_checkpoint({"config": {}, "state_dict": {"weight_token": torch.zeros(1),
                                                                     "clip_encoder.attn0.self.query.weight": torch.zeros(1)}})
    got_cfg, state, info = M.load_release(ckpt, None)
    assert (got_cfg.hidden_size, got_cfg.text_dim, got_cfg.visual_dim) == (16, 12, 24)
    assert (got_cfg.clip_nce, got_cfg.frame_nce, got_cfg.qdl, got_cfg.qdl_margin, got_cfg.margin) == (0.02, 0.04, 0.015, 0.2, 0.2)
    assert info["epoch"] == 7 and info["metrics"]["sumr"] == 10.0
    M.build_model(got_cfg).load_state_dict(state)


def test_mismatching_release_tensor_is_a_one_line_error_naming_it():
    cfg = small_cfg()
    sd = to_release_state_dict(M.build_model(cfg).state_dict(), cfg)
    sd["frame_encoder_2.attn2.self.key.weight"] = torch.zeros(16, 15)
    with pytest.raises(ValueError) as exc:
        M.load_release(_release_ckpt(cfg, sd), None)
    msg = str(exc.value)
    assert "frame_encoder_2.attn2.self.key.weight" in msg and "(16, 15)" in msg and "\n" not in msg
    del sd["frame_encoder_2.attn2.self.key.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'frame_encoder_2\.attn2\.self\.key\.weight'"):
        M.load_release(_release_ckpt(cfg, sd), None)


def test_release_schedule_object_loads_through_the_allow_list(tmp_path):
    """The release's optimiser state pickles an Opts.optimization.WarmupLinearSchedule; it
    loads weights_only through RELEASE_GLOBALS, without that module and without running it."""
    ran = []
    mod = types.ModuleType("Opts.optimization")

    class WarmupLinearSchedule:
        def __init__(self, warmup, t_total):
            self.warmup, self.t_total = warmup, t_total

        def __setstate__(self, state):  # would run under a full unpickle
            ran.append(state)
    WarmupLinearSchedule.__module__ = "Opts.optimization"
    WarmupLinearSchedule.__qualname__ = "WarmupLinearSchedule"
    mod.WarmupLinearSchedule = WarmupLinearSchedule
    sys.modules["Opts"], sys.modules["Opts.optimization"] = types.ModuleType("Opts"), mod
    try:
        ckpt = _release_ckpt(small_cfg())
        ckpt["optimizer"] = {"state": {}, "param_groups": [{"lr": 3e-4, "schedule": WarmupLinearSchedule(0.01, 100)}]}
        torch.save(ckpt, tmp_path / "best.ckpt")
    finally:
        del sys.modules["Opts"], sys.modules["Opts.optimization"]
    with pytest.raises(Exception, match="WarmupLinearSchedule"):
        torch.load(tmp_path / "best.ckpt", weights_only=True)
    with torch.serialization.safe_globals(list(RELEASE_GLOBALS)):
        loaded = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert not ran and M.is_release_checkpoint(loaded)
    M.load_release(loaded, None)


# ----------------------------------------------------------------------------- recipe, determinism

def test_recipe_names_the_release_values():
    methods = yaml.safe_load((ROOT / "params.yaml").read_text())["methods"]["gmmformer_v1"]
    loop = {"seed", "epochs", "batch_size", "patience", "hard_negative_start_epoch", "lr", "weight_decay",
            "lr_warmup_proportion", "grad_clip_norm"}
    want = {"tvr": (0.1, 0.05, 0.04, 0.001, 0.15, 0.2, 3e-4, 30),
            "act": (0.2, 0.02, 0.04, 0.015, 0.2, 0.2, 2.5e-4, 20),
            "cha": (0.2, 0.02, 0.02, 0.005, 0.15, 0.15, 2.5e-4, 100)}
    for ds in ("demo", "tvr", "act", "cha"):
        assert not set(methods["all"]) & set(methods[ds]), ds
        recipe = {**methods["all"], **methods[ds]}
        cfg = M.config({k: v for k, v in recipe.items() if k not in loop}, DATA)
        if ds in want:
            got = (cfg.margin, cfg.clip_nce, cfg.frame_nce, cfg.qdl, cfg.qdl_margin, cfg.drop,
                   recipe["lr"], recipe["hard_negative_start_epoch"])
            assert got == want[ds], ds
            assert (cfg.hidden_size, recipe["batch_size"], recipe["epochs"], cfg.qdl_alpha) == (384, 128, 100, 32)
    with pytest.raises(ValueError, match="unknown keys"):
        M.config({"hidden_sise": 8}, DATA)


def test_training_steps_are_deterministic_on_cpu():
    from prvr.optim import build_optimizer

    def run():
        torch.manual_seed(0)
        cfg = small_cfg()
        model, loss = M.build_model(cfg), M.build_loss(cfg)
        opt = build_optimizer(M.param_groups(model, 0.01), {"lr": 1e-3, "weight_decay": 0.01,
                                                            "warmup_proportion": 0.0, "grad_clip_norm": 1.0}, 10)
        gen, losses = torch.Generator().manual_seed(1), []
        for step in range(3):
            batch = train_batch(seed=step)
            total = loss(model(batch), batch["query_labels"], step > 0, gen)["total"]
            total.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(total))
        return losses, [p.detach().clone() for p in model.parameters()]

    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))


# ----------------------------------------------------------------------------- speed kernels

def reference_query(model, feats, mask):
    """The query encoder on the padded layout, query by query (no packing, no kernels)."""
    a = model.query_layer
    H, nh = model.cfg.hidden_size, a.n_heads
    dh = H // nh
    out = []
    for i in range(feats.shape[0]):
        n = int(mask[i].sum())
        x = embed(model.query_pos, model.query_proj, feats[i, :n])
        q, k, v = (x @ a.qkv_weight[0].t() + a.qkv_bias[0]).split(H, -1)
        ctx = torch.cat([torch.softmax(q[:, s] @ k[:, s].t() / math.sqrt(dh), -1) @ v[:, s]
                         for s in (slice(h * dh, (h + 1) * dh) for h in range(nh))], -1)
        x = F.layer_norm(ctx @ a.out_weight[0].t() + a.out_bias[0] + x, (H,), a.norm_weight[0], a.norm_bias[0])
        out.append(torch.softmax(model.query_pool(x).squeeze(-1), 0) @ x)
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_encoders_match_plain_loops_in_value_and_gradient(backend):
    """Both backends (the CPU one: packing, the q/k/v scatter into length buckets, the packed
    head gather and pooling) give the plain per-video / per-query computation's outputs AND
    gradients (float64, eval mode), for every parameter the streams use."""
    torch.manual_seed(0)
    model = M.build_model(small_cfg(), backend).double().eval()
    lengths = [5, 9, 2, 9, 1, 6, 3]
    b = video_batch(lengths, pad_to=11)
    frames, fmask = b["frame_feats"].double(), b["frame_mask"]
    qb = train_batch()
    qfeats, qmask = qb["query_feats"].double(), qb["query_mask"]
    g = torch.Generator().manual_seed(5)
    wf = torch.randn(len(lengths), 16, generator=g, dtype=torch.float64)
    wq = torch.randn(qfeats.shape[0], 16, generator=g, dtype=torch.float64)

    def grads(fast: bool):
        model.zero_grad()
        if fast:
            f, q = model.encode_frames(frames, fmask), model.encode_query_feats(qfeats, qmask)
        else:
            f = []
            for i, n in enumerate(lengths):
                x = embed(model.frame_pos, model.frame_proj, frames[i, :n])
                for block in (model.frame_block1, model.frame_block2):
                    x = reference_block(block, x, n, max(lengths)).double()
                f.append(torch.softmax(model.frame_pool(x).squeeze(-1), 0) @ x)
            f, q = torch.stack(f), reference_query(model, qfeats, qmask)
        ((f * wf).sum() + (q * wq).sum()).backward()
        return f.detach(), q.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    f1, q1, g1 = grads(True)
    f0, q0, g0 = grads(False)
    torch.testing.assert_close(f1, f0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q1, q0, rtol=1e-10, atol=1e-10)
    assert set(g1) == set(g0) and any(n.startswith("frame_block2") for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-10, msg=n)


def test_unscaled_input_dropout_is_dropout_with_the_scale_in_the_weight():
    """kernels.dropout_unscaled: the same draw as kernels.dropout, zeroed in place, keep scale
    returned for the next weight; its gradient is the dropout's (float64)."""
    from prvr.backends.cpu.kernels import dropout, dropout_unscaled

    x = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 40, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y_ref = F.linear(dropout(x * 1.0, 0.3, True), w)
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), (x, w))
    torch.manual_seed(3)
    h, scale = dropout_unscaled(x * 1.0, 0.3, True)
    assert scale == pytest.approx(1 / 0.7) and 0.5 < float((h == 0).double().mean()) / 0.3 < 1.5
    y = F.linear(h, w * scale)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
    h_eval, s_eval = dropout_unscaled(x, 0.3, False)
    assert h_eval is x and s_eval == 1.0
