"""Each method's CPU backend (prvr.backends.cpu.<method>) against its reference network
(prvr.methods.<method>.model): the same parameters give the same scores (1e-5), loss terms (1e-4
relative) and gradients (1e-4 of each parameter's gradient norm, float64, dropout off), and
dropout keeps the same rate and scale."""
from __future__ import annotations

import pytest
import torch

from prvr.backends import BackendError, resolve_backend
from prvr.methods import get_method

# a small config per method with a CPU fast path
SMALL = {
    "gmmformer_v2": dict(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20,
                         n_clips=5),
    "gmmformer_v1": dict(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20,
                         n_clips=5, hard_pool_size=3),
    "msssl": dict(visual_dim=12, text_dim=10, hidden_size=16, n_heads=2, max_query_len=7, max_frames=20,
                  n_clips=5, hard_pool_size=3),
    "holmes": dict(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20,
                   n_clips=5, hard_pool_size=3, warmup_epoch=0),   # both phases: after the warm-up
    "holmes_dq": dict(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20,
                      n_clips=5, hard_pool_size=3, warmup_epoch=0, edl_dc=0.5),
    "ral": dict(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20,
                n_clips=5, hard_pool_size=3),
}
METHODS = sorted(SMALL)
FRAMES, QUERIES = [7, 20, 2, 11], [4, 7, 1, 6, 3]


