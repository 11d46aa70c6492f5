"""Where one query's search time goes, on an index folder that bench_search.py wrote.

    python benchmarks/profile_search.py --index /tmp/prvr_bench_search/index_100000 [--queries 200]

bench_search.py leaves its index folders (with the queries it timed, bench_queries.npy) under its
--work folder. This opens one as bench_search does (GMMFormer v2's score, single thread), warms
the page cache the same way, then per query times the whole search (SearchIndex.search_encoded)
and, apart, its pieces: stage 1 (faiss and the shortlist's dedup), the gather of the
candidates' exact encodings from the memory maps, and the method's score on them. The
remainder of the whole (top k, the moment of the hits, the hit objects) is not timed apart.
Figures go to benchmarks/results/profile_search.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from bench_search import H, warm_page_cache  # noqa: E402
from results_io import default_out, write_results  # noqa: E402


def profile(folder: Path, n_queries: int) -> dict:
    from prvr.methods.gmmformer_v2 import GMMFormer, GMMFormerConfig
    from prvr.search.index import SearchIndex

    manifest = json.loads((folder / "manifest.json").read_text())
    torch.manual_seed(0)
    model = GMMFormer(GMMFormerConfig(visual_dim=8, text_dim=8, hidden_size=H)).eval()   # score reads no weights
    index = SearchIndex(folder, manifest, model, None, "cpu")
    q = torch.from_numpy(np.load(folder / "bench_queries.npy"))[:n_queries]
    warm_page_cache(folder)
    index.search_encoded(q[:8], 10)
    ms = {"total": [], "stage1": [], "gather": [], "score": []}

    def timed(part, fn):
        t = time.perf_counter()
        out = fn()
        ms[part].append((time.perf_counter() - t) * 1000)
        return out

    with torch.no_grad():
        for i in range(len(q)):
            qi = q[i:i + 1]
            timed("total", lambda: index.search_encoded(qi, 10))
            cand = timed("stage1", lambda: index._stage1(model.index_queries(qi), index.candidates))
            videos = timed("gather", lambda: index._videos(np.unique(cand[cand >= 0])))
            timed("score", lambda: model.score(qi, videos))
    return {"index": str(folder), "videos": manifest["n_videos"], "queries": len(q),
            "candidates": index.candidates, "threads": 1,
            "p50_ms": {k: float(np.percentile(v, 50)) for k, v in ms.items()},
            "p99_ms": {k: float(np.percentile(v, 99)) for k, v in ms.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True, help="an index folder bench_search.py wrote")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.index / "bench_queries.npy").is_file():
        print(f"{args.index}: not an index folder of bench_search.py (no bench_queries.npy)", file=sys.stderr)
        return 2
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from prvr.search import SearchError

    try:
        r = profile(args.index, args.queries)
    except SearchError as exc:   # a truncated or foreign index file: its one line
        print(exc, file=sys.stderr)
        return 2
    r["command"] = "python benchmarks/profile_search.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(r), flush=True)
    write_results(args.out or default_out("profile_search"), r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
