"""Text-to-video retrieval metrics for partially relevant video retrieval.

A query's rank is the best (smallest) 1-based position of any of its ground-truth videos when
the videos are ordered by descending score. R@k = 100 * share of queries with rank <= k;
SumR = sum of R@k over the requested ks (R@1 + R@5 + R@10 + R@100 by default).

Tie handling (deterministic): videos are ordered as a STABLE sort on descending score would
order them, i.e. by (-score, column index). A relevant video at column j with score s has rank
``1 + #{score > s} + #{score == s and column < j}``. The best rank is that of the relevant video
that comes first in this order (highest score, then lowest column). The public release sorts
each row with ``torch.argsort`` (not stable). Measured against it (CPU, torch 2.13): rows of up to
16 videos give index order on ties, exactly this rule; on long rows with many exact ties its
order inside a tie group is implementation-defined (neither index order nor reproducible across
devices), and this rule lands inside the same tie group. Without exact ties (real cosine scores)
both give identical ranks. The stable rule is chosen because it is deterministic everywhere and
is neither the optimistic (1 + #higher) nor the pessimistic (#higher-or-equal) extreme.

Everything is vectorised torch code on the device of the scores (numpy arrays are wrapped without
a copy). Work is chunked over queries so the temporary memory is bounded by
``chunk_size * n_videos`` booleans.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

KS = (1, 5, 10, 100)
# The headline metrics every stage, report and tracker uses, in table order.
METRIC_KEYS = tuple(f"r{k}" for k in KS) + ("sumr",)


def _as_tensor(scores: Any) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        t = scores
    elif isinstance(scores, np.ndarray):
        t = torch.from_numpy(scores)
    else:
        t = torch.as_tensor(np.asarray(scores))
    if t.dim() != 2:
        raise ValueError(f"scores must be a 2-D (queries x videos) matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t.detach()


def _ranks_from_pairs(scores: torch.Tensor, pair_q: torch.Tensor, pair_v: torch.Tensor,
                      chunk_size: int) -> torch.Tensor:
    """Best rank per query given (query, video) index pairs of relevant entries.

    Every query must appear in pair_q at least once (checked by the callers).
    """
    n_q, n_v = scores.shape
    device = scores.device
    pair_q = pair_q.to(device=device, dtype=torch.long)
    pair_v = pair_v.to(device=device, dtype=torch.long)
    pair_s = scores[pair_q, pair_v]
    # Best relevant score per query, then the smallest column reaching it (stable-sort order).
    best = torch.full((n_q,), float("-inf"), dtype=scores.dtype, device=device)
    best = best.scatter_reduce(0, pair_q, pair_s, reduce="amax", include_self=True)
    at_best = pair_s == best[pair_q]
    big = torch.full_like(pair_v, n_v)
    best_col = torch.full((n_q,), n_v, dtype=torch.long, device=device)
    best_col = best_col.scatter_reduce(0, pair_q, torch.where(at_best, pair_v, big),
                                       reduce="amin", include_self=True)

    ranks = torch.empty(n_q, dtype=torch.long, device=device)
    cols = torch.arange(n_v, device=device)
    # Small chunks keep the boolean temporaries cache-resident (several times faster on CPU).
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        s = scores[start:stop]
        b = best[start:stop, None]
        higher = (s > b).sum(dim=1, dtype=torch.int32)
        equal = (s == b).sum(dim=1, dtype=torch.int32)
        rank = 1 + higher.long()
        tied = torch.nonzero(equal > 1).flatten()
        if tied.numel():
            # Only rows with exact ties need the column-order term of the stable-sort rule.
            st = s[tied]
            before = (st == b[tied]) & (cols[None, :] < best_col[start + tied, None])
            rank[tied] += before.sum(dim=1)
        ranks[start:stop] = rank
    return ranks


def _check_no_nan(scores: torch.Tensor) -> None:
    # amax propagates NaN and is one cheap reduction; +-inf scores are ordered normally.
    if scores.numel() and bool(torch.isnan(scores.amax())):
        bad = torch.nonzero(torch.isnan(scores))[0].tolist()
        raise ValueError(f"scores contain NaN (first at query {bad[0]}, video {bad[1]})")


def query_ranks(scores: Any, relevant: Any, chunk_size: int = 512) -> torch.Tensor:
    """1-based best rank of the relevant videos for each query (int64 tensor of shape (Q,)).

    scores: (Q, V) tensor or ndarray, higher = more relevant.
    relevant: bool (Q, V) matrix (several relevant videos per query allowed) or an integer
    vector (Q,) giving the single relevant column of each query.
    Raises ValueError when a query has no relevant video or the scores contain NaN.
    """
    s = _as_tensor(scores)
    n_q, n_v = s.shape
    _check_no_nan(s)
    rel = relevant if isinstance(relevant, torch.Tensor) else torch.as_tensor(np.asarray(relevant))
    if rel.dim() == 1:
        if rel.shape[0] != n_q or rel.dtype == torch.bool or rel.is_floating_point():
            raise ValueError(f"relevant as a vector must hold one integer column per query "
                             f"({n_q}), got dtype {rel.dtype} shape {tuple(rel.shape)}")
        if n_q and (int(rel.min()) < 0 or int(rel.max()) >= n_v):
            raise ValueError(f"relevant column out of range [0, {n_v})")
        pair_q = torch.arange(n_q)
        pair_v = rel.long()
    else:
        if tuple(rel.shape) != (n_q, n_v):
            raise ValueError(f"relevant has shape {tuple(rel.shape)}, scores have {(n_q, n_v)}")
        rel = rel.to(device=s.device, dtype=torch.bool)
        has = rel.any(dim=1)
        if not bool(has.all()):
            first = int(torch.nonzero(~has)[0, 0])
            raise ValueError(f"query {first} has no relevant video among the {n_v} videos")
        pair_q, pair_v = torch.nonzero(rel, as_tuple=True)
    return _ranks_from_pairs(s, pair_q, pair_v, chunk_size)


def recall_at_k(ranks: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """{"r<k>": 100 * share of ranks <= k} for each k."""
    n = ranks.numel()
    if n == 0:
        raise ValueError("no queries to evaluate")
    return {f"r{k}": 100.0 * float((ranks <= k).sum()) / n for k in ks}


def retrieval_metrics(scores: Any, query_video_ids: Sequence[Any], video_ids: Sequence[str],
                      ks: Iterable[int] = KS, query_ids: Sequence[str] | None = None,
                      chunk_size: int = 512, return_ranks: bool = False, absent: str = "error"):
    """R@k for each k, their sum "sumr", and "medr"/"meanr" (median / mean rank).

    scores: (Q, V), rows in the order of query_video_ids, columns in the order of video_ids.
    query_video_ids: per query its ground-truth video id (a str), or a collection of ids when a
    query has several relevant videos. A video id that occurs more than once in video_ids makes
    every such column relevant. Raises ValueError naming the first ground-truth id missing from
    video_ids (and its query id when query_ids is given).
    A query is a hit at k when ANY of its ground-truth videos ranks within k; ids of its list
    that are not in video_ids are ignored as long as one of them is. A query NONE of whose
    videos is in video_ids: absent="error" (default) raises as above; absent="miss" keeps it in
    the denominator as a miss at every k, even k > n_videos (its rank, for medr/meanr and
    return_ranks, is n_videos + 1), so a video left out of the list can only lower R@k, never
    raise it; the metrics then include "n_absent", the number of such queries.
    With return_ranks=True returns (metrics, ranks).
    """
    if absent not in ("error", "miss"):
        raise ValueError(f"absent must be 'error' or 'miss', got {absent!r}")
    ks = tuple(int(k) for k in ks)
    s = _as_tensor(scores)
    n_q, n_v = s.shape
    if len(query_video_ids) != n_q:
        raise ValueError(f"{len(query_video_ids)} query video ids for {n_q} score rows")
    if len(video_ids) != n_v:
        raise ValueError(f"{len(video_ids)} video ids for {n_v} score columns")
    _check_no_nan(s)
    pair_q, pair_v = _relevant_pairs(query_video_ids, video_ids, query_ids, absent)
    ranks = _ranks_from_pairs(s, pair_q, pair_v, chunk_size)
    has = torch.zeros(n_q, dtype=torch.bool, device=ranks.device)
    has[pair_q.to(ranks.device)] = True
    ranks[~has] = n_v + 1  # absent="miss": ranked after every video (for medr/meanr)
    metrics = _summarize_ranks(ranks, has, ks)
    if absent == "miss":
        metrics["n_absent"] = int((~has).sum())
    if return_ranks:
        return metrics, ranks
    return metrics


def _relevant_pairs(query_video_ids: Sequence[Any], video_ids: Sequence[str],
                    query_ids: Sequence[str] | None, absent: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query index, column index) of every relevant (query, video) pair."""
    columns: dict[str, list[int]] = {}
    for j, vid in enumerate(video_ids):
        columns.setdefault(vid, []).append(j)
    unique = all(len(c) == 1 for c in columns.values())
    if unique and all(isinstance(v, str) for v in query_video_ids):
        col = {vid: c[0] for vid, c in columns.items()}
        idx = [col.get(v, -1) for v in query_video_ids]
        pair_v = torch.tensor(idx, dtype=torch.long)
        pair_q = torch.arange(len(query_video_ids))
        missing = pair_v < 0
        if bool(missing.any()) and absent == "error":
            first = int(torch.nonzero(missing)[0, 0])
            _raise_missing(query_video_ids[first], first, query_ids)
        return pair_q[~missing], pair_v[~missing]
    pq: list[int] = []
    pv: list[int] = []
    for i, gt in enumerate(query_video_ids):
        gts = [gt] if isinstance(gt, str) else list(gt)
        found = False
        for vid in gts:
            for j in columns.get(vid, ()):
                pq.append(i)
                pv.append(j)
                found = True
        if not found and absent == "error":
            _raise_missing(gts[0] if gts else "<none>", i, query_ids)
    return torch.tensor(pq, dtype=torch.long), torch.tensor(pv, dtype=torch.long)


def _summarize_ranks(ranks: torch.Tensor, has: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """R@k (a query without a relevant video is never a hit), "sumr", "medr", "meanr"."""
    n_q = ranks.numel()
    # a query without a relevant video is never a hit, not even at a k beyond the number of videos
    metrics = recall_at_k(ranks.masked_fill(~has, torch.iinfo(torch.int64).max), ks)
    metrics["sumr"] = sum(metrics[f"r{k}"] for k in ks)
    sorted_ranks = torch.sort(ranks.to(torch.float64)).values
    mid = (n_q - 1) // 2
    metrics["medr"] = float((sorted_ranks[mid] + sorted_ranks[n_q - 1 - mid]) / 2)
    metrics["meanr"] = float(sorted_ranks.mean())
    return metrics


def _raise_missing(video_id: Any, query_index: int, query_ids: Sequence[str] | None) -> None:
    where = f"query '{query_ids[query_index]}'" if query_ids is not None else f"query {query_index}"
    raise ValueError(f"ground-truth video '{video_id}' of {where} is not in the video list")
