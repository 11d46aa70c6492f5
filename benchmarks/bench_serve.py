"""A bounded load test of `prvr serve` on loopback: N requests, C at a time, then it stops.

    python benchmarks/bench_serve.py [--requests 2000] [--concurrency 8] [--scale 1.0] [--quick]

It builds, in a temporary folder, what a demo user has after `dvc repro` and `prvr
tiny-encoder`: the demo corpus (generated), a GMMFormer v2 checkpoint at the demo recipe (seeded
random weights: the work is the figure, not the accuracy), the test split's index and a tiny
random RoBERTa encoder of the demo's text width. `prvr serve` then runs as its own process, and
the load is plain HTTP/1.1 from C client threads, one keep-alive connection each:
- requests alternate between GET /api/search?text=... (a sentence drawn from the demo's
  captions, so the encoder runs) and GET /api/search?query_id=... (a stored caption id), k=10;
- a warm-up of 100 requests first; the server's RSS (/proc/<pid>/status VmRSS) is read after
  the warm-up and after the load;
- then 200 requests one at a time: the service time without queueing;
- figures: errors (non-200 answers or failed connections), latency p50 / p99 / max per
  request (client side, whole round trip), throughput, RSS growth, and the server process's
  CPU user / sys time over the load.
Figures go to benchmarks/results/bench_serve.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from results_io import default_out, write_results  # noqa: E402


def build_demo(work: Path, scale: float) -> list[str]:
    """The demo corpus, checkpoint, index and tiny encoder under `work`; returns the test
    split's caption ids."""
    import shutil

    import torch

    from prvr.checkpoint import save_checkpoint
    from prvr.config import load_params, load_settings
    from prvr.data.demo import generate_corpus
    from prvr.data.layout import read_captions
    from prvr.methods import build_config, create_model
    from prvr.search import build_index
    from prvr.text.tiny import make_tiny_encoder

    shutil.copy2(REPO / "params.yaml", work / "params.yaml")
    generate_corpus(work / "data" / "demo" / "corpus", preset="demo", seed=7, scale=scale, progress=False)
    s = load_settings(work / "params.yaml", "demo", "gmmformer_v2")
    torch.manual_seed(0)
    save_checkpoint(work / "v2.pt", create_model("gmmformer_v2", build_config(s)), "gmmformer_v2", settings=s)
    build_index(work / "v2.pt", load_params(work / "params.yaml"), "demo", "test", work / "index",
                data_dir=work / "data", progress=False)
    text_dir = work / "data" / "demo" / "corpus" / "demo" / "TextData"
    make_tiny_encoder(work / "encoder", "roberta", int(s["text_dim"]),
                      [c[2] for c in read_captions(text_dir / "demotrain.caption.txt")])
    return [c for c in read_captions(text_dir / "demotest.caption.txt")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_s(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def start_server(work: Path, port: int, concurrency: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "prvr", "serve", "--index", "index", "--encoder", "encoder",
                             "--port", str(port), "--max-concurrency", str(max(32, 4 * concurrency))],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("prvr serve exited: " + proc.stderr.read()[-2000:])
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("prvr serve did not answer /healthz within 180 s")


def run_load(port: int, paths: list[str], concurrency: int) -> tuple[np.ndarray, int, float]:
    """(latency per request in ms, errors, wall s): `paths` shared out over `concurrency`
    threads, each with its own keep-alive connection."""
    lat = np.zeros(len(paths))
    errors = [0] * concurrency
    nxt = iter(range(len(paths)))
    lock = threading.Lock()

    def worker(w: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            t = time.perf_counter()
            try:
                conn.request("GET", paths[i])
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or b'"hits"' not in body:
                    errors[w] += 1
            except (OSError, http.client.HTTPException):
                errors[w] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            lat[i] = 1000 * (time.perf_counter() - t)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, sum(errors), time.perf_counter() - t0


def request_paths(captions: list[tuple[str, str, str]], n: int, k: int = 10, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(captions), n)
    return ["/api/search?" + urlencode({"text": captions[j][2], "k": k} if i % 2 == 0 else
                                       {"query_id": captions[j][0], "k": k}) for i, j in enumerate(pick)]


def bench(requests: int, concurrency: int, scale: float, warmup: int = 100) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        captions = build_demo(work, scale)
        setup_s = time.perf_counter() - t0
        port = _free_port()
        proc = start_server(work, port, concurrency)
        try:
            _, warm_errors, _ = run_load(port, request_paths(captions, warmup, seed=1), concurrency)
            rss_warm = _rss_kib(proc.pid)
            cpu0 = _cpu_s(proc.pid)
            lat, errors, wall = run_load(port, request_paths(captions, requests), concurrency)
            cpu1 = _cpu_s(proc.pid)
            rss_after = _rss_kib(proc.pid)
            one, one_errors, _ = run_load(port, request_paths(captions, 200, seed=2), 1)   # service time
            n_videos = json.loads((work / "index" / "manifest.json").read_text())["n_videos"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {
        "requests": requests, "concurrency": concurrency, "warmup_requests": warmup, "videos": n_videos,
        "test_captions": len(captions), "demo_scale": scale, "k": 10, "mix": "half text (encoder runs), half query_id",
        "errors": errors, "warmup_errors": warm_errors,
        "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
        "latency_max_ms": float(lat.max()), "throughput_rps": requests / wall, "wall_s": wall,
        "server_user_s": cpu1[0] - cpu0[0], "server_sys_s": cpu1[1] - cpu0[1],
        "rss_after_warmup_mib": rss_warm / 1024, "rss_after_load_mib": rss_after / 1024,
        "rss_growth": rss_after / rss_warm - 1.0, "setup_s": setup_s,
        "one_at_a_time": {"requests": 200, "errors": one_errors, "latency_p50_ms": float(np.percentile(one, 50)),
                          "latency_p99_ms": float(np.percentile(one, 99))},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0, help="demo corpus scale (1.0: the demo of dvc repro)")
    p.add_argument("--quick", action="store_true", help="200 requests on a 0.1-scale demo")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.scale = 200, 0.1
    r = bench(args.requests, args.concurrency, args.scale)
    import torch

    r["machine"] = f"torch {torch.__version__}, {os.cpu_count()} cores"
    r["command"] = "python benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{r['requests']} requests, {r['concurrency']} at a time, {r['videos']} videos: {r['errors']} errors; "
          f"p50 {r['latency_p50_ms']:.1f} ms, p99 {r['latency_p99_ms']:.1f} ms, {r['throughput_rps']:.0f} req/s; "
          f"RSS {r['rss_after_warmup_mib']:.0f} -> {r['rss_after_load_mib']:.0f} MiB ({100 * r['rss_growth']:+.1f}%)")
    write_results(Path(args.out) if args.out else default_out("bench_serve"), r)
    return 0 if r["errors"] == 0 and r["rss_growth"] <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
