"""A release GMMFormer v2 checkpoint: the release's own scores and R@k vs the evaluate stage's.

    python benchmarks/release_parity.py --release /tmp/GMMFormer_v2 [--root /tmp/prvr_parity]

Under --root (outside the repository) it generates the demo corpus and writes a params.yaml
(the repository's, data_root = ROOT/data, dataset demo). The demo corpus is found where the
evaluate stage looks for a generated corpus when no data/demo/source.json exists:
data/demo/corpus/demo relative to its working directory, so it is written to
ROOT/data/demo/corpus/demo and the stage runs with ROOT as its working directory.

It builds the release's `GMMFormerV2_Net` (imported from --release, `ipdb`/`easydict`/`seaborn`
shimmed, `.cuda()` a no-op without CUDA) with the demo recipe's sizes, seeded, adds seeded
Gaussian noise to every weight (so that the scores are not those of an untrained network),
and saves it as ROOT/release.pt in the release's save_ckpt format. The release net scores the
test split on exactly the features our loaders read (frames padded to 128 slots, float masks,
as the release's loader and validations.py feed them): clip_scale_w * clip + frame_scale_w *
frame. `stages/evaluate.py --checkpoint ROOT/release.pt` then scores it with each backend.
Checks: max |release - ours| over the score matrix aligned by query and video ids < 1e-4, and
R@1/5/10/100/SumR of the release's own `cal_perf` (on -scores, ground truth from `get_gt`)
equal to the stage's JSON within 1e-9. Then prvr.search indexes the test split with the same
checkpoint, and `search_ids` answers every test query: its top-10 against the release's own
exhaustive ranking (the score matrix above), overlap and top-1 agreement >= 0.99, with stage 1
keeping 100 (the settings' default; the bar) and also 50 and 20 of
the 150 videos. Figures go to benchmarks/results/release_parity.json;
the exit status is 1 when a check fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from release_shim import EasyDict, cuda_as_noop, shim_missing
from results_io import default_out, write_results

REPO = Path(__file__).resolve().parents[1]
SCORE_TOL = 1e-4
METRIC_TOL = 1e-9
METRICS = ("r1", "r5", "r10", "r100", "sumr")
# release config keys that our loader reads (release.py _RELEASE_KEYS), and the sizes it
# builds the net with; all from our demo recipe
RELEASE_CONFIG = {"hidden_size": "hidden_size", "sft_factor": "sft_factor", "q_feat_size": "text_dim",
                  "query_input_size": "text_dim", "visual_feat_dim": "visual_dim",
                  "visual_input_size": "visual_dim", "n_heads": "n_heads", "max_desc_l": "max_query_len",
                  "input_drop": "input_drop", "drop": "drop", "initializer_range": "init_std",
                  "clip_scale_w": "clip_scale_w", "frame_scale_w": "frame_scale_w",
                  "max_ctx_l": "max_frames", "map_size": "n_clips", "margin": "margin",
                  "hard_pool_size": "hard_pool_size"}


def prepare_root(root: Path) -> Path:
    """ROOT/data/demo/corpus/demo (generated) and ROOT/params.yaml; returns the params path."""
    from prvr.data.demo import generate_corpus

    corpus = root / "data" / "demo" / "corpus"
    if not (corpus / "demo" / "TextData" / "demotest.caption.txt").is_file():
        generate_corpus(corpus, preset="demo", seed=7, progress=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params.update(dataset="demo", data_root=str(root / "data"))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def import_release(release: Path):
    """(GMMFormerV2_Net, get_gt, cal_perf) of the release checkout."""
    src = release / "src"
    if not (src / "Models" / "gmmformerV2" / "model.py").is_file():
        raise SystemExit(f"--release {release}: no src/Models/gmmformerV2/model.py there")
    shim_missing("ipdb", "easydict", "seaborn")
    cuda_as_noop()
    sys.path.insert(0, str(src))
    from Models.gmmformerV2.model import GMMFormerV2_Net
    from Validations.validations import cal_perf, get_gt

    return GMMFormerV2_Net, get_gt, cal_perf


def build_release_net(net_cls, model: dict, seed: int, noise: float):
    """The release net with our recipe's sizes, seeded, weights + N(0, noise^2), eval mode."""
    cfg = EasyDict({k: model[v] for k, v in RELEASE_CONFIG.items()})
    torch.manual_seed(seed)
    net = net_cls(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return net.eval(), cfg


def save_release_ckpt(path: Path, net, cfg: dict) -> None:
    """The release's save_ckpt format, with a plain-dict config."""
    torch.save({"config": dict(cfg), "epoch": 0, "model_val": [0, 0, 0, 0, 0],
                "state_dict": net.state_dict(), "optimizer": {}}, path)


def _pad128(frames: torch.Tensor, mask: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames zero-padded to `slots` and the float mask, as the release's loader pads them."""
    n, length, d = frames.shape
    out = frames.new_zeros(n, slots, d)
    out[:, :length] = frames
    fmask = torch.zeros(n, slots)
    fmask[:, :length] = mask.float()
    return out, fmask


@torch.no_grad()
def release_scores(net, settings: dict, root: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(scores (Q, V), query ids, video ids) of the release net on our test-split features."""
    from prvr.training import build_corpus, eval_loaders

    model = settings["model"]
    corpus_cwd = os.getcwd()
    os.chdir(root)  # the corpus is found relative to the working directory, as by the stage
    try:
        corpus = build_corpus(settings)
        vloader, qloader = eval_loaders(corpus, "test", 100, 50, 0, model)
        clips, frames, vids = [], [], []
        for b in vloader:  # batch buffers are pooled: encode before the next batch
            f, m = _pad128(b["frame_feats"], b["frame_mask"], int(model["max_frames"]))
            frame_feat, clip_feat = net.encode_context(b["clip_feats"].clone(), f, m)
            frames.append(frame_feat)
            clips.append(clip_feat)
            vids += list(b["video_ids"])
        clip_all, frame_all = torch.cat(clips), torch.cat(frames)
        rows, qids = [], []
        for b in qloader:
            c, f = net.get_pred_from_raw_query(b["query_feats"].clone(), b["query_mask"].float(), None,
                                               clip_all, frame_all)
            rows.append(model["clip_scale_w"] * c + model["frame_scale_w"] * f)
            qids += list(b["query_ids"])
    finally:
        os.chdir(corpus_cwd)
    return torch.cat(rows).numpy(), qids, vids


def run_stage(root: Path, params: Path, backend: str) -> tuple[dict, object, float]:
    """(stage JSON, ScoreResult, wall s) of stages/evaluate.py on ROOT/release.pt."""
    import json

    from prvr.evaluation import load_scores_h5

    out, scores = root / f"eval_{backend}.json", root / f"scores_{backend}.h5"
    for p in (out, scores):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "stages" / "evaluate.py"), "--checkpoint", str(root / "release.pt"),
           "--method", "gmmformer_v2", "--params", str(params), "--backend", backend, "--out", str(out),
           "--save-scores", str(scores), "--no-mlflow", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        raise RuntimeError(f"evaluate --backend {backend} exited {proc.returncode}")
    result, _ = load_scores_h5(scores)
    return json.loads(out.read_text(encoding="utf-8")), result, wall


def release_metrics(scores: np.ndarray, qids: list[str], vids: list[str], get_gt, cal_perf) -> dict:
    """R@1/5/10/100 and SumR of the release's own cal_perf on -scores."""
    _, t2v_gt = get_gt(vids, qids)
    r = [float(x) for x in cal_perf(-1 * torch.from_numpy(scores), t2v_gt)]
    return dict(zip(METRICS, r + [sum(r)]))


def aligned_diff(ref: np.ndarray, qids: list[str], vids: list[str], ours) -> float:
    """max |ref - ours| with ours' rows and columns put in ref's query / video order."""
    if sorted(qids) != sorted(ours.query_ids) or sorted(vids) != sorted(ours.video_ids):
        raise RuntimeError("the stage scored other queries or videos than the release")
    qi = {q: i for i, q in enumerate(ours.query_ids)}
    vi = {v: i for i, v in enumerate(ours.video_ids)}
    mat = ours.scores.numpy()[np.ix_([qi[q] for q in qids], [vi[v] for v in vids])]
    return float(np.abs(ref.astype(np.float64) - mat.astype(np.float64)).max())


def compare_backend(backend: str, root: Path, params: Path, ref: dict, rel_metrics: dict) -> dict:
    """One backend's figures and checks."""
    record, result, wall = run_stage(root, params, backend)
    diff = aligned_diff(ref["scores"], ref["qids"], ref["vids"], result)
    ours = {k: float(record[k]) for k in METRICS}
    mdiff = max(abs(ours[k] - rel_metrics[k]) for k in METRICS)
    ok = diff < SCORE_TOL and mdiff <= METRIC_TOL
    print(f"{backend:>9}: max |release - ours| = {diff:.3e}  R@k ours "
          + " ".join(f"{k}={ours[k]:.4f}" for k in METRICS)
          + f"  max R@k diff {mdiff:.1e}  {'PASS' if ok else 'FAIL'}  ({wall:.1f} s)", flush=True)
    return {"max_abs_score_diff": diff, "metrics": ours, "max_abs_metric_diff": mdiff,
            "n_queries": record.get("n_queries"), "n_videos": record.get("n_videos"),
            "checkpoint_kind": record.get("checkpoint_kind"), "stage_wall_s": round(wall, 2), "pass": ok}


def search_vs_release(root: Path, params: Path, ref: dict, candidates: int, k: int = 10) -> dict:
    """prvr.search over the release checkpoint (index of the test split, stage 1 keeping
    `candidates` videos) against the release's exhaustive ranking: top-k overlap and top-1
    agreement over every test query."""
    from prvr.config import load_params
    from prvr.search import build_index, open_index

    p = load_params(params)
    p["search"]["stage1"]["candidates"] = candidates
    folder = root / f"index_c{candidates}"
    t0 = time.perf_counter()
    build_index(root / "release.pt", p, "demo", "test", folder, data_dir=root / "data", progress=False)
    idx = open_index(folder)
    row = {v: i for i, v in enumerate(ref["vids"])}
    qpos = {q: i for i, q in enumerate(ref["qids"])}
    overlap, top1 = [], []
    for lo in range(0, len(ref["qids"]), 256):
        for obj in idx.search_ids(ref["qids"][lo:lo + 256], k):
            want = np.argsort(-ref["scores"][qpos[obj["query_id"]]], kind="stable")[:k]
            got = [row[h["video_id"]] for h in obj["hits"]]
            overlap.append(len(set(got) & set(want.tolist())) / k)
            top1.append(got[0] == want[0])
    return {"candidates": candidates, "videos": len(idx.video_ids), "queries": len(overlap), "k": k,
            "stage1": idx.manifest["stage1"]["kind"], "overlap_at_k": float(np.mean(overlap)),
            "min_overlap_at_k": float(np.min(overlap)), "top1_agreement": float(np.mean(top1)),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--release", type=Path, required=True, help="checkout of the public GMMFormer v2 release")
    ap.add_argument("--root", type=Path, default=Path("/tmp/prvr_parity"), help="work folder (outside the repo)")
    ap.add_argument("--seed", type=int, default=9527)
    ap.add_argument("--noise", type=float, default=0.05, help="std of the seeded noise added to every weight")
    ap.add_argument("--backends", default="reference,cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=default_out("release_parity"))
    return run(ap.parse_args(argv))


def run(args) -> int:
    torch.set_num_threads(args.threads)
    root = args.root.resolve()
    if root == REPO or REPO in root.parents:
        raise SystemExit(f"--root {root}: must lie outside the repository")
    root.mkdir(parents=True, exist_ok=True)
    from prvr.config import load_settings

    params = prepare_root(root)
    settings = load_settings(params)
    net_cls, get_gt, cal_perf = import_release(args.release)
    net, cfg = build_release_net(net_cls, settings["model"], args.seed, args.noise)
    save_release_ckpt(root / "release.pt", net, cfg)
    scores, qids, vids = release_scores(net, settings, root)
    rel = release_metrics(scores, qids, vids, get_gt, cal_perf)
    print(f"release net: seed {args.seed}, weights + N(0, {args.noise}^2) noise; {len(qids)} queries x "
          f"{len(vids)} videos, scores mean {scores.mean():.4f} std {scores.std():.4f}", flush=True)
    print("  release: " + " ".join(f"{k}={rel[k]:.4f}" for k in METRICS), flush=True)
    ref = {"scores": scores, "qids": qids, "vids": vids}
    backends = {b: compare_backend(b, root, params, ref, rel) for b in args.backends.split(",")}
    search = [search_vs_release(root, params, ref, c) for c in (100, 50, 20)]
    for r in search:
        print(f"  search (stage 1 keeps {r['candidates']} of {r['videos']} videos): top-{r['k']} overlap "
              f"{r['overlap_at_k']:.4f} (min {r['min_overlap_at_k']:.2f}), top-1 agreement {r['top1_agreement']:.4f}",
              flush=True)
    # the bar (overlap and top-1 >= 0.99) holds at the settings' candidates (100); the smaller
    # shortlists show how the figure falls as stage 1 keeps fewer videos
    ok = all(b["pass"] for b in backends.values()) and all(
        r["overlap_at_k"] >= 0.99 and r["top1_agreement"] >= 0.99 for r in search if r["candidates"] == 100)
    write_results(args.out, {
        "what": "release GMMFormer v2 checkpoint: release scores / cal_perf vs stages/evaluate.py per backend",
        "command": "python benchmarks/release_parity.py --release " + str(args.release),
        "machine": f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads",
        "root": str(root), "dataset": "demo", "split": "test", "seed": args.seed,
        "weights": f"release init (seed {args.seed}) + seeded N(0, {args.noise}^2) noise on every weight",
        "n_queries": len(qids), "n_videos": len(vids),
        "release_scores": {"mean": float(scores.mean()), "std": float(scores.std())},
        "tolerances": {"score": SCORE_TOL, "metric": METRIC_TOL},
        "release_metrics": rel, "backends": backends, "search_vs_release_exhaustive": search, "pass": ok})
    print("PASS" if ok else "FAIL: see above", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
