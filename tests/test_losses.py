"""GMMFormer v2 losses against slow, obviously-correct loops on tiny hand-made inputs."""
from __future__ import annotations

import itertools
import math
import pytest
import torch
import torch.nn.functional as F

from prvr.losses import (
    nce_loss,
    oml_from_matching,
    optimal_matching,
    query_diverse_loss,
    triplet_loss,
    uniform_ranks,
)
from prvr.methods import TrainOutput, VideoEncoding, get_method
from prvr.methods.gmmformer_v2 import GMMFormerConfig, GMMFormerLoss
from prvr.methods.gmmformer_v2.loss import TERMS

DT = torch.float64
SCORES = ("clip", "clip_raw", "frame", "frame_raw")


def train_output(query, clips, scores: dict, query_aux=None) -> TrainOutput:
    """The TrainOutput the loss reads: queries, the batch's clips, the four score matrices."""
    queries = {"query": query} if query_aux is None else {"query": query, "query_aux": query_aux}
    return TrainOutput(queries, VideoEncoding({"clips": clips}), dict(scores))


def rand_case(seed, counts, hidden=6, n_clips=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    nq, b = labels.numel(), len(counts)
    query = torch.randn(nq, hidden, generator=g, dtype=DT)
    clips = torch.randn(b, n_clips, hidden, generator=g, dtype=DT)
    scores = {
        "clip": torch.rand(nq, b, generator=g, dtype=DT) * 2 - 1,
        "clip_raw": torch.randn(nq, b, generator=g, dtype=DT) * 2,
        "frame": torch.rand(nq, b, generator=g, dtype=DT) * 2 - 1,
        "frame_raw": torch.randn(nq, b, generator=g, dtype=DT) * 2,
    }
    return train_output(query, clips, scores), labels


def leaves_of(out: TrainOutput, fn) -> dict:
    """fn applied to every tensor the loss reads: {"query", "clips", <score name>...}."""
    return {"query": fn(out.queries["query"]), "clips": fn(out.videos.fixed["clips"]),
            **{k: fn(out.scores[k]) for k in SCORES}}


def from_leaves(t: dict) -> TrainOutput:
    return train_output(t["query"], t["clips"], {k: t[k] for k in SCORES})


# ---------------------------------------------------------------- reference loops
def ref_nce(S, labels):
    nq, b = S.shape
    S = S.tolist()
    t2v = sum(math.log(sum(math.exp(S[q][v]) for v in range(b))) - S[q][labels[q]] for q in range(nq)) / nq
    v2t = 0.0
    for v in range(b):
        own = [q for q in range(nq) if labels[q] == v]
        if not own:
            continue
        v2t += math.log(sum(math.exp(S[q][v]) for q in range(nq))) - math.log(sum(math.exp(S[q][v]) for q in own))
    return t2v + v2t / b


def ref_triplet(S, labels, margin, t2v_rank, v2t_rank):
    """t2v_rank[q]: 0-based rank among the OTHER videos sorted by score (desc) of q's negative;
    v2t_rank[v]: 0-based rank among the other videos' queries sorted by score (desc)."""
    nq, b = S.shape
    S = S.tolist()
    t2v = 0.0
    for q in range(nq):
        others = sorted((v for v in range(b) if v != labels[q]), key=lambda v: -S[q][v])
        if others:
            t2v += max(0.0, margin + S[q][others[t2v_rank[q]]] - S[q][labels[q]])
    v2t = 0.0
    for v in range(b):
        own = [q for q in range(nq) if labels[q] == v]
        neg = sorted((q for q in range(nq) if labels[q] != v), key=lambda q: -S[q][v])
        if own and neg:
            pos = sum(S[q][v] for q in own) / len(own)
            v2t += max(0.0, margin + S[neg[v2t_rank[v]]][v] - pos)
    return t2v / nq + v2t / b


def ref_qdl(x, labels, delta, alpha, lam):
    nq = len(labels)
    total = 0.0
    for i in range(nq):
        for j in range(nq):
            if i != j and labels[i] == labels[j]:
                c = float(F.cosine_similarity(x[i], x[j], dim=0))
                total += (1 + c) ** lam * math.log(1 + math.exp(alpha * (c + delta)))
    return total / nq


def ref_matching(query, clips, labels):
    """Brute force: best assignment of each video's queries to distinct clips (max total cos)."""
    tot, cnt = 0.0, 0
    for v in range(clips.shape[0]):
        own = [q for q in range(len(labels)) if labels[q] == v]
        if len(own) < 2:
            continue
        cos = F.normalize(query[own], dim=-1) @ F.normalize(clips[v], dim=-1).t()
        n, k = cos.shape
        if n <= k:
            best = max(sum(float(cos[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(k), n))
            cnt += n
        else:
            best = max(sum(float(cos[p[j], j]) for j in range(k)) for p in itertools.permutations(range(n), k))
            cnt += k
        tot += best
    return tot, cnt


# ---------------------------------------------------------------- NCE
@pytest.mark.parametrize("counts", [[2, 1, 3], [1, 1, 1, 1], [4], [2, 0, 2]])
def test_nce_matches_loop(counts):
    out, labels = rand_case(0, counts)
    got = nce_loss(out.scores["clip_raw"], labels)
    assert float(got) == pytest.approx(ref_nce(out.scores["clip_raw"], labels.tolist()), abs=1e-10)


def test_nce_hand_values():
    # two videos, queries 0,1 -> video 0, query 2 -> video 1
    S = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=DT)
    labels = torch.tensor([0, 0, 1])
    lse = lambda *a: math.log(sum(math.exp(x) for x in a))  # noqa: E731
    t2v = ((lse(1, 0) - 1) + (lse(0, 0) - 0) + (lse(0, 2) - 2)) / 3
    v2t = ((lse(1, 0, 0) - lse(1, 0)) + (lse(0, 0, 2) - 2)) / 2
    assert float(nce_loss(S, labels)) == pytest.approx(t2v + v2t, abs=1e-12)


def test_nce_video_without_query_has_finite_gradient():
    out, labels = rand_case(1, [2, 0, 1])
    S = out.scores["clip_raw"].clone().requires_grad_(True)
    nce_loss(S, labels).backward()
    assert torch.isfinite(S.grad).all()


# ---------------------------------------------------------------- triplet
@pytest.mark.parametrize("counts", [[2, 1, 3, 1], [1, 1, 1], [3, 2]])
def test_triplet_hard_pool_one_is_deterministic_and_matches_loop(counts):
    # hard_pool_size=1: t2v takes the highest-scoring other video, v2t the highest other query
    out, labels = rand_case(2, counts)
    S = out.scores["clip"]
    got = triplet_loss(S, labels, 0.3, True, hard_pool_size=1, generator=torch.Generator().manual_seed(5))
    ref = ref_triplet(S, labels.tolist(), 0.3, [0] * len(labels), [0] * len(counts))
    assert float(got) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("hard", [True, False])
def test_triplet_seeded_sampling_matches_loop(hard):
    counts = [2, 1, 3, 1, 2, 1]
    out, labels = rand_case(3, counts)
    S, b, nq = out.scores["frame"], len(counts), len(labels)
    hps = 3
    got = triplet_loss(S, labels, 0.5, hard, hps, torch.Generator().manual_seed(11))
    # documented draw order: Nq draws for t2v, then (random mode) B draws for v2t
    g = torch.Generator().manual_seed(11)
    pool = min(hps, b - 1) if hard else b - 1
    t2v_rank = uniform_ranks(torch.full((nq,), pool), g).tolist()
    n_neg = torch.tensor([nq - c for c in counts])
    v2t_rank = [0] * b if hard else uniform_ranks(n_neg, g).tolist()
    assert all(0 <= r < pool for r in t2v_rank)
    assert all(0 <= r < n for r, n in zip(v2t_rank, n_neg.tolist()))
    ref = ref_triplet(S, labels.tolist(), 0.5, t2v_rank, v2t_rank)
    assert float(got) == pytest.approx(ref, abs=1e-12)
    again = triplet_loss(S, labels, 0.5, hard, hps, torch.Generator().manual_seed(11))
    assert float(again) == float(got)


def test_triplet_sampling_is_uniform_over_the_right_pool():
    # Average over many seeds approaches the exact expectation over uniform choices.
    counts = [1, 1, 1, 1, 1]
    out, labels = rand_case(4, counts)
    S, margin = out.scores["clip"], 2.0  # large margin: every hinge is active, loss linear in choice
    b = len(counts)
    for hard, hps in [(False, 20), (True, 2)]:
        vals = torch.tensor([float(triplet_loss(S, labels, margin, hard, hps, torch.Generator().manual_seed(s)))
                             for s in range(2000)])
        pool = min(hps, b - 1) if hard else b - 1
        expect_t2v = sum(ref_triplet(S, labels.tolist(), margin, [r] * b, [0] * b) for r in range(pool)) / pool
        if hard:
            expect = expect_t2v  # v2t deterministic (hardest), inside ref_triplet already
        else:
            # v2t uniform over the b-1 other queries, independent of t2v: expectation by linearity
            v2t_part = [ref_triplet(S, labels.tolist(), margin, [0] * b, [r] * b)
                        - ref_triplet(S, labels.tolist(), margin, [0] * b, [0] * b) for r in range(b - 1)]
            expect = expect_t2v + sum(v2t_part) / (b - 1)
        assert float(vals.mean()) == pytest.approx(expect, abs=4 * float(vals.std()) / math.sqrt(len(vals)) + 1e-9)
        assert float(vals.std()) > 0


def test_triplet_without_negatives_is_zero():
    out, labels = rand_case(5, [4])  # B = 1: no other video, no other query
    S = out.scores["clip"].clone().requires_grad_(True)
    loss = triplet_loss(S, labels, 0.2, False, 20, torch.Generator().manual_seed(0))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.all(S.grad == 0)


# ---------------------------------------------------------------- QDL
@pytest.mark.parametrize("counts", [[3, 1, 2], [1, 1], [4]])
def test_qdl_matches_loop(counts):
    out, labels = rand_case(6, counts)
    got = query_diverse_loss(out.queries["query"], labels, [0.15, 32, 1])
    assert float(got) == pytest.approx(ref_qdl(out.queries["query"], labels.tolist(), 0.15, 32, 1), rel=1e-12, abs=1e-12)
    got2 = query_diverse_loss(out.queries["query"], labels, [0.2, 5.0, 2.0])
    assert float(got2) == pytest.approx(ref_qdl(out.queries["query"], labels.tolist(), 0.2, 5.0, 2.0), rel=1e-12, abs=1e-12)


def test_qdl_non_contiguous_labels_and_gradient():
    labels = torch.tensor([1, 0, 1, 0, 2])
    q = torch.randn(5, 4, generator=torch.Generator().manual_seed(7), dtype=DT).requires_grad_(True)
    loss = query_diverse_loss(q, labels, [0.15, 32, 1])
    assert float(loss.detach()) == pytest.approx(ref_qdl(q.detach(), labels.tolist(), 0.15, 32, 1), rel=1e-12)
    loss.backward()
    assert torch.isfinite(q.grad).all()
    assert torch.all(q.grad[4] == 0)  # a query alone in its video does not take part


# ---------------------------------------------------------------- OML
@pytest.mark.parametrize("counts,n_clips", [([2, 1, 3], 5), ([3, 2], 3), ([4, 2], 3)])
def test_matching_matches_brute_force(counts, n_clips):
    out, labels = rand_case(8, counts, n_clips=n_clips)
    s, c = optimal_matching(out.queries["query"], out.videos.fixed["clips"], labels)
    ref_s, ref_c = ref_matching(out.queries["query"], out.videos.fixed["clips"], labels.tolist())
    assert c == ref_c
    assert float(s) == pytest.approx(ref_s, abs=1e-12)


def test_matching_gradient_flows_only_through_matched_cosines():
    counts = [2, 1, 3]
    out, labels = rand_case(9, counts, n_clips=5)
    q = out.queries["query"].clone().requires_grad_(True)
    cl = out.videos.fixed["clips"].clone().requires_grad_(True)
    s, c = optimal_matching(q, cl, labels)
    s.backward()
    # find the matched pairs by brute force and rebuild the sum from them explicitly
    q2 = out.queries["query"].clone().requires_grad_(True)
    cl2 = out.videos.fixed["clips"].clone().requires_grad_(True)
    manual = 0.0
    for v in range(len(counts)):
        own = [i for i in range(len(labels)) if labels[i] == v]
        if len(own) < 2:
            continue
        cos = (F.normalize(out.queries["query"][own], dim=-1) @ F.normalize(out.videos.fixed["clips"][v], dim=-1).t())
        best = max(itertools.permutations(range(5), len(own)),
                   key=lambda p: sum(float(cos[i, p[i]]) for i in range(len(own))))
        for i, k in zip(own, best):
            manual = manual + F.cosine_similarity(q2[i], cl2[v, k], dim=0)
    manual.backward()
    assert torch.allclose(q.grad, q2.grad, atol=1e-12)
    assert torch.allclose(cl.grad, cl2.grad, atol=1e-12)
    # single-query video and unmatched clips get no gradient
    assert torch.all(q.grad[2] == 0) and torch.all(cl.grad[1] == 0)
    touched = (cl.grad.abs().sum(-1) > 0).sum().item()
    assert touched == c == 5


def test_oml_zero_when_every_video_has_one_query():
    out, labels = rand_case(10, [1, 1, 1])
    q = out.queries["query"].clone().requires_grad_(True)
    s, c = optimal_matching(q, out.videos.fixed["clips"], labels)
    assert c == 0 and float(s.detach()) == 0.0
    oml = oml_from_matching(s, c)
    assert float(oml.detach()) == 0.0
    oml.backward()  # still part of a graph
    assert torch.all(q.grad == 0)


# ---------------------------------------------------------------- full module
LF = [0.05, 0.04, 8e-5, 0.09]   # the release's loss_factor: clip_nce, frame_nce, qdl, oml weights
NF = [0.15, 32, 1]              # its neg_factor: qdl_delta, qdl_alpha, qdl_lambda


def loss_fn(margin: float, lf=LF, nf=NF, **kw) -> GMMFormerLoss:
    """GMMFormerLoss with the release's (margin, loss_factor, neg_factor) as named config fields."""
    cfg = GMMFormerConfig(margin=margin, clip_nce=lf[0], frame_nce=lf[1], qdl=lf[2], oml=lf[3],
                          qdl_delta=nf[0], qdl_alpha=nf[1], qdl_lambda=nf[2], **kw)
    return GMMFormerLoss(cfg)


def test_loss_dict_terms_and_weighted_total():
    out, labels = rand_case(11, [2, 1, 3, 2])
    crit = loss_fn(0.1, hard_pool_size=2)
    d = crit(out, labels, hard_negatives=False, generator=torch.Generator().manual_seed(3))
    assert tuple(crit.terms) == TERMS and tuple(get_method("gmmformer_v2").build_loss(GMMFormerConfig()).terms) == TERMS
    assert set(d) == set(TERMS) | {"total"}
    assert all(t.dim() == 0 for t in d.values())
    total = (LF[0] * d["clip_nce"] + d["clip_trip"] + LF[1] * d["frame_nce"] + d["frame_trip"]
             + LF[2] * d["qdl"] + LF[3] * d["oml"])
    assert float(d["total"]) == pytest.approx(float(total), abs=1e-14)
    assert float(d["clip_nce"]) == pytest.approx(ref_nce(out.scores["clip_raw"], labels.tolist()), abs=1e-10)
    assert float(d["frame_nce"]) == pytest.approx(ref_nce(out.scores["frame_raw"], labels.tolist()), abs=1e-10)
    assert float(d["qdl"]) == pytest.approx(ref_qdl(out.queries["query"], labels.tolist(), *NF), rel=1e-12)
    s, c = ref_matching(out.queries["query"], out.videos.fixed["clips"], labels.tolist())
    assert float(d["oml"]) == pytest.approx(1 - s / c, abs=1e-12)
    # seeded: the same generator seed gives the same losses, the clip triplet draws come first
    d2 = crit(out, labels, hard_negatives=False, generator=torch.Generator().manual_seed(3))
    assert all(float(d[k]) == float(d2[k]) for k in d)
    g = torch.Generator().manual_seed(3)
    assert float(triplet_loss(out.scores["clip"], labels, 0.1, False, 2, g)) == float(d["clip_trip"])
    assert float(triplet_loss(out.scores["frame"], labels, 0.1, False, 2, g)) == float(d["frame_trip"])


def test_precomputed_matching_is_used():
    out, labels = rand_case(12, [2, 2])
    crit = loss_fn(0.1)
    d = crit(out, labels, True, torch.Generator().manual_seed(0), local={"oml": (torch.tensor(3.0, dtype=DT), 4)})
    assert float(d["oml"]) == pytest.approx(0.25)


def test_local_sums_are_the_matching_and_give_the_same_loss():
    """The distributed caller all-reduces `local_sums` and hands them back as `local=`: on one
    rank that is the loss computed without it."""
    out, labels = rand_case(17, [3, 1, 2])
    crit = loss_fn(0.1)
    local = crit.local_sums(out, labels)
    assert set(local) == {"oml"}
    s, c = optimal_matching(out.queries["query"], out.videos.fixed["clips"], labels)
    assert float(local["oml"][0]) == float(s) and local["oml"][1] == c
    a = crit(out, labels, False, torch.Generator().manual_seed(2))
    b = crit(out, labels, False, torch.Generator().manual_seed(2), local=local)
    assert all(float(a[k]) == float(b[k]) for k in a)


def test_qdl_and_oml_read_the_second_query_encoding():
    """With a second (training) encoding "query_aux", QDL and OML use it; the scores do not."""
    out, labels = rand_case(18, [3, 2, 1])
    aux = torch.randn(out.queries["query"].shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    with_aux = train_output(out.queries["query"], out.videos.fixed["clips"], out.scores, query_aux=aux)
    d = loss_fn(0.1)(with_aux, labels, False, torch.Generator().manual_seed(0))
    assert float(d["qdl"]) == pytest.approx(ref_qdl(aux, labels.tolist(), *NF), rel=1e-12)
    s, c = ref_matching(aux, out.videos.fixed["clips"], labels.tolist())
    assert float(d["oml"]) == pytest.approx(1 - s / c, abs=1e-12)
    plain = loss_fn(0.1)(out, labels, False, torch.Generator().manual_seed(0))
    assert float(d["clip_nce"]) == float(plain["clip_nce"]) and float(d["qdl"]) != float(plain["qdl"])


@pytest.mark.parametrize("counts", [[1, 1, 1], [5], [2, 1]])
def test_edge_batches_are_finite_with_gradients(counts):
    out, labels = rand_case(13, counts)
    leaves = leaves_of(out, lambda t: t.clone().requires_grad_(True))
    out2 = from_leaves(leaves)
    d = loss_fn(0.2)(out2, labels, hard_negatives=True, generator=torch.Generator().manual_seed(1))
    assert all(torch.isfinite(t) for t in d.values())
    d["total"].backward()
    for name, t in leaves.items():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    if len(counts) == 1:  # B = 1: nothing to rank against
        assert float(d["clip_trip"].detach()) == 0.0 and float(d["clip_nce"].detach()) == pytest.approx(0.0, abs=1e-12)


def test_float32_and_default_generator():
    out, labels = rand_case(14, [3, 2, 1])
    out32 = from_leaves(leaves_of(out, lambda t: t.float()))
    d = loss_fn(0.1)(out32, labels, hard_negatives=False)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in d.values())
    d64 = loss_fn(0.1)(out, labels, hard_negatives=True, generator=torch.Generator().manual_seed(0))
    d32 = loss_fn(0.1)(out32, labels, hard_negatives=True, generator=torch.Generator().manual_seed(0))
    for k in ("clip_nce", "frame_nce", "qdl", "oml", "clip_trip", "frame_trip"):
        assert float(d32[k]) == pytest.approx(float(d64[k]), rel=1e-4, abs=1e-5), k


def test_bad_inputs_raise():
    out, labels = rand_case(15, [2, 1])
    # the weights are named config fields: the release's positional lists are unknown keys
    with pytest.raises(ValueError, match=r"unknown keys \['loss_factor'\]"):
        GMMFormerConfig.from_dict({"margin": 0.1, "loss_factor": [1, 2, 3]})
    with pytest.raises(ValueError, match="hard_pool_size: expected >= 1, got 0"):
        loss_fn(0.1, hard_pool_size=0)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(0.1)(out, labels[:-1], True)
    out.scores["frame"] = out.scores["frame"][:, :1]
    with pytest.raises(ValueError, match=r"scores\['frame'\]: expected shape \(3, 2\), got \(3, 1\)"):
        loss_fn(0.1)(out, labels, True)


def test_matching_with_interleaved_labels_matches_brute_force():
    # queries of a video need not be adjacent in the batch
    out, labels = rand_case(16, [3, 1, 2, 2], n_clips=4)
    perm = torch.tensor([5, 0, 3, 7, 1, 4, 6, 2])
    q, lab = out.queries["query"][perm], labels[perm]
    s, c = optimal_matching(q, out.videos.fixed["clips"], lab)
    ref_s, ref_c = ref_matching(q, out.videos.fixed["clips"], lab.tolist())
    assert c == ref_c == 7
    assert float(s) == pytest.approx(ref_s, abs=1e-12)
