"""Holmes: the network's mean token and widths, the evidential and transport terms against
plain per-video / per-query loops, the warm-up switch through the epoch hook, fp32 under bf16
autocast, release checkpoints, and the recipes (docs/holmes.md)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prvr.checkpoint import CheckpointError, load_model, save_checkpoint
from prvr.config import load_settings
from prvr.methods import build_config, get_method
from prvr.methods.holmes import HolmesConfig
from prvr.methods.holmes.evidence import dirichlet_mse, ds_combine, evidence, pair_division, smoothed_targets
from prvr.methods.holmes.model import HOLMES_WIDTHS
from prvr.methods.holmes.release import convert, holmes_layout, to_release
from prvr.methods.holmes.transport import dustbin_values, intra_video_similarity, partial_transport

METHOD = get_method("holmes")
CFG = HolmesConfig(visual_dim=24, text_dim=16, hidden_size=32, max_frames=40, n_clips=8,
                   input_drop=0.0, drop=0.0)


def batch(n_videos=5, seed=0, cfg=CFG, max_frames=None):
    g = torch.Generator().manual_seed(seed)
    caps = torch.randint(1, 5, (n_videos,), generator=g)
    labels = torch.repeat_interleave(torch.arange(n_videos), caps)
    n_frames = torch.randint(3, (max_frames or cfg.max_frames) + 1, (n_videos,), generator=g)
    Lf = int(n_frames.max())
    n_tok = torch.randint(2, cfg.max_query_len + 1, (len(labels),), generator=g)
    Lq = int(n_tok.max())
    frame_mask = torch.arange(Lf)[None] < n_frames[:, None]
    query_mask = torch.arange(Lq)[None] < n_tok[:, None]
    return {"clip_feats": torch.randn(n_videos, cfg.n_clips, cfg.visual_dim, generator=g),
            "frame_feats": torch.randn(n_videos, Lf, cfg.visual_dim, generator=g) * frame_mask[..., None],
            "frame_mask": frame_mask,
            "query_feats": torch.randn(len(labels), Lq, cfg.text_dim, generator=g) * query_mask[..., None],
            "query_mask": query_mask, "query_labels": labels}


def model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return METHOD.build_model(cfg).eval()


# ----------------------------------------------------------------------------- the network

def test_widths_and_no_learned_token():
    net = model()
    assert net.frame_consolidation.branches.widths == HOLMES_WIDTHS
    assert "weight_token" not in net.state_dict()


def test_mean_token_pools_over_every_frame_slot_padding_included():
    """The token is the mean of the branch outputs over all max_frames slots: recomputing the
    frame stream with it by hand gives the model's frames; the mean over real frames only does not."""
    net, b = model(), batch(1)
    n = int(b["frame_mask"].sum())
    with torch.no_grad():
        for p in net.frame_consolidation.parameters():   # weights that make the mix matter
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        _, frames, mask = net.encode_video_feats(b["clip_feats"], b["frame_feats"], b["frame_mask"])
        assert mask.shape[1] == CFG.max_frames
        fc = net.frame_consolidation
        x = F.pad(b["frame_feats"], (0, 0, 0, CFG.max_frames - b["frame_feats"].shape[1]))
        x = net.frame_pos(net.frame_proj(x))
        outs = fc.branches(x, mask)                                   # (K, 1, L, H)

        def mixed(token):
            t = fc.token_attention(token, outs, mask)
            logits = fc.mix_out(F.relu(fc.mix_hidden(t)))
            return (outs * torch.softmax(logits / fc.sft_factor, 0).unsqueeze(-1)).sum(0) * mask[..., None]

        every_slot = mixed(outs.mean(dim=(0, 2)))
        real_only = mixed(outs[:, :, :n].mean(dim=(0, 2)))
    torch.testing.assert_close(frames, every_slot, rtol=1e-4, atol=1e-5)
    assert (frames - real_only).abs().max() > 1e-2


