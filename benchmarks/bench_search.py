"""Two-stage search at 10k, 30k and 100k videos against exhaustive scoring, single thread, warm.

    python benchmarks/bench_search.py [--sizes 10000,30000,100000] [--queries 200] [--quick]

Encoding 100k videos through a network would take about an hour here, so the collections are
encoded vectors drawn directly, with planted query-video relevance (random vectors would make
a recall figure meaningless):
- 2,000 topics, unit vectors in 384 dimensions;
- 200 scenes; each video: one scene with a tint; 32 clips and 16-40 frames, each the scene plus
  noise; 1-3 moments, each a topic plus an instance offset, written into a run of 2-4
  consecutive clips (and their frames);
- each query: one moment of one video, its instance vector plus noise (so several videos share
  its topic, and its own video is the best match).
The vectors are GMMFormer v2's encoding of a video (clips (32, H), frames (n, H)), scored by its
own `score` (0.7 clip + 0.3 frame); the index is prvr.search's folder (prvr.search.index.write_index_folder)
and the search prvr.search.SearchIndex, as `prvr search` runs them.

Per size: recall@10 of the search against exhaustive scoring (top-10 overlap), top-1
agreement, per-query latency p50 / p99 (one query at a time: stage 1 + the exact rerank + the
moment; query encoding excluded), exhaustive scoring's per-query latency on the same vectors
(in RAM), bytes per video and build time. Also: real encoding throughput of GMMFormer v2 (TVR
recipe, 3072-d features) through stages/index.py's build on a generated TVR-shaped split.
Targets at 100k: recall@10 >= 0.99, p50 <= 5 ms, p99 <= 20 ms, >= 5x faster than exhaustive.
Figures go to benchmarks/results/bench_search.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from results_io import default_out, write_results  # noqa: E402

H, N_CLIPS, TOPICS, SCENES = 384, 32, 2000, 200


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_collection(n_videos: int, n_queries: int, seed: int = 0):
    """(clips (V, 32, H) f32, frame rows (R, H) f32, rows per video (V,), queries (Q, H),
    the query's own video (Q,), each query's moment clips (Q, 2)), in blocks of 5,000 videos."""
    rng = np.random.default_rng(seed)

    def noise(shape, norm: float) -> np.ndarray:   # Gaussian vectors of about this norm
        return rng.standard_normal(shape).astype(np.float32) * (norm / np.sqrt(H))

    topics = _unit(noise((TOPICS, H), 1.0))
    scenes = _unit(noise((SCENES, H), 1.0))
    n_frames = rng.integers(16, 41, n_videos)
    clips = np.empty((n_videos, N_CLIPS, H), dtype=np.float32)
    frames = np.empty((int(n_frames.sum()), H), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(n_frames)])
    q_video = rng.choice(n_videos, n_queries, replace=n_queries > n_videos)
    q_moment = np.zeros((n_queries, H), dtype=np.float32)
    q_span = np.zeros((n_queries, 2), dtype=np.int64)
    wanted = {int(v): i for i, v in enumerate(q_video)}
    for lo in range(0, n_videos, 5000):
        hi = min(lo + 5000, n_videos)
        b = hi - lo
        # background: the video's scene (one of SCENES) with a per-video tint and per-clip noise
        scene = scenes[rng.integers(0, SCENES, b)] + noise((b, H), 0.5)
        c = scene[:, None, :] + noise((b, N_CLIPS, H), 0.6)
        k = rng.integers(1, 4, b)
        for m in range(3):   # up to 3 moments per video, each 2-4 consecutive clips
            topic = topics[rng.integers(0, TOPICS, b)]
            inst = _unit(topic + _unit(noise((b, H), 1.0)) * 0.5)
            start = rng.integers(0, N_CLIPS - 4, b)
            width = rng.integers(2, 5, b)
            for j in np.nonzero(k > m)[0]:   # the generator's own loop: data, not the search
                s, w = int(start[j]), int(width[j])
                c[j, s:s + w] = inst[j] * 1.5 + noise((w, H), 0.6)
                if lo + j in wanted and m == 0:
                    q_moment[wanted[lo + j]] = inst[j]
                    q_span[wanted[lo + j]] = (s, s + w)
        clips[lo:hi] = c
        for j in range(b):   # frames: the clips resampled to the video's frame count, plus noise
            n = int(n_frames[lo + j])
            src = np.minimum((np.arange(n) * N_CLIPS) // n, N_CLIPS - 1)
            frames[offsets[lo + j]:offsets[lo + j + 1]] = c[j, src] + noise((n, H), 0.3)
    queries = _unit(q_moment + _unit(noise((n_queries, H), 1.0)) * 0.4)
    return clips, frames, n_frames, queries.astype(np.float32), q_video, q_span


def run_size(n_videos: int, n_queries: int, work: Path, candidates: int, nprobe: int, kind: str = "auto") -> dict:
    from prvr.methods.gmmformer_v2 import GMMFormer, GMMFormerConfig
    from prvr.search.index import SearchIndex, write_index_folder

    t0 = time.perf_counter()
    clips, frames, n_frames, queries, q_video, _ = make_collection(n_videos, n_queries, seed=n_videos)
    gen_s = time.perf_counter() - t0
    ids = [f"v{i:06d}" for i in range(n_videos)]
    vecs = _unit(clips.reshape(-1, H)).astype(np.float16)
    vec_video = np.repeat(np.arange(n_videos, dtype=np.int32), N_CLIPS)
    folder = work / f"index_{n_videos}"
    t1 = time.perf_counter()
    manifest = write_index_folder(folder, ids, n_frames, vecs, vec_video, {"clips": clips}, (frames, n_frames),
                                  {"kind": kind, "candidates": candidates, "nprobe": nprobe},
                                  {"method": "gmmformer_v2", "dataset": "synthetic", "split": "test"})
    build_s = time.perf_counter() - t1
    del vecs, clips, frames   # the index folder holds them now
    torch.manual_seed(0)
    model = GMMFormer(GMMFormerConfig(visual_dim=8, text_dim=8, hidden_size=H)).eval()   # score reads no weights
    index = SearchIndex(folder, manifest, model, None, "cpu")
    q = torch.from_numpy(queries)
    # the search first, warm: the folder's memory-mapped files read once into the page cache
    # (as a running service has them), then faiss and torch's first calls made
    warm_page_cache(folder)
    index.search_encoded(q[:8], 10)
    hits, lat = [], []
    for i in range(n_queries):
        t = time.perf_counter()
        hits.append(index.search_encoded(q[i:i + 1], 10)[0])
        lat.append((time.perf_counter() - t) * 1000)
    # then exhaustive: every video scored, the bank read into RAM (held only from here on, so
    # it does not push the search's pages out of the cache while the search is timed)
    t2 = time.perf_counter()
    ex_scores, ex_rows = index.exhaustive(q, 10)
    ex_total = time.perf_counter() - t2
    ex_one = []
    for i in range(min(5, n_queries)):   # one query at a time, as a user waits for it
        t = time.perf_counter()
        index.exhaustive(q[i:i + 1], 10)
        ex_one.append((time.perf_counter() - t) * 1000)
    del index   # and with it the exhaustive bank, before the memory child below runs
    where = {v: i for i, v in enumerate(ids)}
    overlap = [len({where[h["video_id"]] for h in hits[i]} & set(ex_rows[i].tolist())) / 10 for i in range(n_queries)]
    top1 = [bool(hits[i]) and where[hits[i][0]["video_id"]] == int(ex_rows[i, 0]) for i in range(n_queries)]
    own = [where[hits[i][0]["video_id"]] == int(q_video[i]) for i in range(n_queries)]
    res = {"videos": n_videos, "queries": n_queries, "vectors": manifest["n_vectors"],
           "stage1_kind": manifest["stage1"]["kind"], "candidates": candidates, "nprobe": nprobe,
           "recall_at_10": float(np.mean(overlap)), "top1_agreement": float(np.mean(top1)),
           "top1_is_planted_video": float(np.mean(own)),
           "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
           "exhaustive_one_query_ms": float(np.median(ex_one)),
           "exhaustive_batch_per_query_ms": ex_total * 1000 / n_queries,
           "bytes_per_video": manifest["bytes_per_video"], "build_s": build_s, "generate_s": gen_s,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    res["speedup_vs_exhaustive_p50"] = res["exhaustive_one_query_ms"] / res["latency_p50_ms"]
    np.save(folder / "bench_queries.npy", queries)
    res.update(search_anon_rss(folder, n_videos))
    return res


def warm_page_cache(folder: Path) -> None:
    """Read every file of the index folder once, so its memory maps are served from the page cache."""
    for f in sorted(folder.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _anon_rss() -> int:
    """This process's anonymous resident bytes (file-backed pages, the memory maps, excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon (Linux only)")


