import numpy as np
import pytest
import torch

from prvr.metrics import KS, METRIC_KEYS, query_ranks, recall_at_k, retrieval_metrics


def slow_ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Reference: a stable sort on descending score, best position of any relevant column."""
    out = []
    for row, rel in zip(scores, relevant):
        order = np.argsort(-row, kind="stable")
        positions = np.nonzero(rel[order])[0]
        out.append(int(positions.min()) + 1)
    return np.array(out)


def test_single_relevant_ranks_match_descending_order():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    ranks = query_ranks(scores, torch.tensor([2, 0]))
    assert ranks.tolist() == [2, 2]


def test_ties_follow_stable_sort_order():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 3)
    # Same score everywhere: rank = 1 + number of tied columns before the relevant one.
    assert query_ranks(scores, torch.tensor([0, 1, 2])).tolist() == [1, 2, 3]
    # A strictly higher score always counts; a lower one never does.
    scores = torch.tensor([[0.5, 2.0, 0.5, 0.5]])
    assert query_ranks(scores, torch.tensor([2])).tolist() == [3]
    assert query_ranks(scores, torch.tensor([0])).tolist() == [2]


def test_several_relevant_videos_take_the_best_rank():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    relevant = torch.tensor([[True, False, True, False, False]])
    assert query_ranks(scores, relevant).tolist() == [3]
    # Both relevant and tied: the first column wins (rank of the earlier one).
    scores = torch.tensor([[0.7, 0.9, 0.7, 0.7]])
    relevant = torch.tensor([[False, False, True, True]])
    assert query_ranks(scores, relevant).tolist() == [3]


def test_rank_beyond_100_and_recall_values():
    n_v = 150
    scores = torch.arange(n_v, 0, -1, dtype=torch.float32).repeat(4, 1)  # column j has rank j+1
    gt = torch.tensor([0, 2, 6, 120])
    ranks = query_ranks(scores, gt)
    assert ranks.tolist() == [1, 3, 7, 121]
    vids = [f"v{j}" for j in range(n_v)]
    m = retrieval_metrics(scores, [vids[j] for j in gt], vids)
    assert m["r1"] == pytest.approx(25.0)
    assert m["r5"] == pytest.approx(50.0)
    assert m["r10"] == pytest.approx(75.0)
    assert m["r100"] == pytest.approx(75.0)
    assert m["sumr"] == pytest.approx(225.0)
    assert m["medr"] == pytest.approx(5.0)
    assert m["meanr"] == pytest.approx((1 + 3 + 7 + 121) / 4)


def test_fewer_than_100_videos_gives_full_r100():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(20, 30, generator=g)
    vids = [f"v{j}" for j in range(30)]
    qv = [vids[i % 30] for i in range(20)]
    m = retrieval_metrics(scores, qv, vids)
    assert m["r100"] == 100.0
    assert m["r1"] <= m["r5"] <= m["r10"] <= m["r100"]


def test_missing_ground_truth_video_is_a_clear_error():
    scores = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="'vX'.*'vX#3'"):
        retrieval_metrics(scores, ["a", "vX"], ["a", "b"], query_ids=["a#0", "vX#3"])
    with pytest.raises(ValueError, match="'vX' of query 1"):
        retrieval_metrics(scores, ["a", "vX"], ["a", "b"])
    with pytest.raises(ValueError, match="query 1 has no relevant video"):
        query_ranks(scores, torch.tensor([[True, False], [False, False]]))


def test_nan_scores_and_shape_mismatches_are_rejected():
    scores = torch.zeros(2, 3)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN.*query 1, video 2"):
        query_ranks(scores, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="3 video ids for 2 score columns"):
        retrieval_metrics(torch.zeros(1, 2), ["a"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="relevant has shape"):
        query_ranks(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("chunk_size", [3, 512])
def test_vectorised_ranks_equal_a_slow_loop(chunk_size):
    rng = np.random.default_rng(0)
    for trial in range(4):
        n_q, n_v = 57, 41
        # Coarse integer scores create many exact ties.
        scores = rng.integers(0, 6, size=(n_q, n_v)).astype(np.float32)
        relevant = rng.random((n_q, n_v)) < 0.08
        relevant[np.arange(n_q), rng.integers(0, n_v, n_q)] = True
        expected = slow_ranks(scores, relevant)
        got = query_ranks(scores, relevant, chunk_size=chunk_size)  # numpy input
        np.testing.assert_array_equal(got.numpy(), expected)
        got_t = query_ranks(torch.from_numpy(scores).double(), torch.from_numpy(relevant),
                            chunk_size=chunk_size)
        np.testing.assert_array_equal(got_t.numpy(), expected)


def test_retrieval_metrics_by_id_equal_the_slow_loop_with_duplicates_and_id_lists():
    rng = np.random.default_rng(3)
    n_v = 25
    vids = [f"vid{j}" for j in range(n_v)]
    vids[7] = vids[3]  # a video id listed twice: both columns are relevant
    scores = rng.random((60, n_v)).round(1)  # ties
    qv = [vids[int(rng.integers(0, n_v))] for _ in range(60)]
    qv[5] = (vids[1], vids[9])  # a query with two relevant videos
    relevant = np.zeros((60, n_v), dtype=bool)
    for i, gt in enumerate(qv):
        for vid in ([gt] if isinstance(gt, str) else gt):
            relevant[i] |= np.array([v == vid for v in vids])
    expected = slow_ranks(scores, relevant)
    m, ranks = retrieval_metrics(scores, qv, vids, ks=(1, 3), return_ranks=True)
    np.testing.assert_array_equal(ranks.numpy(), expected)
    assert set(m) == {"r1", "r3", "sumr", "medr", "meanr"}
    assert m["r3"] == pytest.approx(100.0 * np.mean(expected <= 3))
    assert m["sumr"] == pytest.approx(m["r1"] + m["r3"])
    assert m["medr"] == pytest.approx(float(np.median(expected)))


def test_default_metric_names_come_from_ks():
    """KS and METRIC_KEYS are the one source of the metric names every stage and report reads."""
    assert KS == (1, 5, 10, 100)
    assert METRIC_KEYS == ("r1", "r5", "r10", "r100", "sumr")
    scores = torch.eye(4)
    vids = [f"v{j}" for j in range(4)]
    m = retrieval_metrics(scores, vids, vids)
    assert set(m) == set(METRIC_KEYS) | {"medr", "meanr"}
    assert set(recall_at_k(torch.tensor([1, 2]))) == {f"r{k}" for k in KS}


def test_recall_needs_queries():
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k(torch.zeros(0, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ranks_equal_cpu_ranks():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(300, 90, generator=g) * 8).floor()
    gt = torch.randint(0, 90, (300,), generator=g)
    cpu = query_ranks(scores, gt)
    gpu = query_ranks(scores.cuda(), gt.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())
