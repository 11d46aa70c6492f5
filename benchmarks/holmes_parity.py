"""Holmes against its public release: scores, each loss term, and the training step's speed.

    python benchmarks/holmes_parity.py --release /tmp/Holmes [--videos 128] [--reps 5]

`--release` is a checkout of github lijun2005/ICML26-Holmes (the folder holding
src/Models/holmes); its model, loss and BertAdam are imported from there as they are, with
`ipdb`/`easydict` shimmed when missing and `.cuda()` made a no-op without CUDA. Nothing of the
release is needed without the flag, and nothing of it is copied here.

1. Weights: our network (TVR recipe: 3072-d video, 768-d text, hidden 384), initialised with a
   seed and perturbed, is written as a checkpoint in the release's `save_ckpt` format (its
   config is the release's own src/Configs/tvr.py). Ours loads it through prvr.checkpoint
   (weights_only, the allow-list); the release's network loads its state_dict.
2. Scores: a generated TVR-sized batch (B videos, 1-8 captions of 8-30 tokens each, 20-128
   frames), the release's evaluation path (encode_context, get_pred_from_raw_query, 0.6 / 0.4)
   against ours (encode_videos, encode_queries, score). Tolerance 1e-4.
3. Loss terms, dropout off, in the four states (warm-up or not, x hard negatives or not): the
   release's total, and each term read off its sub-modules (forward hooks on the NCE, QDL and
   EDL modules, a wrapper of its triplet method), against ours. Random draws pinned: the
   release's `torch.randint` calls are answered, in its call order (frame triplet first), with
   the ranks our generator draws (clip triplet first). Tolerance 1e-4 relative; the release's
   weighted sum of its terms is checked against its total.
4. Speed: one training step (forward, loss after the warm-up with hard negatives, backward,
   optimiser step), as each is run by its users: the release's network, loss and BertAdam in a
   plain interpreter; ours (each backend) through the train stage's objects in a process with
   the train stage's CPU start-up environment. One process per implementation and round, the
   rounds alternating; min and median over all steps.
Figures go to benchmarks/results/holmes_parity.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_train_step import machine_info, make_batch
from release_shim import cuda_as_noop, shim_missing
from results_io import default_out, write_results
from prvr.checkpoint import load_model
from prvr.losses import uniform_ranks
from prvr.methods import get_method
from prvr.methods.holmes import HolmesConfig
from prvr.methods.holmes.release import to_release
from prvr.optim import build_optimizer

METHOD = get_method("holmes")
SCORE_TOL, TERM_TOL = 1e-4, 1e-4
TVR_OPTIM = dict(lr=3e-4, weight_decay=0.01, warmup_proportion=0.01, grad_clip_norm=1.0)


def import_release(root: Path):
    src = root / "src"
    if not (src / "Models" / "holmes" / "model.py").is_file():
        raise SystemExit(f"--release {root}: no src/Models/holmes/model.py there")
    shim_missing("ipdb", "easydict")
    cuda_as_noop()
    sys.path.insert(0, str(src))
    from Losses.loss import loss as ReleaseLoss
    from Models.builder import get_models
    from Opts.optimization import BertAdam

    spec = importlib.util.spec_from_file_location("holmes_tvr_cfg", src / "Configs" / "tvr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_cfg_defaults(), get_models, ReleaseLoss, BertAdam


def release_batch(batch: dict) -> dict:
    return {"clip_video_features": batch["clip_feats"], "frame_video_features": batch["frame_feats"],
            "videos_mask": batch["frame_mask"].float(), "text_feat": batch["query_feats"],
            "text_mask": batch["query_mask"].float(), "text_labels": batch["query_labels"].tolist()}


def our_config(rcfg: dict) -> HolmesConfig:
    from prvr.methods.holmes.release import RELEASE_KEYS
    from prvr.methods.gmmformer_v2.release import config_from_release

    return config_from_release(rcfg, HolmesConfig(), RELEASE_KEYS)


def write_release_checkpoint(path: Path, cfg: HolmesConfig, rcfg: dict, seed: int, noise: float) -> None:
    torch.manual_seed(seed)
    net = METHOD.build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn_like(p))
    torch.save({"config": rcfg, "epoch": 7, "model_val": [1.0, 2.0, 3.0, 4.0, 10.0, None],
                "state_dict": to_release(net.state_dict(), cfg), "optimizer": {}}, path)


# ------------------------------------------------------------------------------ scores

def compare_scores(ours, rel, batch: dict, rcfg: dict) -> dict:
    with torch.no_grad():
        rb = release_batch(batch)
        frames, clips = rel.encode_context(rb["clip_video_features"], rb["frame_video_features"], rb["videos_mask"])
        c, f = rel.get_pred_from_raw_query(rb["text_feat"], rb["text_mask"], None, clips, frames)
        rel_score = rcfg["clip_scale_w"] * c + rcfg["frame_scale_w"] * f
        ours_score = ours.score(ours.encode_queries(batch), ours.encode_videos(batch))["score"]
    diff = float((rel_score - ours_score).abs().max())
    return {"shape": list(rel_score.shape), "max_abs_diff": diff, "ok": diff <= SCORE_TOL}


# ------------------------------------------------------------------------------ loss terms

class ReleaseTerms:
    """The release loss's terms, read off its sub-modules while it runs."""

    HOOKED = {"clip_nce_criterion": "clip_nce", "video_nce_criterion": "frame_nce", "qdl": "qdl",
              "frame_eld_loss": "edl_frame", "clip_eld_loss": "edl_clip", "combine_eld_loss": "edl_fused",
              "intra_video_edl_loss": "edl_intra"}

    def __init__(self, criterion):
        self.criterion, self.seen = criterion, {}
        for attr, term in self.HOOKED.items():
            getattr(criterion, attr).register_forward_hook(self._hook(term))
        triplet = criterion.get_clip_triplet_loss
        order = iter(())

        def wrapped(scores, labels):
            value = triplet(scores, labels)
            self.seen[next(self.trip_names)] = float(value)
            return value
        self.trip_names = order
        criterion.get_clip_triplet_loss = wrapped

    def _hook(self, term):
        def hook(module, args, output):
            self.seen[term] = float(output[0] if isinstance(output, tuple) else output)
        return hook

    def __call__(self, input_list, batch) -> tuple[dict, float]:
        self.seen = {"edl_intra": 0.0}
        self.trip_names = iter(("frame_trip", "clip_trip"))   # the release's order
        total = float(self.criterion(input_list, batch))
        return dict(self.seen), total


