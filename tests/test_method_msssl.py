"""MS-SL (prvr.methods.msssl): release layout, proposals, scores, loss, checkpoints, determinism."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from prvr.losses import uniform_ranks
from prvr.methods import get_method
from prvr.methods.msssl.model import MSSLConfig, clip_scale, proposal_matrix
from prvr.methods.msssl.release import convert_release_state_dict, to_release_state_dict

METHOD = get_method("msssl")


def small_cfg(**kw) -> MSSLConfig:
    base = dict(visual_dim=12, text_dim=10, hidden_size=16, n_heads=2, n_clips=6, max_frames=12,
                max_query_len=7, margin=0.2, hard_pool_size=3)
    return MSSLConfig(**{**base, **kw})


def make_batch(cfg: MSSLConfig, caps=(2, 1, 3, 1), frames=(5, 12, 3, 8), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, Lf = len(frames), max(frames)
    labels = torch.repeat_interleave(torch.arange(B), torch.tensor(caps))
    n_tok = torch.randint(2, cfg.max_query_len + 1, (len(labels),), generator=g)
    fmask = torch.arange(Lf)[None] < torch.tensor(frames)[:, None]
    qmask = torch.arange(int(n_tok.max()))[None] < n_tok[:, None]
    return {"clip_feats": torch.randn(B, cfg.n_clips, cfg.visual_dim, generator=g),
            "frame_feats": torch.randn(B, Lf, cfg.visual_dim, generator=g) * fmask[..., None],
            "frame_mask": fmask,
            "query_feats": torch.randn(len(labels), qmask.shape[1], cfg.text_dim, generator=g) * qmask[..., None],
            "query_mask": qmask, "query_labels": labels}


def build(cfg: MSSLConfig, seed=0, backend: str = "reference"):
    torch.manual_seed(seed)
    model = METHOD.build_model(cfg, backend)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping error shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or ".norm." in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------- release layout

def _expected_release_names() -> list[str]:
    """The release's MS_SL_Net state_dict names, in order, written out from its module tree."""
    names = []
    for s in ("query", "clip", "frame"):
        names += [f"{s}_pos_embed.position_embeddings.weight", f"{s}_pos_embed.LayerNorm.weight",
                  f"{s}_pos_embed.LayerNorm.bias"]
    for s in ("query", "clip", "frame"):
        names += [f"{s}_input_proj.LayerNorm.weight", f"{s}_input_proj.LayerNorm.bias",
                  f"{s}_input_proj.net.1.weight", f"{s}_input_proj.net.1.bias"]
        names += [f"{s}_encoder.self.{p}.{k}" for p in ("query", "key", "value") for k in ("weight", "bias")]
        names += [f"{s}_encoder.output.dense.weight", f"{s}_encoder.output.dense.bias",
                  f"{s}_encoder.output.LayerNorm.weight", f"{s}_encoder.output.LayerNorm.bias"]
    return names + ["modular_vector_mapping.weight", "mapping_linear.0.weight", "mapping_linear.1.weight"]


def test_release_layout_round_trip():
    cfg = small_cfg()
    model = build(cfg)
    ours = model.state_dict()
    rel = to_release_state_dict(ours, cfg)
    assert list(rel) == _expected_release_names()
    H = cfg.hidden_size
    shapes = {"query_pos_embed.position_embeddings.weight": (cfg.max_query_len, H),
              "clip_pos_embed.position_embeddings.weight": (cfg.max_frames, H),
              "frame_input_proj.LayerNorm.weight": (cfg.visual_dim,),
              "query_input_proj.net.1.weight": (H, cfg.text_dim),
              "clip_encoder.self.key.weight": (H, H), "frame_encoder.output.dense.bias": (H,),
              "modular_vector_mapping.weight": (1, H), "mapping_linear.1.weight": (H, H)}
    for name, shape in shapes.items():
        assert tuple(rel[name].shape) == shape, name
    # fused q/k/v: row blocks query, key, value
    qkv = ours["frame.encoder.qkv.weight"]
    assert torch.equal(rel["frame_encoder.self.key.weight"], qkv[H:2 * H])
    assert torch.equal(rel["mapping_linear.0.weight"], ours["key_proj.weight"])
    back = convert_release_state_dict(rel, cfg)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # a DataParallel-saved state dict ("module." prefix) converts the same
    wrapped = convert_release_state_dict({f"module.{k}": v for k, v in rel.items()}, cfg)
    assert all(torch.equal(wrapped[k], ours[k]) for k in ours)