def batch_for(cfg, frame_lens=FRAMES, query_lens=QUERIES, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    fmask = torch.arange(max(frame_lens))[None] < torch.tensor(frame_lens)[:, None]
    qmask = torch.arange(max(query_lens))[None] < torch.tensor(query_lens)[:, None]
    return {
        "clip_feats": torch.randn(len(frame_lens), cfg.n_clips, cfg.visual_dim, generator=g).to(dtype),
        "frame_feats": (torch.randn(len(frame_lens), fmask.shape[1], cfg.visual_dim, generator=g) * fmask[..., None]).to(dtype),
        "frame_mask": fmask,
        "query_feats": (torch.randn(len(query_lens), qmask.shape[1], cfg.text_dim, generator=g) * qmask[..., None]).to(dtype),
        "query_mask": qmask,
        "query_labels": torch.arange(len(query_lens)) % len(frame_lens),
    }


def pair(name: str, seed: int = 0, **kw):
    """(reference, cpu) networks of method `name` holding the same perturbed weights (norms and
    biases moved off their init so every tensor matters), and their config."""
    M = get_method(name)
    cfg = M.config_class.from_dict({**SMALL[name], **kw})
    torch.manual_seed(seed)
    ref = M.build_model(cfg, "reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cpu = M.build_model(cfg, "cpu")
    cpu.load_state_dict(ref.state_dict())
    return ref, cpu, cfg


@pytest.mark.parametrize("name", METHODS)
def test_backends_build_the_same_state_dict_for_a_seed(name):
    M = get_method(name)
    cfg = M.config_class.from_dict(SMALL[name])
    torch.manual_seed(3)
    ref = M.build_model(cfg, "reference")
    torch.manual_seed(3)
    cpu = M.build_model(cfg, "cpu")
    assert type(cpu) is not type(ref) and isinstance(cpu, type(ref))
    a, b = ref.state_dict(), cpu.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", METHODS)
def test_eval_scores_agree(name):
    ref, cpu, cfg = pair(name)
    batch = batch_for(cfg)
    with torch.no_grad():
        outs = [torch.manual_seed(7) and m.eval()(batch) for m in (ref, cpu)]   # RAL's draws alike
        scored = [m.score(m.encode_queries(batch), o.videos) for m, o in zip((ref, cpu), outs)]
    for key in outs[0].scores:
        assert (outs[0].scores[key] - outs[1].scores[key]).abs().max() < 1e-5, key
    for key in scored[0]:
        assert (scored[0][key] - scored[1][key]).abs().max() < 1e-5, key
    for a, b in zip(_video_tensors(outs[0].videos), _video_tensors(outs[1].videos)):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() < 1e-5


def _video_tensors(videos) -> list:
    """Every tensor of a VideoEncoding: its fixed tensors, and its sequence with its mask."""
    extra = [] if videos.seq is None else [videos.seq, videos.seq_mask]
    return [videos.fixed[k] for k in sorted(videos.fixed)] + extra


def _terms_and_grads(name, model, batch, hard: bool):
    loss = get_method(name).build_loss(model.cfg)
    get_method(name).start_epoch(model, loss, 0)   # Holmes (warmup_epoch 0): after its warm-up
    model.train()
    model.zero_grad()
    torch.manual_seed(7)   # RAL's Gaussian draws: the same for both networks
    out = model(batch)
    terms = loss(out, batch["query_labels"], hard_negatives=hard, generator=torch.Generator().manual_seed(5))
    terms["total"].backward()
    return ({k: v.detach() for k, v in terms.items()},
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("name", METHODS)
def test_training_terms_and_gradients_agree_without_dropout(name, hard):
    ref, cpu, cfg = pair(name, seed=1, input_drop=0.0, drop=0.0)
    ref, cpu = ref.double(), cpu.double()
    batch = batch_for(cfg, dtype=torch.float64)
    (t_ref, g_ref), (t_cpu, g_cpu) = (_terms_and_grads(name, m, batch, hard) for m in (ref, cpu))
    assert set(t_ref) == set(t_cpu) == {*get_method(name).build_loss(cfg).terms, "total"}
    for k in t_ref:
        assert abs(t_ref[k] - t_cpu[k]) <= 1e-4 * abs(t_ref[k]) + 1e-12, k
    assert set(g_ref) == set(g_cpu) == {n for n, _ in ref.named_parameters()}
    for n in g_ref:
        assert (g_ref[n] - g_cpu[n]).norm() <= 1e-4 * g_ref[n].norm() + 1e-12, n


@pytest.mark.parametrize("name", METHODS)
def test_float32_training_terms_agree_without_dropout(name):
    ref, cpu, cfg = pair(name, seed=2, input_drop=0.0, drop=0.0)
    batch = batch_for(cfg, seed=4)
    (t_ref, _), (t_cpu, _) = (_terms_and_grads(name, m, batch, True) for m in (ref, cpu))
    for k in t_ref:
        assert abs(t_ref[k] - t_cpu[k]) <= 1e-4 * abs(t_ref[k]) + 1e-7, k


def _train_mean(model, batch, draws: int):
    """Mean and standard error over `draws` train-mode forwards of the query encodings and
    the frame encodings (each draw its own dropout masks)."""
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        xs = torch.stack([torch.cat([(o := model(batch)).queries["query"].reshape(-1),
                                     *(t.float().reshape(-1) for t in _video_tensors(o.videos))])
                          for _ in range(draws)])
    return xs.mean(0), xs.std(0) / draws ** 0.5


@pytest.mark.parametrize("name", METHODS)
def test_dropout_keeps_the_same_rate_and_scale(name):
    """With heavy dropout, the mean training encoding over many draws is the same for both
    backends; a wrong keep rate or a missing 1/(1-p) scale moves it far outside the noise."""
    ref, cpu, cfg = pair(name, seed=3, input_drop=0.4, drop=0.4)
    batch = batch_for(cfg, [9, 14], [5, 3], seed=6)
    (m_ref, se_ref), (m_cpu, se_cpu) = (_train_mean(m, batch, 300) for m in (ref, cpu))
    z = (m_ref - m_cpu).abs() / (se_ref ** 2 + se_cpu ** 2 + 1e-12).sqrt()
    assert z.mean() < 1.2 and (z > 5).float().mean() < 0.01, float(z.mean())


def test_resolve_backend():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("auto", "cuda:1") == "reference"
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("cpu", torch.device("cuda")) == "cpu"
    with pytest.raises(BackendError, match="backend 'fast'"):
        resolve_backend("fast", "cpu")
    M = get_method("gmmformer_v2")
    with pytest.raises(ValueError, match="backend"):
        M.build_model(M.config_class.from_dict(SMALL["gmmformer_v2"]), "fast")


def test_a_method_without_a_fast_path_runs_its_reference_network():
    meanpool = get_method("meanpool")
    cfg = meanpool.config({"hidden_size": 8, "max_query_len": 7, "max_frames": 20, "n_clips": 5,
                           "temperature": 0.05, "init_std": 0.02}, {"visual_dim": 12, "text_dim": 10})
    assert type(meanpool.build_model(cfg, "cpu")) is type(meanpool.build_model(cfg, "reference"))


def test_holmes_backends_agree_when_the_batch_is_shorter_than_max_frames():
    """Holmes pads every video to max_frames for its mean token; the CPU path keeps that."""
    ref, cpu, cfg = pair("holmes", seed=4)
    batch = batch_for(cfg, [7, 12, 2], [4, 7, 1, 6], seed=8)
    with torch.no_grad():
        a, b = (m.eval().encode_videos(batch) for m in (ref, cpu))
    assert a.seq.shape[1] == b.seq.shape[1] == cfg.max_frames > batch["frame_mask"].shape[1]
    for x, y in zip(_video_tensors(a), _video_tensors(b)):
        assert (x.float() - y.float()).abs().max() < 1e-5