def our_ranks(seed: int, n_q: int, labels: torch.Tensor, n_v: int, hard: bool, pool: int) -> dict:
    """The ranks our loss draws (clip triplet, then frame; t2v then v2t each), by replaying the
    generator as prvr.losses does."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels, minlength=n_v)
    out = {}
    for view in ("clip", "frame"):
        t2v_pool = min(pool, n_v - 1) if hard else n_v - 1
        t2v = 1 + uniform_ranks(torch.full((n_q,), t2v_pool), g)
        v2t = None if hard else uniform_ranks(n_q - counts, g)
        out[view] = (t2v, v2t)
    return out


@contextlib.contextmanager
def pinned_randint(ranks: dict, order: tuple = ("frame", "clip")):
    """torch.randint answering the release's calls: per view (in the release's `order`) the B
    v2t draws of size (1,) (random mode only), then the t2v draw of size (Nq,)."""
    queue = []
    for view in order:
        t2v, v2t = ranks[view]
        if v2t is not None:
            queue += [v.view(1) for v in v2t]
        queue.append(t2v)
    real = torch.randint

    def fake(low, high=None, size=None, **kw):
        value = queue.pop(0)
        if tuple(value.shape) != tuple(size):
            raise AssertionError(f"release drew size {size}, pinned {tuple(value.shape)}")
        lo, hi = (0, low) if high is None else (low, high)
        if not bool(((value >= lo) & (value < hi)).all()):
            raise AssertionError(f"pinned rank outside the release's range [{lo}, {hi})")
        return value.clone()
    torch.randint = fake
    try:
        yield
    finally:
        torch.randint = real
    if queue:
        raise AssertionError(f"{len(queue)} pinned draws left unused")


def compare_terms(ours, loss, rel, terms, batch: dict, rcfg: dict, seed: int) -> list[dict]:
    rows = []
    labels = batch["query_labels"]
    with torch.no_grad():
        out = ours(batch)
        rel_input = rel(release_batch(batch))
    w = loss.weights
    for warm in (False, True):
        for hard in (False, True):
            loss.after_warmup = warm
            mine = loss(out, labels, hard, torch.Generator().manual_seed(seed))
            terms.criterion.cfg["warmup_end"], terms.criterion.cfg["use_hard_negative"] = warm, hard
            ranks = our_ranks(seed, len(labels), labels, batch["clip_feats"].shape[0], hard, loss.hard_pool_size)
            with torch.no_grad(), pinned_randint(ranks):
                seen, total = terms(rel_input, release_batch(batch))
            lf = rcfg["loss_factor"]
            rel_sum = (lf[0] * seen["clip_nce"] + seen["clip_trip"] + lf[1] * seen["frame_nce"] + seen["frame_trip"]
                       + lf[2] * seen["qdl"] + lf[4] * (seen["edl_frame"] + seen["edl_clip"] + seen["edl_fused"])
                       + (lf[3] * seen["edl_intra"] if warm else 0.0))
            rel_terms = {**seen, "total": total}
            rel_err = {t: abs(float(mine[t]) - v) / max(abs(v), 1e-12) for t, v in rel_terms.items()}
            rows.append({"after_warmup": warm, "hard_negatives": hard,
                         "release": rel_terms, "ours": {t: float(mine[t]) for t in rel_terms},
                         "relative_diff": rel_err, "max_relative_diff": max(rel_err.values()),
                         "release_sum_of_terms_vs_total": abs(rel_sum - total) / abs(total),
                         "weights": {k: float(v) for k, v in w.items()},
                         "ok": max(rel_err.values()) <= TERM_TOL and abs(rel_sum - total) <= 1e-5 * abs(total)})
    loss.after_warmup = False
    return rows


# ------------------------------------------------------------------------------ speed

def _steps(step, reps: int, warmup: int) -> dict:
    times = []
    for i in range(warmup + reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    import resource

    return {"min_s": min(t for t, _ in times), "median_s": statistics.median(t for t, _ in times),
            "cpu_median_s": statistics.median(c for _, c in times), "reps": len(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ours_step_fn(cfg: HolmesConfig, ckpt: Path, batch: dict, seed: int, backend: str):
    """Our training step as the train stage runs it: the network on `backend`, the loss after
    the warm-up with hard negatives, the optimiser of the train stage."""
    model = load_model(ckpt, method="holmes", backend=backend)[0].train()
    if backend == "cpu":   # as the train stage does for the CPU backend (params.yaml cpu.numpy_blas)
        from prvr.backends.cpu.kernels import configure_blas

        print("BLAS:", configure_blas(True), file=sys.stderr)
    loss = METHOD.build_loss(cfg)
    METHOD.start_epoch(model, loss, cfg.warmup_epoch)
    opt = build_optimizer(METHOD.param_groups(model, 0.01), TVR_OPTIM, t_total=10_000)
    gen = torch.Generator().manual_seed(seed)

    def step():
        terms = loss(model(batch), batch["query_labels"], True, gen)
        opt.zero_grad(set_to_none=False)
        terms["total"].backward()
        opt.step()
    return step


def release_step_fn(rel_parts, ckpt: Path, batch: dict):
    """The release's training step as its main.py runs it: its network, loss and BertAdam."""
    rcfg, get_models, ReleaseLoss, BertAdam = rel_parts
    rel = get_models(rcfg)
    rel.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    rel.train()
    crit = ReleaseLoss(dict(rcfg, warmup_end=True, use_hard_negative=True))
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    named = list(rel.named_parameters())
    groups = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    ropt = BertAdam(groups, lr=TVR_OPTIM["lr"], weight_decay=0.01, warmup=0.01, t_total=10_000,
                    schedule="warmup_linear")
    rb = release_batch(batch)

    def step():
        total = crit(rel(rb), rb)
        ropt.zero_grad()
        total.backward()
        ropt.step()
    return step


