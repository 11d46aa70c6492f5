"""A whole evaluation of a token-level method (RAL) against GMMFormer v2, as users run it: the
evaluate stage on a TVR-shaped test split, wall / user / sys and peak RSS per run, and what the
scoring adds to the process's peak against `evaluate.memory_budget_mb`.

    python benchmarks/bench_eval_tokens.py [--test-videos 545] [--budgets 2048,256]

1. Corpus: prvr.data.demo's tvr-shaped preset (3072-d video, 768-d text, 16-140 frames, median
   60) with its test split at --test-videos videos and 5 captions each, tiny train/val splits,
   in --work (outside the repository).
2. Checkpoints: each method's network at its TVR recipe, seeded, saved in our format (random
   weights: the figure is the work, not the accuracy).
3. Runs: `python stages/evaluate.py --checkpoint ... --dataset tvr` with a params copy whose
   data_root is the corpus and whose `evaluate.memory_budget_mb` is each budget; each run a
   child process whose rusage comes from os.wait4. Runs alternate the methods.
4. Scoring growth: in a separate child per method and budget, the split is encoded (bank and
   queries), then scored with prvr.evaluation.score_matrix while a thread samples the current
   RSS every 5 ms; its rise over the RSS before scoring is the scoring's own memory (blocks,
   temporaries and the score matrix), which the budget bounds.
Figures go to benchmarks/results/bench_eval_tokens.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from results_io import default_out, write_results  # noqa: E402

METHODS = ("gmmformer_v2", "ral")


def make_corpus(work: Path, test_videos: int) -> Path:
    from prvr.data.demo import PRESETS, SplitSize, generate_corpus

    base = PRESETS["tvr-shaped"]
    preset = dataclasses.replace(base, splits={"train": SplitSize(40, 200), "val": SplitSize(20, 100),
                                               "test": SplitSize(test_videos, 5 * test_videos)})
    root = work / "VisualSearch"
    if not (root / "tvr").is_dir():
        generate_corpus(root, preset=preset, seed=11, progress=False)
    return root


def params_file(work: Path, root: Path, budget: float) -> Path:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data_root"] = str(root)
    p["dataset"] = "tvr"
    p["evaluate"]["memory_budget_mb"] = float(budget)
    p["evaluate"]["device"] = "cpu"
    out = work / f"params_{int(budget)}.yaml"
    out.write_text(yaml.safe_dump(p))
    return out


def make_checkpoint(work: Path, params: Path, method: str) -> Path:
    import torch

    from prvr.checkpoint import save_checkpoint
    from prvr.config import load_settings
    from prvr.methods import build_config, create_model

    path = work / f"{method}.pt"
    if not path.exists():
        settings = load_settings(params, "tvr", method)
        torch.manual_seed(0)
        save_checkpoint(path, create_model(method, build_config(settings)), method, settings=settings)
    return path


def run_stage(work: Path, params: Path, method: str, ckpt: Path) -> dict:
    out = work / f"{method}_{params.stem}.json"
    cmd = [sys.executable, str(REPO / "stages/evaluate.py"), "--params", str(params), "--dataset", "tvr",
           "--method", method, "--checkpoint", str(ckpt), "--out", str(out), "--no-progress", "--no-mlflow"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    log = open(work / f"{method}_{params.stem}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method}: evaluate failed; see {log.name}")
    rec = json.loads(out.read_text())
    return {"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "peak_rss_mib": ru.ru_maxrss / 1024,
            "n_queries": rec["n_queries"], "n_videos": rec["n_videos"], "sumr": rec["sumr"]}


def scoring_growth(params: Path, method: str, ckpt: Path) -> dict:
    """Child mode: encode the test split, then score it; the peak RSS before and after scoring."""
    import torch

    from prvr.checkpoint import load_model
    from prvr.config import load_settings
    from prvr.data.datasets import Corpus
    from prvr.evaluation import default_score_fn, encode_queries, encode_videos, score_matrix
    from prvr.training import eval_loaders

    settings = load_settings(params, "tvr", method)
    ev = settings["evaluate"]
    model, info = load_model(ckpt, "cpu", method=method, backend=settings["backend"])[:2]
    corpus = Corpus.from_settings(settings)
    vl, ql = eval_loaders(corpus, "test", int(ev["video_batch_size"]), int(ev["query_batch_size"]), 0,
                          info["model_config"])
    model.eval()
    with torch.no_grad():
        bank = encode_videos(model, vl, "cpu", progress=False)
        q, _, _ = encode_queries(model, ql, "cpu", progress=False)
    import gc
    import threading

    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, high, done = rss(), [0.0], threading.Event()

    def sample():   # the current RSS every 5 ms while scoring runs
        while not done.is_set():
            high[0] = max(high[0], rss())
            done.wait(0.005)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    scores = score_matrix(q, bank, default_score_fn(model), "cpu", progress=False,
                          memory_budget_mb=ev["memory_budget_mb"])
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"budget_mb": float(ev["memory_budget_mb"]), "score_s": seconds,
            "rss_before_scoring_mib": before, "rss_peak_while_scoring_mib": high[0],
            "scoring_growth_mib": high[0] - before, "score_matrix_mib": scores.numel() * 4 / 2 ** 20,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "scores": list(scores.shape)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-videos", type=int, default=545)
    ap.add_argument("--budgets", default="2048,256")
    ap.add_argument("--work", type=Path, default=Path("/tmp/prvr_bench_eval_tokens"))
    ap.add_argument("--out", type=Path, default=default_out("bench_eval_tokens"))
    ap.add_argument("--growth-child", nargs=3, metavar=("PARAMS", "METHOD", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.growth_child:
        p, m, c = args.growth_child
        print(json.dumps(scoring_growth(Path(p), m, Path(c))))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = make_corpus(args.work, args.test_videos)
    print(f"corpus {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    results = {"command": "python benchmarks/bench_eval_tokens.py " + " ".join(argv or sys.argv[1:]),
               "test_videos": args.test_videos, "runs": [], "scoring": []}
    for budget in budgets:
        params = params_file(args.work, root, budget)
        for method in METHODS:
            ckpt = make_checkpoint(args.work, params, method)
            r = {"method": method, "budget_mb": budget, **run_stage(args.work, params, method, ckpt)}
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--growth-child", str(params), method, str(ckpt)],
                                   capture_output=True, text=True, env=env, check=True, cwd=args.work)
            g = {"method": method, **json.loads(child.stdout.strip().splitlines()[-1])}
            results["scoring"].append(g)
            print(json.dumps(g), flush=True)
    results["within_budget"] = all(g["scoring_growth_mib"] <= g["budget_mb"] for g in results["scoring"])
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
