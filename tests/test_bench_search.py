"""benchmarks/bench_search.py on a tiny collection: its planted relevance is real (a query's
own video comes first far above chance), the two-stage search agrees with exhaustive scoring
of the same vectors, and every figure the README quotes is in the result; profile_search.py
times the pieces of a search on the folder it leaves."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_search as bench  # noqa: E402
import profile_search  # noqa: E402


def test_planted_collection_and_two_stage_figures(tmp_path):
    import faiss
    import torch

    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        r = bench.run_size(400, 12, tmp_path, 40, 8, "flat")
        # profile_search.py on the folder the run left (it sets one thread itself)
        out = tmp_path / "profile.json"
        assert profile_search.main(["--index", str(tmp_path / "index_400"), "--queries", "12", "--out", str(out)]) == 0
        # a folder that bench_search did not write: refused, exit 2
        assert profile_search.main(["--index", str(tmp_path)]) == 2
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    assert r["videos"] == 400 and r["vectors"] == 400 * bench.N_CLIPS and r["stage1_kind"] == "flat"
    assert r["top1_is_planted_video"] >= 0.75          # chance is 1/400
    assert r["recall_at_10"] >= 0.9 and r["top1_agreement"] >= 0.9
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] and r["bytes_per_video"] > 0
    assert r["speedup_vs_exhaustive_p50"] == pytest.approx(r["exhaustive_one_query_ms"] / r["latency_p50_ms"])
    # the index's own anonymous memory, measured in a fresh process: a flat faiss index holds its
    # 32 fp32 vectors a video in RAM (49,152 bytes), so the figure is at least that, and the
    # fp32 encodings the rerank reads stay memory-mapped (not counted)
    flat = bench.N_CLIPS * bench.H * 4
    assert 0.95 * flat <= r["anon_rss_bytes_per_video"] <= 2 * flat and r["anon_rss_process_mib"] > 0
    json.dumps(r)   # JSON-ready
    prof = json.loads(out.read_text())
    assert prof["videos"] == 400 and prof["queries"] == 12
    assert set(prof["p50_ms"]) == {"total", "stage1", "gather", "score"}
    assert all(0 < prof["p50_ms"][k] <= prof["p99_ms"][k] for k in prof["p50_ms"])


def test_the_generator_is_deterministic_for_a_seed():
    a = bench.make_collection(50, 5, seed=3)
    b = bench.make_collection(50, 5, seed=3)
    c = bench.make_collection(50, 5, seed=4)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[0] == c[0]).all()