def speed(args) -> dict:
    """Each implementation timed in its own process, as its users start it: ours with the train
    stage's start-up environment for the CPU backend (prvr.procenv: preloaded allocator, short
    thread waits), the release as a plain interpreter. Rounds alternate ours and the release
    so that both see the same machine load."""
    import json
    import os
    import subprocess

    from prvr.procenv import allocator_env_needed, thread_env_needed

    plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",)}
    envs = {"release": plain}
    for backend in args.backends.split(","):
        envs[backend] = {**plain, **allocator_env_needed(plain), **thread_env_needed(plain)}
    rounds: dict[str, list] = {name: [] for name in envs}
    for _ in range(args.rounds):
        for name, env in envs.items():
            cmd = [sys.executable, __file__, "--release", str(args.release), "--videos", str(args.videos),
                   "--reps", str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--seed", str(args.seed), "--work", str(args.work), "--time-one", name]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rounds[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {name}: {rounds[name][-1]}", flush=True)
    res = {}
    for name, rs in rounds.items():
        res[name] = {"min_s": min(r["min_s"] for r in rs),
                     "median_s": statistics.median(r["median_s"] for r in rs),
                     "cpu_median_s": statistics.median(r["cpu_median_s"] for r in rs),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "steps": sum(r["reps"] for r in rs),
                     "environment": {k: v for k, v in envs[name].items() if k not in plain or plain[k] != v}}
    for name in envs:
        if name != "release":
            res[f"speedup_{name}_min"] = res["release"]["min_s"] / res[name]["min_s"]
            res[f"speedup_{name}_median"] = res["release"]["median_s"] / res[name]["median_s"]
    return res