def search_anon_rss(folder: Path, n_videos: int) -> dict:
    """The search's own anonymous memory: a fresh process (one thread) imports everything and
    builds the model, then opens the index folder and answers the saved queries; the growth of
    RssAnon between the two, per video, is what the index costs in RAM."""
    import subprocess

    got = subprocess.run([sys.executable, __file__, "--measure-rss", str(folder)], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    r = json.loads(got)
    return {"anon_rss_index_bytes": r["grown"], "anon_rss_bytes_per_video": r["grown"] / n_videos,
            "anon_rss_process_mib": r["after"] / 2 ** 20}


def _measure_rss(folder: Path) -> None:
    import faiss

    from prvr.methods.gmmformer_v2 import GMMFormer, GMMFormerConfig
    from prvr.search.index import SearchIndex

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    torch.manual_seed(0)
    model = GMMFormer(GMMFormerConfig(visual_dim=8, text_dim=8, hidden_size=H)).eval()
    q = torch.from_numpy(np.load(folder / "bench_queries.npy"))
    model.score(q[:1], _toy_videos())   # torch's own first-call allocations, before the baseline
    before = _anon_rss()
    index = SearchIndex(folder, json.loads((folder / "manifest.json").read_text()), model, None, "cpu")
    for i in range(len(q)):
        index.search_encoded(q[i:i + 1], 10)
    after = _anon_rss()
    print(json.dumps({"before": before, "after": after, "grown": after - before}))


def _toy_videos():
    from prvr.methods import VideoEncoding

    clips = torch.nn.functional.normalize(torch.randn(4, N_CLIPS, H), dim=-1)
    frames = torch.nn.functional.normalize(torch.randn(4, 8, H), dim=-1)
    return VideoEncoding({"clips": clips}, frames, torch.ones(4, 8, dtype=torch.bool))


def encoding_throughput(work: Path, videos: int) -> dict:
    """Real videos through GMMFormer v2 (TVR recipe): build_index on a generated TVR-shaped split."""
    import dataclasses
    import os

    import yaml

    from prvr.checkpoint import save_checkpoint
    from prvr.config import load_settings
    from prvr.data.demo import PRESETS, SplitSize, generate_corpus
    from prvr.methods import build_config, create_model
    from prvr.search import build_index

    root = work / "VisualSearch"
    preset = dataclasses.replace(PRESETS["tvr-shaped"], splits={"train": SplitSize(20, 100), "val": SplitSize(10, 50),
                                                                "test": SplitSize(videos, 5 * videos)})
    if not (root / "tvr").is_dir():
        generate_corpus(root, preset=preset, seed=3, progress=False)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p.update(data_root=str(root), dataset="tvr")
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    s = load_settings(work / "params.yaml", "tvr", "gmmformer_v2")
    torch.manual_seed(0)
    ckpt = work / "v2_tvr.pt"
    save_checkpoint(ckpt, create_model("gmmformer_v2", build_config(s)), "gmmformer_v2", settings=s)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        m = build_index(ckpt, p, "tvr", "test", work / "index_tvr", progress=False)
    finally:
        os.chdir(cwd)
    return {"videos": m["n_videos"], "build_s": m["build_s"], "videos_per_s": m["n_videos"] / m["build_s"],
            "bytes_per_video": m["bytes_per_video"], "backend": s["backend"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--kind", default="auto", help="stage-1 index: auto | flat | hnsw | ivfpq")
    ap.add_argument("--encode-videos", type=int, default=300, help="real encoding throughput on this many videos (0: skip)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2,000 videos, 30 queries, no encoding")
    ap.add_argument("--work", type=Path, default=Path("/tmp/prvr_bench_search"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--measure-rss", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_rss is not None:   # the child of search_anon_rss
        _measure_rss(args.measure_rss)
        return 0
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    sizes = [2000] if args.quick else [int(x) for x in args.sizes.split(",")]
    queries = 30 if args.quick else args.queries
    args.work.mkdir(parents=True, exist_ok=True)
    out = {"command": "python benchmarks/bench_search.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "threads": 1, "sizes": []}
    for n in sizes:
        r = run_size(n, queries, args.work, args.candidates, args.nprobe, args.kind)
        out["sizes"].append(r)
        print(json.dumps(r), flush=True)
    if args.encode_videos and not args.quick:
        torch.set_num_threads(2)
        out["encoding"] = encoding_throughput(args.work, args.encode_videos)
        print(json.dumps(out["encoding"]), flush=True)
    big = out["sizes"][-1]
    out["targets"] = {"recall_at_10>=0.99": big["recall_at_10"] >= 0.99, "p50<=5ms": big["latency_p50_ms"] <= 5,
                      "p99<=20ms": big["latency_p99_ms"] <= 20, "5x_vs_exhaustive": big["speedup_vs_exhaustive_p50"] >= 5,
                      "anon_rss<=35KB/video": big["anon_rss_bytes_per_video"] <= 35_000}
    write_results(args.out or (args.work / "quick.json" if args.quick else default_out("bench_search")), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
