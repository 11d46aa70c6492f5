"""Token-level queries (QueryEncoding), RAL and Holmes-DQ: the token scores and the Gaussian
pieces against plain loops and materialised padding, the release quirks and their switches,
the terms, release checkpoints (told apart from the methods they build on), recipes, and
evaluation of a token-level method within a memory budget (docs/ral.md)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from prvr.checkpoint import load_model
from prvr.config import load_settings
from prvr.evaluation import VideoBank, block_plan, encode_videos, score_matrix
from prvr.methods import QueryEncoding, build_config, get_method
from prvr.methods.gmmformer_v2.token_queries import token_frame_scores
from prvr.methods.holmes_dq import HolmesDQConfig
from prvr.methods.holmes_dq.loss import evidence_consistency
from prvr.methods.ral import RALConfig
from prvr.methods.ral.prob import (AttentionPool, distribution_alignment_loss, proxy_matching_loss,
                                   support_sets)

SMALL = dict(visual_dim=24, text_dim=16, hidden_size=32, max_frames=40, n_clips=8, input_drop=0.0, drop=0.0)
RAL_CFG = RALConfig(**SMALL)
DQ_CFG = HolmesDQConfig(**SMALL)


def batch(n_videos=5, seed=0, cfg=RAL_CFG, short=False):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(1, 5, (n_videos,), generator=g)
    labels = torch.repeat_interleave(torch.arange(n_videos), caps)
    hi = cfg.max_frames // 2 if short else cfg.max_frames
    n_frames = torch.randint(3, hi + 1, (n_videos,), generator=g)
    Lf = int(n_frames.max())
    n_tok = torch.randint(2, cfg.max_query_len + 1, (len(labels),), generator=g)
    Lq = int(n_tok.max())
    frame_mask = torch.arange(Lf)[None] < n_frames[:, None]
    query_mask = torch.arange(Lq)[None] < n_tok[:, None]
    return {"clip_feats": torch.randn(n_videos, cfg.n_clips, cfg.visual_dim, generator=g),
            "frame_feats": torch.randn(n_videos, Lf, cfg.visual_dim, generator=g) * frame_mask[..., None],
            "frame_mask": frame_mask,
            "query_feats": torch.randn(len(labels), Lq, cfg.text_dim, generator=g) * query_mask[..., None],
            "query_mask": query_mask, "query_labels": labels,
            "video_ids": [f"v{i}" for i in range(n_videos)],
            "query_ids": [f"v{int(v)}#enc#{i}" for i, v in enumerate(labels)]}


def model(name="ral", cfg=RAL_CFG, seed=0):
    torch.manual_seed(seed)
    return get_method(name).build_model(cfg).eval()


# ----------------------------------------------------------------------------- QueryEncoding

def test_query_encoding_slices_trim_and_cat_pads_the_token_axis():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    enc = QueryEncoding(torch.randn(3, 5), torch.randn(3, 4, 6) * mask[..., None], mask,
                        torch.softmax(torch.randn(3, 4).masked_fill(~mask, float("-inf")), 1))
    assert enc[0:1].token_len == 2 and enc[2:3].token_len == 1 and enc[0:2].token_len == 4
    both = QueryEncoding.cat([enc[2:3], enc[0:1]])
    assert both.token_len == 2 and both.mask.tolist() == [[True, False], [True, True]]
    assert len(both) == 2 and both.shape == (2, 5)
    with pytest.raises(ValueError, match="disagree"):
        QueryEncoding(torch.randn(2, 5), torch.randn(3, 4, 6), mask, mask.float())


@pytest.mark.parametrize("name,cfg", [("ral", RAL_CFG), ("holmes_dq", DQ_CFG)])
def test_scores_do_not_depend_on_query_padding(name, cfg):
    net, b = model(name, cfg), batch(4, seed=1, cfg=cfg)
    padded = dict(b, query_feats=F.pad(b["query_feats"], (0, 0, 0, 7)), query_mask=F.pad(b["query_mask"], (0, 7)))
    with torch.no_grad():
        v = net.encode_videos(b)
        a = net.score(net.encode_queries(b), v)["score"]
        p = net.score(net.encode_queries(padded), v)["score"]
        one = torch.cat([net.score(net.encode_queries({k: (t[i:i + 1] if torch.is_tensor(t) else t)
                                                       for k, t in b.items()}), v)["score"]
                         for i in range(len(b["query_labels"]))])
    torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, one, rtol=1e-5, atol=1e-6)


def test_token_frame_scores_equal_a_per_pair_loop():
    g = torch.Generator().manual_seed(2)
    tok_mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    tokens = torch.randn(2, 3, 8, generator=g) * tok_mask[..., None]
    weights = torch.softmax(torch.randn(2, 3, generator=g).masked_fill(~tok_mask, float("-inf")), 1)
    fmask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]).bool()
    frames = torch.randn(2, 6, 8, generator=g) * fmask[..., None]
    for slots in (6, 0):   # a 6-slot model pads video 1: 0 is among its candidates; 0 slots: not
        got = token_frame_scores(tokens, tok_mask, weights, frames, fmask, slots, cosine=True)
        for q in range(2):
            for b in range(2):
                total = 0.0
                for t in range(int(tok_mask[q].sum())):
                    cos = [float(F.cosine_similarity(tokens[q, t], frames[b, f], dim=0))
                           for f in range(int(fmask[b].sum()))]
                    best = max(cos + ([0.0] if int(fmask[b].sum()) < slots else []))
                    total += float(weights[q, t]) * best
                assert abs(float(got[q, b]) - total) < 1e-5


def test_an_all_negative_short_video_scores_zero_only_with_the_128_slot_quirk():
    frames = -torch.ones(1, 2, 4)
    tokens, mask, w = torch.ones(1, 1, 4), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 1)
    fmask = torch.ones(1, 2, dtype=torch.bool)
    assert float(token_frame_scores(tokens, mask, w, frames, fmask, 128, True)) == 0.0
    assert float(token_frame_scores(tokens, mask, w, frames, fmask, 0, True)) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- the Gaussian pieces

def test_attention_pool_counting_zero_rows_equals_materialising_them():
    torch.manual_seed(3)
    pool = AttentionPool(8, 4)
    x = torch.randn(3, 5, 8)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    zeros = torch.tensor([0, 7, 2])
    got = pool(x, valid, zeros)
    for b in range(3):
        rows = torch.cat([x[b, valid[b]], torch.zeros(int(zeros[b]), 8)])
        want = pool(rows[None], torch.ones(1, len(rows), dtype=torch.bool), torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-6)


def test_support_sets_concatenate_each_video_s_queries_in_order():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(5, 3, 2, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]]).bool()
    labels = torch.tensor([1, 0, 1, 1, 0])
    rows, valid, real = support_sets(tokens, mask, labels, 3)
    assert rows.shape == (3, 9, 2)
    torch.testing.assert_close(rows[0, :6], torch.cat([tokens[1], tokens[4]]))
    torch.testing.assert_close(rows[1], torch.cat([tokens[0], tokens[2], tokens[3]]))
    assert valid.sum(1).tolist() == [6, 9, 0] and (rows[2] == 0).all()
    assert real[1].tolist() == mask[[0, 2, 3]].reshape(-1).tolist()


def test_proxy_matching_is_the_bag_nce_with_the_kronecker_mask():
    g = torch.Generator().manual_seed(5)
    B, K, H = 3, 2, 4
    v, t = torch.randn(B, K, H, generator=g), torch.randn(B, K, H, generator=g)
    pos = torch.kron(torch.eye(B), torch.ones(K, K)).bool()

    def bag(a, b):
        logp = F.log_softmax(a.reshape(B * K, H) @ b.reshape(B * K, H).t(), 1)
        return (-(logp * pos).sum(1) / pos.sum(1)).mean()
    torch.testing.assert_close(proxy_matching_loss(v, t), (bag(v, t) + bag(t, v)) / 2)


def test_distribution_alignment_of_standard_normals_is_the_cross_term_alone():
    B, K, H = 2, 3, 4
    zeros = torch.zeros(B, K, H)
    # mu 0, logsigma 0: both prior KLs vanish; the cross term is 0 - 0 + (1 + 0) / 2 - 1/2 = 0
    assert float(distribution_alignment_loss(zeros, zeros[:, 0], zeros, zeros[:, 0])) == 0.0
    mu = torch.ones(B, K, H)
    # mu_v = 1, mu_t = 0: prior KL of v = 0.5 * H, cross = (1 + 1) / 2 - 1/2 = 0.5 per dim
    got = float(distribution_alignment_loss(mu, zeros[:, 0], zeros, zeros[:, 0]))
    assert got == pytest.approx(0.5 * H + 0.5 * H)


def test_a_video_with_more_queries_than_the_support_slots_is_refused():
    net = model(cfg=dataclasses.replace(RAL_CFG, support_slots=2)).train()
    b = batch(3, seed=6)
    b["query_labels"] = torch.zeros_like(b["query_labels"])   # every query on video 0
    with pytest.raises(ValueError, match="support_slots 2 holds at most 2"):
        net(b)


def test_the_support_padding_quirk_changes_the_text_gaussian_and_its_switch_removes_it():
    b = batch(4, seed=7)
    outs = {}
    for slots in (26, 5, 0):
        net = model(cfg=dataclasses.replace(RAL_CFG, support_slots=slots))
        net.noise = lambda n, like: torch.zeros(n, RAL_CFG.n_samples, like.shape[-1])
        with torch.no_grad():
            outs[slots] = net(b).videos.fixed["text_samples"]
    assert (outs[26] - outs[5]).abs().max() > 1e-4 and (outs[5] - outs[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- terms

@pytest.mark.parametrize("name,cfg", [("ral", RAL_CFG), ("holmes_dq", DQ_CFG)])
def test_terms_sum_to_the_total_and_every_parameter_trains(name, cfg):
    m = get_method(name)
    net, loss = model(name, cfg).train(), m.build_loss(cfg)
    m.start_epoch(net, loss, 10_000)
    b = batch(5, seed=8, cfg=cfg)
    terms = loss(net(b), b["query_labels"], False, torch.Generator().manual_seed(0))
    assert set(terms) == set(loss.terms) | {"total"}
    w = {**{k: 1.0 for k in ("clip_trip", "frame_trip")}, **loss.weights}
    if name == "ral":
        want = sum(w[t] * terms[t] for t in loss.terms)
    else:
        edl = ("edl_frame", "edl_clip", "edl_fused")
        want = (sum(w[t] * terms[t] for t in ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "qdl"))
                + w["edl"] * sum(terms[t] for t in edl) + w["edl_intra"] * terms["edl_intra"]
                + w["edl_dc"] * terms["edl_consistency"])
    torch.testing.assert_close(terms["total"], want)
    terms["total"].backward()
    idle = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if name == "holmes_dq":   # edl_dc is 0 in the recipe; everything else trains
        assert idle == [], idle
    else:
        assert idle == [], idle


def test_evidence_consistency_is_zero_for_equal_views_and_grows_with_disagreement():
    a = 1 + torch.rand(4, 6) * 5
    assert float(evidence_consistency([a, a])) == pytest.approx(0.0, abs=1e-7)
    b = a.flip(1)
    two = float(evidence_consistency([a, b]))
    S = a.sum(1, keepdim=True)
    want = ((a / S - b / S).abs().sum(1) * (1 - 6 / S.squeeze(1)) ** 2).mean()
    assert two == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------- evaluation

def test_a_token_level_method_evaluates_within_a_small_budget_to_the_same_scores():
    net, b = model(), batch(12, seed=9)

    def loader(keys, step):
        n = len(b["video_ids"]) if "clip_feats" in keys else len(b["query_ids"])
        for i in range(0, n, step):
            yield {k: b[k][i:i + step] for k in keys}
    vkeys = ("clip_feats", "frame_feats", "frame_mask", "video_ids")
    bank = encode_videos(net, loader(vkeys, 5), "cpu", progress=False)
    with torch.no_grad():
        q = QueryEncoding.cat([net.encode_queries(x) for x in loader(("query_feats", "query_mask"), 4)])
    big = score_matrix(q, bank, lambda qq, vv: net.score(qq, vv)["score"], "cpu", progress=False)
    tiny = score_matrix(q, bank, lambda qq, vv: net.score(qq, vv)["score"], "cpu", progress=False,
                        memory_budget_mb=0.05)
    torch.testing.assert_close(big, tiny, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        direct = net.score(net.encode_queries(b), net.encode_videos(b))["score"]
    torch.testing.assert_close(big, direct, rtol=1e-5, atol=1e-5)
    v_tok, q_tok = block_plan(bank, len(q), 32, "cpu", 0.05, token_len=q.token_len)
    v_vec, q_vec = block_plan(bank, len(q), 32, "cpu", 0.05)
    assert v_tok * q_tok <= v_vec * q_vec    # the token temporaries are counted


# ----------------------------------------------------------------------------- releases

@pytest.mark.parametrize("name,cfg", [("ral", RAL_CFG), ("holmes_dq", DQ_CFG)])
def test_release_round_trip_and_auto_detection_tells_it_from_its_base(name, cfg, tmp_path):
    if name == "ral":
        from prvr.methods.ral.release import to_release
        rcfg = {"hidden_size": 32, "q_feat_size": 16, "visual_feat_dim": 24, "max_desc_l": 30,
                "clip_scale_w": 0.5, "frame_scale_w": 0.5, "loss_factor": [0.05, 0.04, 8e-5, 0.09],
                "neg_factor": [0.15, 32, 1], "margin": 0.1, "n_heads": 4}
        base = "gmmformer_v2"
    else:
        from prvr.methods.holmes_dq.release import to_release
        rcfg = {"hidden_size": 32, "q_feat_size": 16, "visual_feat_dim": 24, "max_desc_l": 30,
                "clip_scale_w": 0.5, "frame_scale_w": 0.5, "loss_factor": [0.05, 0.04, 8e-5, 0.1, 0.01, 0.0],
                "neg_factor": [0.15, 32, 1], "edl_tau": 0.2, "edl_intra_video_tau": 0.04, "n_heads": 4}
        base = "holmes"
    net = model(name, cfg, seed=1)
    path = tmp_path / "best.ckpt"
    torch.save({"config": rcfg, "epoch": 3, "model_val": [1.0, 2.0, 3.0, 4.0, 10.0],
                "state_dict": to_release(net.state_dict(), cfg), "optimizer": {}}, path)
    base_cfg = dataclasses.replace(cfg, clip_nce=0.0)
    ours = load_model(path, base_config=base_cfg, backend="reference")[0]
    assert type(ours).__name__ == type(net).__name__
    for k, v in net.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert ours.cfg.clip_nce == 0.05
    if name == "holmes_dq":
        assert ours.cfg.edl_intra == 0.1 and ours.cfg.edl_tau == 0.2 and ours.cfg.edl_dc == 0.0
    from prvr.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=f"cannot convert the {base} release checkpoint"):
        load_model(path, method=base, base_config=base_cfg)


# ----------------------------------------------------------------------------- recipes

def test_tvr_and_act_recipes_are_the_release_code_s():
    s = load_settings("params.yaml", dataset="tvr", method="ral")
    tvr = build_config(s)
    assert (s["optim"]["lr"], s["train"]["epochs"], s["train"]["patience"], s["train"]["seed"]) == (3e-4, 150, 15, 9527)
    assert (tvr.clip_scale_w, tvr.frame_scale_w, tvr.oml, tvr.mil, tvr.vib) == (0.5, 0.5, 0.09, 4e-3, 2.5e-4)
    assert tvr.support_slots == 26 and tvr.pad_frames_to_max
    act = build_config(load_settings("params.yaml", dataset="act", method="ral"))
    assert (act.clip_scale_w, act.frame_scale_w, act.text_dim, act.oml, act.drop) == (0.6, 0.4, 1024, 0.11, 0.31)
    dq = build_config(load_settings("params.yaml", dataset="tvr", method="holmes_dq"))
    assert (dq.edl_intra, dq.edl, dq.edl_tau, dq.edl_intra_tau, dq.edl_dc) == (0.1, 0.01, 0.2, 0.04, 0.0)


# ----------------------------------------------------------------------------- through the stages

@pytest.mark.parametrize("name", ["ral", "holmes_dq"])
def test_train_and_evaluate_stages_run_a_token_level_method(name, tiny_workdir):
    import csv
    import json
    import sys

    from conftest import REPO, edit_params, run

    edit_params(tiny_workdir / "params.yaml", **{"model.name": name})
    run([sys.executable, str(REPO / "stages/train.py"), "--no-progress", "--no-mlflow"], cwd=tiny_workdir)
    rows = list(csv.DictReader(open(tiny_workdir / f"metrics/demo/{name}/train_history.csv")))
    extra = ("loss_mil", "loss_vib") if name == "ral" else ("loss_edl_consistency",)
    assert rows and all(float(r[k]) > 0 for r in rows for k in extra), rows[0].keys()
    run([sys.executable, str(REPO / "stages/evaluate.py"), "--no-progress", "--no-mlflow"], cwd=tiny_workdir)
    got = json.loads((tiny_workdir / f"metrics/demo/{name}/test.json").read_text())
    assert got["n_queries"] > 0 and 0 <= got["sumr"] <= 400


def test_a_release_checkpoint_with_its_pickled_schedule_loads_without_running_it(tmp_path):
    """RAL's save_ckpt stores BertAdam's state, whose param groups pickle an
    Opts.optimization.WarmupLinearSchedule: prvr.checkpoint reads it through the allow-list as
    a plain dict, never constructing the class."""
    import sys
    import types

    from prvr.methods.ral.release import to_release

    ran = []
    mod = types.ModuleType("Opts.optimization")

    class WarmupLinearSchedule:
        def __init__(self, warmup, t_total):
            self.warmup, self.t_total = warmup, t_total

        def __setstate__(self, state):   # would run under a full unpickle
            ran.append(state)
    WarmupLinearSchedule.__module__, WarmupLinearSchedule.__qualname__ = "Opts.optimization", "WarmupLinearSchedule"
    mod.WarmupLinearSchedule = WarmupLinearSchedule
    sys.modules["Opts"], sys.modules["Opts.optimization"] = types.ModuleType("Opts"), mod
    try:
        net = model()
        torch.save({"config": {"hidden_size": 32, "q_feat_size": 16, "visual_feat_dim": 24},
                    "epoch": 1, "model_val": [1, 2, 3, 4, 10], "state_dict": to_release(net.state_dict(), RAL_CFG),
                    "optimizer": {"state": {}, "param_groups": [{"lr": 3e-4, "schedule": WarmupLinearSchedule(0.01, 9)}]}},
                   tmp_path / "ral.ckpt")
    finally:
        del sys.modules["Opts"], sys.modules["Opts.optimization"]
    ours = load_model(tmp_path / "ral.ckpt", method="ral", base_config=RAL_CFG, backend="reference")[0]
    assert not ran and type(ours).__name__ == "RAL"
