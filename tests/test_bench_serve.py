"""benchmarks/bench_serve.py, small: the load runs against a real `prvr serve` process, stops
by itself, and every figure the README quotes is in its result."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

pytest.importorskip("fastapi")
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_serve as bench  # noqa: E402


def test_bounded_load_on_loopback_reports_latency_errors_and_rss(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = bench.bench(60, 4, 0.1, warmup=10)
    assert r["requests"] == 60 and r["errors"] == 0 and r["warmup_errors"] == 0
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]
    assert r["one_at_a_time"]["errors"] == 0 and r["one_at_a_time"]["latency_p50_ms"] > 0
    assert r["rss_after_warmup_mib"] > 0 and r["rss_after_load_mib"] > 0 and r["throughput_rps"] > 0
    json.dumps(r)


def test_request_mix_alternates_text_and_stored_ids():
    caps = [("v1#enc#0", "v1", "a man opens a door"), ("v2#enc#1", "v2", "a dog runs")]
    paths = bench.request_paths(caps, 6)
    assert [("text=" in p) for p in paths] == [True, False] * 3
    assert all(p.startswith("/api/search?") and "k=10" in p for p in paths)
    assert any("%23enc%23" in p for p in paths)   # '#' percent-encoded
