"""BertAdam (release semantics) against a hand-written update; schedule; resume."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from prvr.methods import get_method, unwrap_model
from prvr.optim import BertAdam, build_optimizer, current_lr, warmup_linear


def test_warmup_linear_values():
    w = 0.1
    assert warmup_linear(0.0, w) == 0.0
    assert warmup_linear(0.05, w) == pytest.approx(0.5)
    assert warmup_linear(0.1, w) == pytest.approx(1.0)
    assert warmup_linear(0.55, w) == pytest.approx(0.5)
    assert warmup_linear(1.0, w) == 0.0
    assert warmup_linear(1.3, w) == 0.0
    assert warmup_linear(0.5, -1) == pytest.approx(0.5)  # no warm-up: linear decay from 1
    # the release's default proportion
    assert warmup_linear(0.005, 0.01) == pytest.approx(0.5)
    assert warmup_linear(0.505, 0.01) == pytest.approx(0.5)


def hand_steps(p0, grads, lr, warmup, t_total, wd, max_norm, b1=0.9, b2=0.999, e=1e-6):
    """Plain-Python BertAdam on a list of floats, one call per step."""
    p = list(p0)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    history = []
    for step, g in enumerate(grads):
        norm = math.sqrt(sum(x * x for x in g))
        coef = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
        g = [x * coef for x in g]
        prog = step / t_total
        mult = prog / warmup if prog < warmup else max((prog - 1) / (warmup - 1), 0.0)
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            upd = m[i] / (math.sqrt(v[i]) + e) + wd * p[i]
            p[i] -= lr * mult * upd
        history.append(list(p))
    return history


def two_param_problem():
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))  # decayed
    b = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))  # not decayed
    return w, b


GRADS_W = [[3.0, 4.0], [0.1, -0.2], [-6.0, 8.0], [0.3, 0.0], [1.0, 1.0], [0.0, -0.5]]  # norms 5, <1, 10, ...
GRADS_B = [[-2.0], [0.5], [0.05], [3.0], [-0.7], [0.2]]


def run_opt(opt, params, steps, offset=0):
    out = []
    for s in range(offset, offset + steps):
        params[0].grad = torch.tensor(GRADS_W[s], dtype=torch.float64)
        params[1].grad = torch.tensor(GRADS_B[s], dtype=torch.float64)
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def test_step_matches_hand_written_update_with_clipping_and_groups():
    w, b = two_param_problem()
    lr, warmup, t_total, wd = 0.1, 0.4, 5, 0.01
    opt = BertAdam([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                   lr=lr, warmup=warmup, t_total=t_total, max_grad_norm=1.0, weight_decay=wd)
    got = run_opt(opt, [w, b], 6)
    ref_w = hand_steps([0.5, -1.0], GRADS_W, lr, warmup, t_total, wd, 1.0)
    ref_b = hand_steps([2.0], GRADS_B, lr, warmup, t_total, 0.0, 1.0)
    for s in range(6):
        assert got[s][0].tolist() == pytest.approx(ref_w[s], abs=1e-13)
        assert got[s][1].tolist() == pytest.approx(ref_b[s], abs=1e-13)
    # step 0 has lr multiplier 0 (warm-up starts at 0): parameters unchanged, moments updated
    assert got[0][0].tolist() == [0.5, -1.0]
    assert opt.state[w]["step"] == 6
    # after 5 of 5 scheduled steps the multiplier is 0 again
    assert got[5][0].tolist() == got[4][0].tolist()
    # gradients are clipped in place, per tensor: step 5's w grad had norm ~0.5 -> untouched
    assert w.grad.tolist() == GRADS_W[5]


def test_clipping_is_per_tensor_and_in_place():
    w, b = two_param_problem()
    opt = BertAdam([w, b], lr=0.1, warmup=-1, t_total=-1, max_grad_norm=1.0, weight_decay=0.0)
    w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert w.grad.tolist() == pytest.approx([3 / (5 + 1e-6), 4 / (5 + 1e-6)], abs=1e-15)
    assert b.grad.tolist() == [0.5]  # its own norm is below 1: not scaled by w's norm
    # constant lr without a schedule: first update = lr * m / (sqrt(v) + e) = lr * 0.1 g / (sqrt(0.001) |g| + e)
    g = 0.5
    expect = 2.0 - 0.1 * (0.1 * g) / (math.sqrt(0.001 * g * g) + 1e-6)
    assert b.item() == pytest.approx(expect, abs=1e-14)


def test_no_clipping_when_disabled_and_params_without_grad_skipped():
    w, b = two_param_problem()
    opt = BertAdam([w, b], lr=0.1, warmup=-1, t_total=-1, max_grad_norm=-1, weight_decay=0.0)
    w.grad = torch.tensor([30.0, 40.0], dtype=torch.float64)
    opt.step()
    assert w.grad.tolist() == [30.0, 40.0]
    assert b not in opt.state or len(opt.state[b]) == 0
    assert b.tolist() == [2.0]


def test_state_dict_round_trip_gives_identical_next_steps():
    w, b = two_param_problem()
    groups = lambda w, b: [{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}]  # noqa
    opt = BertAdam(groups(w, b), lr=0.05, warmup=0.2, t_total=6, max_grad_norm=1.0)
    run_opt(opt, [w, b], 3)
    # through bytes with weights_only=True, as a checkpoint would
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "w": w.detach(), "b": b.detach()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    w2 = torch.nn.Parameter(ck["w"].clone())
    b2 = torch.nn.Parameter(ck["b"].clone())
    opt2 = BertAdam(groups(w2, b2), lr=0.05, warmup=0.2, t_total=6, max_grad_norm=1.0)
    opt2.load_state_dict(ck["optimizer"])
    assert current_lr(opt2) == current_lr(opt)
    a = run_opt(opt, [w, b], 3, offset=3)
    c = run_opt(opt2, [w2, b2], 3, offset=3)
    for x, y in zip(a, c):
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    # and a fresh optimiser (no state) does not: the round trip really carried the moments
    w3 = torch.nn.Parameter(ck["w"].clone())
    b3 = torch.nn.Parameter(ck["b"].clone())
    fresh = BertAdam(groups(w3, b3), lr=0.05, warmup=0.2, t_total=6, max_grad_norm=1.0)
    d = run_opt(fresh, [w3, b3], 1, offset=3)
    assert not torch.equal(d[0][0], c[0][0])


def test_current_lr_follows_schedule():
    w, b = two_param_problem()
    opt = BertAdam([w, b], lr=0.2, warmup=0.25, t_total=8)
    lrs = [current_lr(opt)]
    for _ in range(8):
        w.grad = torch.ones_like(w)
        b.grad = torch.ones_like(b)
        opt.step()
        lrs.append(current_lr(opt))
    # steps 0..8 of 8: 0, 0.5, 1 (end of warm-up), then linear decay to 0
    expect = [0.2 * warmup_linear(s / 8, 0.25) for s in range(9)]
    assert lrs == pytest.approx(expect)
    assert lrs[2] == pytest.approx(0.2) and lrs[5] == pytest.approx(0.2 * 0.5)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)

    def param_groups(self, weight_decay):
        decay = [self.lin.weight]
        no_decay = [self.lin.bias, self.norm.weight, self.norm.bias]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def test_build_optimizer_from_settings():
    model = TinyModel()
    settings = {"lr": 3e-4, "weight_decay": 0.01, "warmup_proportion": 0.01, "grad_clip_norm": 1.0}
    opt = build_optimizer(model.param_groups(0.01), settings, t_total=1000)
    assert isinstance(opt, BertAdam)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert all(g["lr"] == 3e-4 and g["t_total"] == 1000 and g["warmup"] == 0.01 and g["max_grad_norm"] == 1.0
               for g in opt.param_groups)
    assert current_lr(opt) == 0.0  # warm-up starts at 0
    with pytest.raises(ValueError, match="grad_clip_norm"):
        build_optimizer(model.param_groups(0.01), {k: v for k, v in settings.items() if k != "grad_clip_norm"}, 10)
    with pytest.raises(ValueError, match="t_total"):
        build_optimizer(model.param_groups(0.01), settings, 0)


def test_build_optimizer_over_a_method_groups_through_a_ddp_wrapper():
    """Training builds the optimiser from `Method.param_groups` of the unwrapped network."""
    from prvr.methods.gmmformer_v2 import GMMFormer, GMMFormerConfig

    model = GMMFormer(GMMFormerConfig(visual_dim=6, text_dim=4, hidden_size=8, n_heads=2, max_query_len=5,
                                      max_frames=8, n_clips=4))
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP looks like from outside
    settings = {"lr": 1e-4, "weight_decay": 0.02, "warmup_proportion": 0.1, "grad_clip_norm": 1.0}
    groups = get_method("gmmformer_v2").param_groups(unwrap_model(wrapped), settings["weight_decay"])
    opt = build_optimizer(groups, settings, 10)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))


def test_invalid_arguments():
    w, _ = two_param_problem()
    with pytest.raises(ValueError, match="learning rate"):
        BertAdam([w], lr=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        BertAdam([w], lr=0.1, warmup=1.5)


def test_foreach_matches_per_tensor_reference_on_a_model():
    torch.manual_seed(0)
    model = TinyModel()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model.param_groups(0.01), {"lr": 1e-2, "weight_decay": 0.01, "warmup_proportion": 0.1,
                                  "grad_clip_norm": 0.5}, t_total=20)
    state = {}
    for step in range(5):
        x = torch.randn(4, 3)
        for mdl in (model, ref):
            mdl.zero_grad()
            (mdl.norm(mdl.lin(x)) ** 3).sum().backward()
        opt.step()
        mult = warmup_linear(step / 20, 0.1)
        with torch.no_grad():
            for grp in ref.param_groups(0.01):
                for p in grp["params"]:
                    g = p.grad
                    g = g * min(1.0, 0.5 / (float(g.norm()) + 1e-6))
                    m, v = state.get(p, (torch.zeros_like(p), torch.zeros_like(p)))
                    m = 0.9 * m + 0.1 * g
                    v = 0.999 * v + 0.001 * g * g
                    state[p] = (m, v)
                    p -= 1e-2 * mult * (m / (v.sqrt() + 1e-6) + grp["weight_decay"] * p)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n