def test_a_video_s_encoding_does_not_depend_on_its_batch():
    net, b = model(), batch(4, seed=1)
    with torch.no_grad():
        all_ = net.encode_videos(b)
        one = net.encode_videos({k: b[k][:1] for k in ("clip_feats", "frame_feats", "frame_mask")})
    n = int(b["frame_mask"][0].sum())
    torch.testing.assert_close(all_.seq[0, :n], one.seq[0, :n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(all_.fixed["clips"][0], one.fixed["clips"][0], rtol=1e-5, atol=1e-6)


def test_scores_mix_clip_and_frame_with_the_recipe_weights():
    net, b = model(), batch(4, seed=2)
    with torch.no_grad():
        s = net.score(net.encode_queries(b), net.encode_videos(b))
    torch.testing.assert_close(s["score"], 0.6 * s["clip"] + 0.4 * s["frame"])


# ----------------------------------------------------------------------------- the pieces vs loops

def test_dustbin_is_each_video_s_kth_smallest_real_similarity():
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(4, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    got = dustbin_values(sim, mask, 0.3)
    for b in range(3):
        vals = sim[b, mask[b]].reshape(-1)
        k = max(1, min(int(0.3 * vals.numel()), vals.numel()))
        assert got[b] == torch.kthvalue(vals, k).values
    assert got[3] == 0


def _sinkhorn_one_video(sim, dustbin, scale, iters):
    """One video's plan, by the textbook log-domain Sinkhorn with a dustbin row."""
    m, n = sim.shape
    Z = torch.cat([sim, dustbin.expand(1, n)], 0) / scale
    log_mu = torch.cat([torch.full((m,), -math.log(n + m)), torch.tensor([math.log(n) - math.log(n + m)])])
    log_nu = torch.full((n,), -math.log(n))
    u, v = torch.zeros(m + 1), torch.zeros(n)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(Z + v[None], 1)
        v = log_nu - torch.logsumexp(Z + u[:, None], 0)
    plan = (Z + u[:, None] + v[None] + math.log(n))[:m].exp()
    return plan / (plan.sum(1, keepdim=True) + 1e-8)


def test_batched_transport_equals_one_video_at_a_time():
    g = torch.Generator().manual_seed(4)
    sim = torch.rand(3, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    dust = dustbin_values(sim, mask, 0.3)
    plan = partial_transport(sim, mask, dust, 0.1, 50)
    for b in range(3):
        m = int(mask[b].sum())
        torch.testing.assert_close(plan[b, :m], _sinkhorn_one_video(sim[b, :m], dust[b], 0.1, 50),
                                   rtol=1e-5, atol=1e-6)
        assert (plan[b, m:] == 0).all()
    torch.testing.assert_close(plan.sum(2), mask.float(), rtol=1e-5, atol=1e-6)


def test_intra_video_similarity_scales_each_video_including_empty_slots():
    g = torch.Generator().manual_seed(5)
    clips, query = torch.randn(2, 6, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1])
    sim, mask = intra_video_similarity(clips, query, labels)
    assert sim.shape == (2, 3, 6) and mask.tolist() == [[True] * 3, [True, True, False]]
    for b, rows in ((0, [0, 1, 2]), (1, [3, 4])):
        cos = F.normalize(query[rows], dim=-1) @ F.normalize(clips[b], dim=-1).t()
        block = torch.cat([cos, torch.zeros(3 - len(rows), 6)])     # empty slots: cosine 0
        want = (block - block.min()) / (block.max() - block.min() + 1e-8)
        torch.testing.assert_close(sim[b], want, rtol=1e-5, atol=1e-6)


def test_ds_combine_equals_the_outer_product_formula():
    g = torch.Generator().manual_seed(6)
    a1, a2 = 1 + torch.rand(7, 5, generator=g) * 3, 1 + torch.rand(7, 5, generator=g) * 3
    K = 5
    b1, b2 = (a1 - 1) / a1.sum(1, keepdim=True), (a2 - 1) / a2.sum(1, keepdim=True)
    u1, u2 = K / a1.sum(1, keepdim=True), K / a2.sum(1, keepdim=True)
    bb = torch.bmm(b1[:, :, None], b2[:, None, :])
    C = bb.sum((1, 2)) - torch.diagonal(bb, dim1=1, dim2=2).sum(1)
    b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - C)[:, None]
    u = u1 * u2 / (1 - C)[:, None]
    torch.testing.assert_close(ds_combine(a1, a2), b * (K / u), rtol=1e-5, atol=1e-6)


def _division_loop(scores, labels, alpha, beta):
    """pair_division one query at a time, with Python sets."""
    n_q, n_v = scores.shape
    right = [q for q in range(n_q) if int(scores[q].argmax()) == int(labels[q])]
    unc = [n_v / float(alpha[q].sum()) for q in range(n_q)]
    own = [float(scores[q, labels[q]]) for q in range(n_q)]
    max_u = min(max(unc[q] for q in right), 1 - beta) if right else 1 - beta
    min_own = max(min(own[q] for q in right), beta) if right else beta
    S = alpha.sum(1, keepdim=True)
    ent = (alpha / S * (torch.digamma(S + 1) - torch.digamma(alpha + 1))).sum(1)
    med = float(torch.median(ent))
    certain, doubtful = set(), set()
    for q in range(n_q):
        if unc[q] > max_u:
            continue
        if own[q] < min_own or float(ent[q]) > med:
            doubtful.add(q)
        else:
            certain.add(q)
    return certain, doubtful


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_division_equals_a_per_query_loop(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(6), 3)
    scores = torch.rand(18, 6, generator=g) * 0.6
    scores[torch.arange(18), labels] += torch.rand(18, generator=g) * 0.5   # some right, some not
    alpha = evidence(scores, 0.1) + 1
    certain, doubtful = pair_division(scores, labels, alpha, 0.3)
    want_c, want_d = _division_loop(scores, labels, alpha, 0.3)
    assert set(torch.where(certain)[0].tolist()) == want_c
    assert set(torch.where(doubtful)[0].tolist()) == want_d
    assert not (certain & doubtful).any()


def test_smoothed_targets_touch_only_ambiguous_queries_and_stay_distributions():
    g = torch.Generator().manual_seed(7)
    labels = torch.repeat_interleave(torch.arange(5), 2)
    frame, clip = torch.rand(10, 5, generator=g), torch.rand(10, 5, generator=g)
    frame[torch.arange(10), labels] += 0.3
    fa, ca = evidence(frame, 0.1) + 1, evidence(clip, 0.1) + 1
    t = smoothed_targets(frame, clip, labels, fa, ca, 0.3, 0.2)
    fc, fd = pair_division(frame, labels, fa, 0.3)
    cc, cd = pair_division(clip, labels, ca, 0.3)
    amb = (fc & cd) | (fd & cc) | (fd & cd)
    onehot = F.one_hot(labels, 5).float()
    assert amb.any() and (~amb).any()
    torch.testing.assert_close(t[~amb], onehot[~amb])
    want = 0.8 * onehot[amb] + 0.1 * (torch.softmax(frame[amb], 1) + torch.softmax(clip[amb], 1))
    torch.testing.assert_close(t[amb], want)
    torch.testing.assert_close(t.sum(1), torch.ones(10))


def test_dirichlet_mse_of_a_confident_right_row_is_small():
    target = torch.tensor([[1.0, 0.0, 0.0]])
    assert dirichlet_mse(torch.tensor([[1000.0, 1.0, 1.0]]), target) < 0.01
    assert dirichlet_mse(torch.tensor([[1.0, 1000.0, 1.0]]), target) > 1.9


# ----------------------------------------------------------------------------- the loss and its phases

def _loss_out(seed=0):
    net, b = model(seed=seed), batch(6, seed=seed)
    net.train()
    return net, b, net(b)


def test_terms_weighted_sum_is_the_total_in_both_phases():
    net, b, out = _loss_out()
    loss = METHOD.build_loss(CFG)
    w = loss.weights
    for after in (False, True):
        loss.after_warmup = after
        t = loss(out, b["query_labels"], False, torch.Generator().manual_seed(0))
        assert set(t) == set(loss.terms) | {"total"} and "oml" not in t
        want = (w["clip_nce"] * t["clip_nce"] + t["clip_trip"] + w["frame_nce"] * t["frame_nce"] + t["frame_trip"]
                + w["qdl"] * t["qdl"] + w["edl"] * (t["edl_frame"] + t["edl_clip"] + t["edl_fused"])
                + w["edl_intra"] * t["edl_intra"])
        torch.testing.assert_close(t["total"], want)
        assert (float(t["edl_intra"].detach()) > 0) == after


def test_the_epoch_hook_switches_the_phase_at_warmup_epoch():
    loss = METHOD.build_loss(dataclass_replace(CFG, warmup_epoch=3))
    seen = [METHOD.start_epoch(None, loss, e)["after_warmup"] for e in range(6)]
    assert seen == [0, 0, 0, 1, 1, 1]
    assert METHOD.start_epoch(None, loss, 1) == {"after_warmup": 0.0} and not loss.after_warmup
    # every other method's hook is the contract's no-op
    assert get_method("gmmformer_v2").start_epoch(None, METHOD.build_loss(CFG), 50) == {}


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_the_intra_video_term_trains_the_clips_and_the_second_query():
    net, b, out = _loss_out(1)
    loss = METHOD.build_loss(CFG)
    loss.after_warmup = True
    t = loss(out, b["query_labels"], True, torch.Generator().manual_seed(0))
    g_clip, g_aux = torch.autograd.grad(t["edl_intra"], [out.videos.fixed["clips"], out.queries["query_aux"]])
    assert g_clip.abs().sum() > 0 and g_aux.abs().sum() > 0


def test_evidential_terms_stay_fp32_under_bf16_autocast():
    net, b, out = _loss_out(2)
    loss = METHOD.build_loss(CFG)
    loss.after_warmup = True
    ref = loss(out, b["query_labels"], False, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(out, b["query_labels"], False, torch.Generator().manual_seed(0))
        e = evidence(torch.tensor([0.9, 0.5], dtype=torch.bfloat16), 0.05)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, torch.exp(torch.tanh(torch.tensor([0.9, 0.5]).bfloat16().float()) / 0.05))
    for name in ("edl_frame", "edl_clip", "edl_fused", "edl_intra", "total"):
        assert auto[name].dtype == torch.float32
        torch.testing.assert_close(auto[name], ref[name], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- checkpoints and recipes

def test_release_layout_names_and_round_trip():
    cfg = CFG
    layout = dict(holmes_layout(cfg))
    assert "clip_encoder.e_attns.7.self.query.weight" in layout and "weight_token" in layout
    assert not any(".attn0." in n for n in layout)
    net = model()
    release = to_release(net.state_dict(), cfg)
    assert list(release) == list(layout) and float(release["weight_token"].abs().sum()) == 0
    back = convert(release, cfg)
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    bad = dict(release, weight_token=torch.zeros(1, 1, cfg.hidden_size + 1))
    with pytest.raises(ValueError, match="weight_token"):
        convert(bad, cfg)


def _release_ckpt(path, cfg=CFG):
    net = model(cfg)
    rcfg = {"hidden_size": cfg.hidden_size, "visual_feat_dim": cfg.visual_dim, "q_feat_size": cfg.text_dim,
            "clip_scale_w": 0.6, "frame_scale_w": 0.4, "sft_factor": cfg.sft_factor, "margin": 0.2,
            "loss_factor": [0.02, 0.04, 0.003, 0.0009, 0.06, 0.0], "neg_factor": [0.2, 32, 1],
            "edl_tau": 0.08, "edl_intra_video_tau": 0.08, "warmup_epoch": 20, "n_heads": 4}
    torch.save({"config": rcfg, "epoch": 4, "model_val": [1.5, 2.5, 3.5, 40.0, 47.5, None],
                "state_dict": to_release(net.state_dict(), cfg), "optimizer": {}}, path)
    return net


def test_release_checkpoint_loads_as_holmes_with_its_settings(tmp_path):
    path = tmp_path / "best.ckpt"
    net = _release_ckpt(path, dataclass_replace(CFG, max_frames=128, n_clips=32))
    ours, info = load_model(path, method="holmes", base_config=dataclass_replace(CFG, max_frames=128, n_clips=32))[:2]
    assert ours.cfg.edl_intra == 0.0009 and ours.cfg.edl == 0.06 and ours.cfg.edl_intra_tau == 0.08
    assert ours.cfg.qdl_delta == 0.2 and ours.cfg.margin == 0.2
    for k, v in net.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    auto = load_model(path, base_config=dataclass_replace(CFG, max_frames=128, n_clips=32),
                      backend="reference")[0]
    assert type(auto).__name__ == "Holmes"
    packed = load_model(path, base_config=dataclass_replace(CFG, max_frames=128, n_clips=32))[0]
    assert type(packed).__name__ == "PackedHolmes"


def test_holmes_and_other_checkpoints_refuse_each_other(tmp_path):
    rel = tmp_path / "holmes_release.ckpt"
    _release_ckpt(rel)
    with pytest.raises(CheckpointError) as e:
        load_model(rel, method="gmmformer_v2")
    assert "\n" not in str(e.value) and str(rel) in str(e.value)
    ours = tmp_path / "holmes.pt"
    save_checkpoint(ours, model(), "holmes", None, 0, {}, None, {})
    for other in ("gmmformer_v2", "msssl"):
        with pytest.raises(CheckpointError, match="holmes checkpoint") as e:
            load_model(ours, method=other)
        assert "\n" not in str(e.value)
    v2 = tmp_path / "v2.pt"
    v2_cfg = get_method("gmmformer_v2").config_class(visual_dim=24, text_dim=16, hidden_size=32)
    save_checkpoint(v2, get_method("gmmformer_v2").build_model(v2_cfg), "gmmformer_v2", None, 0, {}, None, {})
    with pytest.raises(CheckpointError, match="gmmformer_v2 checkpoint") as e:
        load_model(v2, method="holmes")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ds", ["tvr", "act", "cha", "demo"])
def test_recipes_build(ds):
    s = load_settings(dataset=ds, method="holmes")
    cfg = build_config(s)
    assert (cfg.clip_scale_w, cfg.frame_scale_w) == (0.6, 0.4)
    assert cfg.widths == HOLMES_WIDTHS
    if ds == "demo":
        assert cfg.warmup_epoch < int(s["train"]["epochs"]), "both phases run on the demo"


def test_tvr_recipe_is_the_release_s():
    s = load_settings(dataset="tvr", method="holmes")
    cfg, tr = build_config(s), s["train"]
    assert [cfg.clip_nce, cfg.frame_nce, cfg.qdl, cfg.edl_intra, cfg.edl] == [0.05, 0.04, 8e-5, 0.8, 0.2]
    assert (cfg.edl_tau, cfg.edl_intra_tau, cfg.pot_scale, cfg.pot_dustbin_quantile) == (0.05, 0.06, 0.1, 0.3)
    assert (cfg.warmup_epoch, tr["hard_negative_start_epoch"], tr["patience"], tr["seed"]) == (20, 20, 20, 0)
    assert (cfg.division_beta, cfg.smooth_beta, cfg.sft_factor, cfg.margin) == (0.3, 0.2, 0.09, 0.1)


# ----------------------------------------------------------------------------- through the stages

def test_train_stage_runs_both_phases_and_evaluate_reads_a_release_checkpoint(tiny_workdir):
    import csv
    import json
    import sys

    from conftest import REPO, edit_params, run

    edit_params(tiny_workdir / "params.yaml", **{"model.name": "holmes", "methods.holmes.demo.warmup_epoch": 1})
    run([sys.executable, str(REPO / "stages/train.py"), "--no-progress", "--no-mlflow"], cwd=tiny_workdir)
    rows = list(csv.DictReader(open(tiny_workdir / "metrics/demo/holmes/train_history.csv")))
    intra = [float(r["loss_edl_intra"]) for r in rows]
    assert len(rows) == 3 and intra[0] == 0 and all(v > 0 for v in intra[1:]), intra

    # a checkpoint in the release's save_ckpt format, evaluated as the release's users would
    settings = load_settings(tiny_workdir / "params.yaml", method="holmes")
    cfg = build_config(settings)
    ckpt = tiny_workdir / "release_best.ckpt"
    _release_ckpt(ckpt, cfg)
    out = tiny_workdir / "release_test.json"
    proc = run([sys.executable, str(REPO / "stages/evaluate.py"), "--method", "holmes", "--checkpoint", str(ckpt),
                "--out", str(out), "--no-progress", "--no-mlflow"], cwd=tiny_workdir)
    got = json.loads(out.read_text())
    assert got["n_queries"] > 0 and 0 <= got["sumr"] <= 400, proc.stderr[-2000:]
    bad = run([sys.executable, str(REPO / "stages/evaluate.py"), "--method", "gmmformer_v2", "--checkpoint",
               str(ckpt), "--no-progress", "--no-mlflow"], cwd=tiny_workdir, check=False)
    assert bad.returncode != 0 and str(ckpt) in bad.stderr
    assert len([ln for ln in bad.stderr.splitlines() if "error" in ln.lower()]) == 1, bad.stderr


# ----------------------------------------------------------------------------- the report

def _holmes_result(ds: str):
    from prvr.report import MethodResult

    test = {"r1": 1.0, "r5": 5.0, "r10": 10.0, "r100": 90.0, "sumr": 106.0, "n_queries": 30, "n_videos": 15,
            "split": "test"}
    return MethodResult("holmes", METHOD.title, test, {"best_epoch": 1}, [], dict(METHOD.paper[ds]),
                        METHOD.paper_selection)


@pytest.mark.parametrize("shared,identical,words", [
    (30, True, "the validation split is the test split"),
    (12, False, "selected partly on the test split"),
    (0, False, "those are held-out numbers"),
])
def test_the_report_says_how_the_paper_row_was_selected(shared, identical, words):
    from prvr.report import render_markdown

    overlap = {"val_captions": 30, "test_captions": 30, "shared_captions": shared, "val_videos": 15,
               "test_videos": 15, "shared_videos": shared // 2, "identical": identical}
    text = render_markdown("tvr", [_holmes_result("tvr")], {"overlap": overlap, "splits": {}},
                           {"curves": "c.png", "recall": "r.png"})
    assert "| Holmes, paper | 17.3 | 39.0 | 50.4 | 87.4 | 194.2 |" in text
    assert "Holmes, paper: the best validation epoch of the release's training logs" in text and words in text
