"""DVC stage `search_eval`: how the two-stage search of runs/<ds>/<m>/index/ compares with
exhaustive scoring, how fast it answers, and (where ground truth exists) how well it finds the
moment. Writes metrics/<ds>/<m>/search.json (a DVC metric; the report and MLflow read it).

    python stages/search_eval.py [--index DIR] [--out FILE] [--params params.yaml]
                                 [--dataset NAME] [--method NAME] [--no-mlflow] [--no-progress]

Over `search.eval_queries` queries of the indexed split (0: all), evenly spaced over it in split
order (the split lists a video's captions together; the first n would cover few videos):
- recall@k: the mean overlap of the search's top k with exhaustive scoring's top k, and top-1
  agreement (k = search.k);
- latency p50 / p99 (ms) of one query at a time, from its stored features to its hits (the
  query encoder included, text encoding not);
- bytes per video and the build time (the manifest's);
- moment metrics when `search.datasets.<ds>.moments_file` exists (in the collection folder or
  data_root): R@1/5/10 of the right video with IoU >= 0.3 / 0.5 / 0.7, the IoU of the moment
  found in the right video, and the chance IoU; and how many annotations matched.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from prvr.cli import setup_logging, stage_parser

log = logging.getLogger("prvr.stages.search_eval")


def evaluate_search(index, query_ids: list[str], k: int, hits: int | None = None, progress: bool = True) -> dict:
    """The recall, agreement and latency figures of `index` on `query_ids`; `results` holds each
    query's top `hits` (>= k: the moment metrics read the top 10 whatever k is)."""
    import numpy as np
    from tqdm import tqdm

    hits = max(int(hits or k), k)
    batch = index.query_features(query_ids)
    q = index.encode(batch)
    ex_scores, ex_rows = index.exhaustive(q, k)
    results = index.search_encoded(q, hits)
    where = {v: i for i, v in enumerate(index.video_ids)}
    overlap, top1 = [], []
    for i, found in enumerate(results):
        got = [where[h["video_id"]] for h in found[:k]]
        want = ex_rows[i].tolist()
        overlap.append(len(set(got) & set(want)) / max(len(want), 1))
        top1.append(bool(got) and got[0] == want[0])
    index.search_ids(query_ids[:1], k)          # warm-up: first-call set-up is not a query's latency
    times = []
    for qid in tqdm(query_ids, desc="latency", unit="query", disable=not progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        index.search_ids([qid], k)
        times.append((time.perf_counter() - t0) * 1000)
    score_gap = max((abs(h[0]["score"] - float(ex_scores[i, 0])) for i, h in enumerate(results)
                     if h and where[h[0]["video_id"]] == int(ex_rows[i, 0])), default=0.0)
    return {"queries": len(query_ids), "k": k, f"recall_at_{k}": float(np.mean(overlap)),
            "top1_agreement": float(np.mean(top1)), "latency_p50_ms": float(np.percentile(times, 50)),
            "latency_p99_ms": float(np.percentile(times, 99)), "top1_score_max_abs_diff": score_gap,
            "results": [{"query_id": qid, "hits": h} for qid, h in zip(query_ids, results)],
            "_encoded": q}


def spread(ids: list[str], n: int) -> list[str]:
    """n of `ids` evenly spaced from the first (all of them when n is 0 or covers them)."""
    if n <= 0 or n >= len(ids):
        return list(ids)
    return [ids[(i * len(ids)) // n] for i in range(n)]


def torch_threads() -> int:
    """The intra-op threads the timed searches ran with (latency depends on it)."""
    import torch

    return int(torch.get_num_threads())


def ground_truth(index, facts: dict, settings: dict):
    """(path, {caption id: (video, start, end)}, info) of the dataset's moments file, or None
    when it names none or none exists; read before any timing, so a bad file stops the stage
    at once (ValueError naming the file and line)."""
    from prvr.search.moments import read_ground_truth

    name = facts.get("moments_file")
    if not name:
        return None
    candidates = [index.corpus.collection_dir / name, Path(settings["data_root"]).expanduser() / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        log.info("no moment ground truth (%s): moment metrics skipped", " or ".join(map(str, candidates)))
        return None
    split = index.corpus.split(index.manifest["split"])
    texts = dict(zip(split.query_ids, split.texts))
    n_frames = dict(zip(index.video_ids, index.n_frames.tolist()))
    truth, info = read_ground_truth(path, texts, n_frames)
    log.info("read moment ground truth %s: %d annotations, %d matched captions", path, info["annotations"],
             info["matched"])
    return path, truth, info


def moments(index, results: list[dict], loaded, query) -> dict:
    """The moment metrics of `results` against `loaded` (ground_truth's answer)."""
    from prvr.search.moments import moment_metrics

    if loaded is None:
        return {}
    path, truth, info = loaded
    n_frames = dict(zip(index.video_ids, index.n_frames.tolist()))
    ids = [r["query_id"] for r in results]
    own_ids = [q for q in ids if q in truth and truth[q][0] in n_frames]
    own = {}
    if own_ids:
        where = {q: i for i, q in enumerate(ids)}
        spans = index.own_moments(_rows(query, [where[q] for q in own_ids]), [truth[q][0] for q in own_ids])
        own = dict(zip(own_ids, spans))
    out = moment_metrics(results, truth, own, n_frames)
    # the file's name, not where it lies on this machine: search.json is committed
    out.update({"moment_file": path.name, "moment_annotations": info["annotations"],
                "moment_matched": info["matched"]})
    if "unmatched_annotations" in info:     # TVR's: no indexed video, or no caption with that text
        out["moment_unmatched_annotations"] = info["unmatched_annotations"]
    return out


def _rows(query, pos: list[int]):
    """Rows `pos` of a query encoding (a tensor or a QueryEncoding)."""
    import torch

    from prvr.methods import QueryEncoding

    if isinstance(query, QueryEncoding):
        return QueryEncoding.cat([query[i:i + 1] for i in pos])
    return query.index_select(0, torch.tensor(pos, dtype=torch.long))


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, data_dir=True, mlflow=True)
    parser.add_argument("--index", default=None, help="index folder (default: runs/<ds>/<m>/index/)")
    parser.add_argument("--out", default=None, help="metrics file (default: metrics/<ds>/<m>/search.json)")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    from prvr import paths
    from prvr.atomic import write_json_atomic
    from prvr.checkpoint import CheckpointError
    from prvr.config import ConfigError, load_params, load_settings, search_settings
    from prvr.data.layout import DataError
    from prvr.search import SearchError, open_index
    from prvr.search.moments import KS

    try:
        params = load_params(args.params)
        settings = load_settings(args.params, args.dataset, args.method)
        ds, method = settings["dataset"], settings["method"]
        search = search_settings(params, args.params)
        folder = Path(args.index) if args.index else paths.index_dir(ds, method)
        index = open_index(folder, data_dir=args.data_dir)
        # the figures belong to what the index holds (an --index of another method or dataset
        # writes, and logs, under that method and dataset)
        ds, method = index.manifest["dataset"], index.manifest["method"]
        split = index.corpus.split(index.manifest["split"])
        ids = list(split.query_ids)
        ids = spread(ids, int(search["eval_queries"]))
        log.info("read %s (%d videos, %s), %d queries of %s", folder, index.manifest["n_videos"],
                 index.manifest["stage1"]["kind"], len(ids), index.manifest["split"])
        if not ids:
            raise SearchError(f"{folder}: split {index.manifest['split']} has no queries")
        facts = search["datasets"].get(index.manifest["dataset"]) or {}
        truth = ground_truth(index, facts, settings)
        ev = evaluate_search(index, ids, int(search["k"]), max(KS), progress=not args.no_progress)
        record = {k: v for k, v in ev.items() if not k.startswith("_") and k != "results"}
        record.update(moments(index, ev["results"], truth, ev["_encoded"]))
        m = index.manifest
        record["threads"] = torch_threads()
        record.update({"n_videos": m["n_videos"], "bytes_per_video": m["bytes_per_video"], "build_s": m["build_s"],
                       "stage1_kind": m["stage1"]["kind"], "candidates": m["stage1"]["candidates"]})
        out = Path(args.out) if args.out else paths.search_json(ds, method)
        write_json_atomic(out, record)
    except (ConfigError, DataError, CheckpointError, SearchError, ValueError, KeyError, OSError) as exc:
        print(f"search_eval: error: {exc}", file=sys.stderr)
        return 1
    if not args.no_mlflow:
        _log_mlflow(ds, method, record)
    log.info("wrote %s: recall@%d %.4f, top-1 %.4f, p50 %.2f ms, p99 %.2f ms (%.1f s)", out, record["k"],
             record[f"recall_at_{record['k']}"], record["top1_agreement"], record["latency_p50_ms"],
             record["latency_p99_ms"], time.time() - t0)
    return 0


def _log_mlflow(ds: str, method: str, record: dict) -> None:
    """The figures on the training's MLflow run (its id in run.json), prefixed search_."""
    import json

    from prvr import paths

    run = paths.run_json(ds, method)
    if not run.is_file():
        return
    run_id = json.loads(run.read_text()).get("mlflow_run_id")
    if not run_id:
        return
    from prvr.tracking import Tracker

    tracker = Tracker(ds)
    if tracker.attach(run_id):
        tracker.log_metrics({f"search_{k}": float(v) for k, v in record.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})


if __name__ == "__main__":
    sys.exit(main())