# --------------------------------------------------------------------------- proposals and scores

@pytest.mark.parametrize("n_clips", [1, 5, 32])
def test_proposals_match_window_loop(n_clips):
    x = torch.randn(3, n_clips, 4)
    loop = [x[:, s:s + k].mean(1) for k in range(1, n_clips + 1) for s in range(n_clips - k + 1)]
    A = proposal_matrix(n_clips)
    assert A.shape == (n_clips * (n_clips + 1) // 2, n_clips)
    torch.testing.assert_close(A @ x, torch.stack(loop, 1), rtol=1e-6, atol=1e-6)


def test_clip_scale_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    q, clips = torch.randn(5, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    A = proposal_matrix(6)
    props = torch.einsum("pc,bch->bph", A, clips)                              # (b, P, H)
    cos = torch.einsum("qh,bph->qbp", F.normalize(q, dim=-1), F.normalize(props, dim=-1))
    dots = torch.einsum("qh,bph->qbp", q, props)
    s = clip_scale(q, clips, A, raw=True)
    torch.testing.assert_close(s["clip"], cos.amax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["clip_raw"], dots.amax(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(s["key"], cos.argmax(-1))


def _frame_feature_loop(model, q, clips, frames, n_real):
    """One query against one video, spelled out: key clip, then attention over its real frames."""
    A = model.proposals
    props = A @ clips
    key = props[int(torch.argmax(F.cosine_similarity(q[None], props, dim=-1)))]
    f = frames[:n_real]
    w = torch.softmax(model.key_proj(f) @ key, dim=0)
    return w @ model.value_proj(f)


def test_score_padding_and_inference_semantics():
    cfg = small_cfg()
    model = build(cfg).eval()
    batch = make_batch(cfg)
    garbage = dict(batch, frame_feats=batch["frame_feats"] + 5.0 * ~batch["frame_mask"][..., None])
    with torch.no_grad():
        v = model.encode_videos(batch)
        v_garbage = model.encode_videos(garbage)       # padded input slots must not matter
        q = model.encode_queries(batch)
        s = model.score(q, v)
        assert torch.equal(v.seq[~v.seq_mask], torch.zeros_like(v.seq[~v.seq_mask]))
        torch.testing.assert_close(v_garbage.seq, v.seq, rtol=0, atol=1e-6)
        # more padding on the block, and each video scored on its own at its own length
        pad = 7
        wide = type(v)(v.fixed, F.pad(v.seq, (0, 0, 0, pad)), F.pad(v.seq_mask, (0, pad)))
        for key in ("score", "clip", "frame"):
            torch.testing.assert_close(model.score(q, wide)[key], s[key], rtol=0, atol=1e-6)
        for b in range(len(v)):
            n = int(v.seq_mask[b].sum())
            one = type(v)({"clips": v.fixed["clips"][b:b + 1]}, v.seq[b:b + 1, :n], v.seq_mask[b:b + 1, :n])
            torch.testing.assert_close(model.score(q, one)["score"][:, 0], s["score"][:, b], rtol=0, atol=1e-6)
            att = _frame_feature_loop(model, q[0], v.fixed["clips"][b], v.seq[b], n)
            torch.testing.assert_close(s["frame"][0, b], F.cosine_similarity(att, q[0], dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["score"], cfg.clip_scale_w * s["clip"] + cfg.frame_scale_w * s["frame"])


def test_training_frame_scores_are_query_x_query():
    cfg = small_cfg()
    model = build(cfg).eval()
    batch = make_batch(cfg)
    labels = batch["query_labels"]
    with torch.no_grad():
        out = model(batch)
        inference = model.score(out.queries["query"], out.videos)
    n_q, B = len(labels), len(batch["frame_mask"])
    assert out.scores["clip"].shape == (n_q, B) and out.scores["frame"].shape == (n_q, n_q)
    q, att = out.queries["query"], out.queries["frame_att"]
    for j in range(n_q):  # column j: query j's own video, attended by query j's key clip
        b = int(labels[j])
        ref = _frame_feature_loop(model, q[j], out.videos.fixed["clips"][b], out.videos.seq[b],
                                  int(batch["frame_mask"][b].sum()))
        torch.testing.assert_close(att[j], ref, rtol=1e-5, atol=1e-6)
        for i in range(n_q):
            torch.testing.assert_close(out.scores["frame"][i, j], F.cosine_similarity(q[i], att[j], dim=0),
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.scores["frame_raw"][i, j], q[i] @ att[j], rtol=1e-5, atol=1e-6)
    # the diagonal is inference's frame score of each query with its own video
    torch.testing.assert_close(out.scores["frame"].diagonal(), inference["frame"][torch.arange(n_q), labels],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.scores["clip"], inference["clip"], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- loss

def _reference_terms(s, labels, margin, hard, pool, gen):
    """The release's four terms, one query / video at a time."""
    n_q, B = s["clip"].shape
    rank = lambda n, k: [int(r) for r in uniform_ranks(torch.full((n,), k), gen)]
    lse = torch.logsumexp
    raw = s["clip_raw"]
    t2v = sum(lse(raw[i], 0) - raw[i, labels[i]] for i in range(n_q)) / n_q
    v2t = sum(lse(raw[:, v], 0) - lse(raw[labels == v, v], 0) for v in range(B)) / B
    terms = {"clip_nce": t2v + v2t}
    c = s["clip"]
    r_t2v = rank(n_q, min(pool, B - 1) if hard else B - 1)
    loss = 0.0
    for i in range(n_q):
        others = sorted((v for v in range(B) if v != labels[i]), key=lambda v: -float(c[i, v]))
        loss = loss + max(0.0, margin + c[i, others[r_t2v[i]]] - c[i, labels[i]]) / n_q
    negs = [sum(int(labels[i]) != v for i in range(n_q)) for v in range(B)]
    r_v2t = [0] * B if hard else [int(r) for r in uniform_ranks(torch.tensor(negs), gen)]
    for v in range(B):
        others = sorted((i for i in range(n_q) if labels[i] != v), key=lambda i: -float(c[i, v]))
        loss = loss + max(0.0, margin + c[others[r_v2t[v]], v] - c[labels == v, v].mean()) / B
    terms["clip_trip"] = loss
    fr = s["frame_raw"]
    terms["frame_nce"] = sum(lse(torch.cat([fr[i], fr[:, i]]), 0) - fr[i, i] for i in range(n_q)) / n_q
    f, loss = s["frame"], 0.0
    for m in (f, f.t()):
        r = rank(n_q, min(pool, n_q - 1) if hard else n_q - 1)
        for i in range(n_q):
            others = sorted((j for j in range(n_q) if j != i), key=lambda j: -float(m[i, j]))
            loss = loss + max(0.0, margin + m[i, others[r[i]]] - m[i, i]) / n_q
    terms["frame_trip"] = loss
    return terms


@pytest.mark.parametrize("hard", [False, True])
def test_loss_terms_match_per_query_loop(hard):
    cfg = small_cfg()
    model = build(cfg).eval()
    batch = make_batch(cfg)
    labels = batch["query_labels"]
    loss_fn = METHOD.build_loss(cfg)
    assert tuple(loss_fn.terms) == ("clip_nce", "clip_trip", "frame_nce", "frame_trip")
    with torch.no_grad():
        out = model(batch)
    terms = loss_fn(out, labels, hard, torch.Generator().manual_seed(11))
    ref = _reference_terms({k: v.double() for k, v in out.scores.items()}, labels, cfg.margin, hard,
                           cfg.hard_pool_size, torch.Generator().manual_seed(11))
    for name in loss_fn.terms:
        torch.testing.assert_close(terms[name].double(), torch.as_tensor(ref[name], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=name)
    total = (cfg.clip_nce * terms["clip_nce"] + terms["clip_trip"] + cfg.frame_nce * terms["frame_nce"]
             + terms["frame_trip"])
    torch.testing.assert_close(terms["total"], total)
    assert loss_fn.local_sums(out, labels) == {}


# --------------------------------------------------------------------------- checkpoints, config

class _EasyDict(dict):
    """Stands in for easydict.EasyDict when writing a release-format checkpoint."""

    def __setattr__(self, k, v):
        self[k] = v
        super().__setattr__(k, v)


def _save_release(path, state, cfg, monkeypatch):
    mod = types.ModuleType("easydict")
    _EasyDict.__module__, _EasyDict.__qualname__, _EasyDict.__name__ = "easydict", "EasyDict", "EasyDict"
    mod.EasyDict = _EasyDict
    monkeypatch.setitem(sys.modules, "easydict", mod)
    mcfg = _EasyDict()
    for k, v in dict(visual_input_size=cfg.visual_dim, query_input_size=cfg.text_dim, hidden_size=cfg.hidden_size,
                     max_ctx_l=cfg.max_frames, max_desc_l=cfg.max_query_len, map_size=cfg.n_clips,
                     input_drop=0.1, device=[0], drop=0.1, n_heads=cfg.n_heads, initializer_range=0.02,
                     margin=0.1, use_hard_negative=False, hard_pool_size=20).items():
        setattr(mcfg, k, v)
    torch.save({"model": state, "model_cfg": mcfg, "epoch": 4}, path)


def test_release_checkpoint_loads_and_mismatch_names_tensor(tmp_path, monkeypatch):
    from prvr.checkpoint import CheckpointError, load_model

    cfg = small_cfg()
    model = build(cfg).eval()
    rel = to_release_state_dict(model.state_dict(), cfg)
    good = tmp_path / "model.ckpt"
    _save_release(good, rel, cfg, monkeypatch)
    monkeypatch.delitem(sys.modules, "easydict")      # loading needs no easydict: the allow-list
    base = small_cfg(hidden_size=8, clip_scale_w=0.5, frame_scale_w=0.5)  # sizes come from model_cfg
    loaded, info = load_model(good, method="msssl", base_config=base)
    assert info["kind"] == "release" and info["method"] == "msssl"
    assert loaded.cfg.hidden_size == cfg.hidden_size and loaded.cfg.clip_scale_w == 0.5
    assert loaded.cfg.margin == 0.1
    batch = make_batch(cfg)
    with torch.no_grad():
        ref = model.encode_videos(batch), model.encode_queries(batch)
        got = loaded.encode_videos(batch), loaded.encode_queries(batch)
    assert torch.equal(ref[1], got[1]) and torch.equal(ref[0].seq, got[0].seq)

    bad = dict(rel)
    bad["frame_encoder.self.value.weight"] = torch.zeros(cfg.hidden_size, cfg.hidden_size + 1)
    path = tmp_path / "bad.ckpt"
    _save_release(path, bad, cfg, monkeypatch)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, method="msssl", base_config=base)
    msg = str(exc.value)
    assert "\n" not in msg and "frame_encoder.self.value.weight" in msg and str(path) in msg


def test_config_recipe_and_param_groups():
    cfg = METHOD.config({"hidden_size": 16, "n_heads": 2, "margin": 0.1}, {"visual_dim": 12, "text_dim": 10})
    assert (cfg.visual_dim, cfg.text_dim, cfg.margin) == (12, 10, 0.1)
    assert METHOD.config_from_dict(vars(cfg)) == cfg
    with pytest.raises(ValueError, match="bogus"):
        METHOD.config({"bogus": 1}, {"visual_dim": 12, "text_dim": 10})
    model = build(small_cfg())
    decay, no_decay = METHOD.param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not (names[id(p)].endswith("bias") or ".norm." in names[id(p)]) for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"frame.encoder.norm.weight", "query.proj.norm.weight",
                                                          "clip.pos.norm.bias", "frame.encoder.qkv.bias"}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert METHOD.grad_clip_chunks(model.clip.encoder.qkv.weight) == 3
    for ds, paper in METHOD.paper.items():
        assert abs(paper["r1"] + paper["r5"] + paper["r10"] + paper["r100"] - paper["sumr"]) < 0.15, ds


def test_training_step_is_deterministic_on_cpu():
    cfg = small_cfg()
    batch = make_batch(cfg)
    results = []
    for _ in range(2):
        model = build(cfg, seed=5).train()
        loss_fn = METHOD.build_loss(cfg)
        torch.manual_seed(123)
        terms = loss_fn(model(batch), batch["query_labels"], False, torch.Generator().manual_seed(9))
        terms["total"].backward()
        results.append((terms["total"].detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_cpu_backend_training_step_on_the_portable_path():
    """The CPU backend on the path other devices take (F.dropout instead of the CPU kernels)
    runs and trains."""
    from prvr.backends.cpu.kernels import switches

    cfg = small_cfg()
    batch = make_batch(cfg)
    model = build(cfg, backend="cpu").train()
    with switches(portable=True):
        terms = METHOD.build_loss(cfg)(model(batch), batch["query_labels"], True, torch.Generator().manual_seed(2))
    terms["total"].backward()
    assert torch.isfinite(terms["total"]) and all(torch.isfinite(p.grad).all() for p in model.parameters())