def time_one(args, cfg, parts, ckpt: Path, batch: dict) -> int:
    import json

    if args.time_one == "release":
        step = release_step_fn(parts, ckpt, batch)
    else:
        step = ours_step_fn(cfg, ckpt, batch, args.seed, args.time_one)
    torch.manual_seed(args.seed)
    print(json.dumps(_steps(step, args.reps, args.warmup)), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--release", type=Path, required=True, help="a checkout of lijun2005/ICML26-Holmes")
    ap.add_argument("--videos", type=int, default=128, help="videos in the generated batch")
    ap.add_argument("--reps", type=int, default=5, help="timed training steps per implementation")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/prvr_holmes_parity"), help="work folder (outside the repo)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="timing processes per implementation")
    ap.add_argument("--backends", default="cpu,reference", help="our backends to time")
    ap.add_argument("--time-one", choices=["release", "cpu", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=default_out("holmes_parity"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = import_release(args.release)
    rcfg, get_models = parts[0], parts[1]
    rcfg = dict(rcfg, use_hard_negative=False, warmup_end=False)
    cfg = our_config(rcfg)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "best.ckpt"
    if args.time_one:
        return time_one(args, cfg, parts, ckpt, make_batch(args.videos, cfg, args.seed + 1))
    write_release_checkpoint(ckpt, cfg, rcfg, args.seed, noise=0.02)
    ours = load_model(ckpt, method="holmes")[0].eval()
    rel = get_models(rcfg)
    rel.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    rel.eval()
    batch = make_batch(args.videos, cfg, args.seed + 1)
    result = {"command": "python benchmarks/holmes_parity.py --release " + str(args.release),
              "machine": machine_info(torch.device("cpu")), "videos": args.videos,
              "queries": len(batch["query_labels"]), "config": dataclasses.asdict(cfg)}
    result["scores"] = compare_scores(ours, rel, batch, rcfg)
    print("scores:", result["scores"], flush=True)
    crit = parts[2](dict(rcfg))
    loss = METHOD.build_loss(cfg)
    result["loss_terms"] = compare_terms(ours, loss, rel, ReleaseTerms(crit), batch, rcfg, args.seed)
    for row in result["loss_terms"]:
        print(f"warm-up over {row['after_warmup']!s:5} hard {row['hard_negatives']!s:5}: max relative diff "
              f"{row['max_relative_diff']:.2e}, release sum vs total {row['release_sum_of_terms_vs_total']:.1e}",
              flush=True)
    if not args.no_speed:
        result["speed"] = s = speed(args)
        for name in args.backends.split(","):
            print(f"train step: ours ({name}) min {s[name]['min_s']:.3f} s median {s[name]['median_s']:.3f} s | "
                  f"release min {s['release']['min_s']:.3f} s median {s['release']['median_s']:.3f} s | "
                  f"x{s[f'speedup_{name}_min']:.2f} (min), x{s[f'speedup_{name}_median']:.2f} (median)", flush=True)
    result["ok"] = result["scores"]["ok"] and all(r["ok"] for r in result["loss_terms"])
    write_results(args.out, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
