"""RAL and Holmes-DQ (the token-level query methods) against their public releases: scores,
each loss term, and the training step's speed.

    python benchmarks/token_parity.py --method ral --release /tmp/RAL-PRVR [--videos 128]
    python benchmarks/token_parity.py --method holmes_dq --release /tmp/ICML26-Holmes

`--release` is a checkout of github zhanglong-ustc/RAL-PRVR (its src/) or of
lijun2005/ICML26-Holmes (its multisrc/); the model, loss and BertAdam are imported from there as
they are (`ipdb`/`easydict` shimmed when missing, `.cuda()` a no-op without CUDA). Nothing of
either release is copied here. The steps are those of benchmarks/holmes_parity.py:

1. Weights: our network with the release's TVR config (3072-d video, 768-d text, hidden 384),
   seeded and perturbed, written as a release-format checkpoint; ours loads it through
   prvr.checkpoint (weights_only), the release's network its state_dict.
2. Scores on a generated TVR-sized batch, the release's evaluation path against ours
   (encode_videos, encode_queries -> QueryEncoding, score). Tolerance 1e-4.
3. Loss terms, dropout off, with and without hard negatives (and for Holmes-DQ in both phases):
   each term read off the release's sub-modules against ours; random draws pinned (the
   triplet ranks replayed from our generator; RAL's Gaussian noise drawn once and handed to
   both, text then video as the release draws it). Tolerance 1e-4 relative; the release's
   weighted sum of its terms is checked against its total.
4. Speed: one training step each, as its users run it, one process per implementation and
   round, rounds alternating; min and median over all steps, CPU time and peak RSS beside.
Figures go to benchmarks/results/<method>_parity.json.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_train_step import machine_info, make_batch
from holmes_parity import ReleaseTerms, _steps, our_ranks, pinned_randint
from release_shim import cuda_as_noop, shim_missing
from results_io import default_out, write_results
from prvr.checkpoint import load_model
from prvr.methods import get_method
from prvr.methods.gmmformer_v2.release import config_from_release
from prvr.optim import build_optimizer

SCORE_TOL, TERM_TOL = 1e-4, 1e-4
TVR_OPTIM = dict(lr=3e-4, weight_decay=0.01, warmup_proportion=0.01, grad_clip_norm=1.0)
LAYOUT = {"ral": ("src", "Models/RAL4gmmv2/model.py"), "holmes_dq": ("multisrc", "Models/holmes/model.py")}


def import_release(root: Path, method: str, work: Path):
    sub, model_file = LAYOUT[method]
    src = root / sub
    if not (src / model_file).is_file():
        raise SystemExit(f"--release {root}: no {sub}/{model_file} there")
    shim_missing("ipdb", "easydict")
    cuda_as_noop()
    sys.path.insert(0, str(src))
    from Losses.loss import loss as ReleaseLoss
    from Models.builder import get_models
    from Opts.optimization import BertAdam

    spec = importlib.util.spec_from_file_location(f"{method}_tvr_cfg", src / "Configs" / "tvr.py")
    mod = importlib.util.module_from_spec(spec)
    here = os.getcwd()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)   # the release's config makes its results folders where it runs
    try:
        spec.loader.exec_module(mod)
        cfg = mod.get_cfg_defaults()
    finally:
        os.chdir(here)
    return cfg, get_models, ReleaseLoss, BertAdam


def release_keys(method: str):
    if method == "ral":
        from prvr.methods.ral.release import RELEASE_KEYS
    else:
        from prvr.methods.holmes_dq.release import RELEASE_KEYS
    return RELEASE_KEYS


def to_release(method: str, sd, cfg):
    if method == "ral":
        from prvr.methods.ral.release import to_release as f
    else:
        from prvr.methods.holmes_dq.release import to_release as f
    return f(sd, cfg)


def release_batch(batch: dict, slots: int = 128) -> dict:
    """The release's batch: its collate pads every video's frames to max_ctx_l (128) slots."""
    pad = slots - batch["frame_feats"].shape[1]
    return {"clip_video_features": batch["clip_feats"],
            "frame_video_features": F.pad(batch["frame_feats"], (0, 0, 0, pad)),
            "videos_mask": F.pad(batch["frame_mask"].float(), (0, pad)), "text_feat": batch["query_feats"],
            "text_mask": batch["query_mask"].float(), "text_labels": batch["query_labels"].tolist()}


def write_release_checkpoint(method: str, path: Path, cfg, rcfg: dict, seed: int, noise: float) -> None:
    torch.manual_seed(seed)
    net = get_method(method).build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn_like(p))
    torch.save({"config": rcfg, "epoch": 7, "model_val": [1.0, 2.0, 3.0, 4.0, 10.0, None],
                "state_dict": to_release(method, net.state_dict(), cfg), "optimizer": {}}, path)


def compare_scores(ours, rel, batch: dict, rcfg: dict) -> dict:
    with torch.no_grad():
        rb = release_batch(batch)
        frames, clips = rel.encode_context(rb["clip_video_features"], rb["frame_video_features"], rb["videos_mask"])
        mask = F.pad(rb["videos_mask"], (0, frames.shape[1] - rb["videos_mask"].shape[1]))
        c, f = rel.get_pred_from_raw_query(rb["text_feat"], rb["text_mask"], None, clips, frames, mask)
        rel_score = rcfg["clip_scale_w"] * c + rcfg["frame_scale_w"] * f
        ours_score = ours.score(ours.encode_queries(batch), ours.encode_videos(batch))["score"]
    diff = float((rel_score - ours_score).abs().max())
    return {"shape": list(rel_score.shape), "max_abs_diff": diff, "ok": diff <= SCORE_TOL}


@contextlib.contextmanager
def pinned_gaussians(method: str, ours, noise: list[torch.Tensor]):
    """RAL: the release's sample_gaussian_tensors and our model's `noise` both answer with
    `noise` (text, then video), in call order."""
    if method != "ral":
        yield
        return
    import Models.RAL4gmmv2.model as rel_model

    real_release, real_ours = rel_model.sample_gaussian_tensors, ours.noise
    queue_r, queue_o = list(noise), list(noise)

    def release_sample(mu, logsigma, n):
        eps = queue_r.pop(0)
        return eps.mul(torch.exp(logsigma.unsqueeze(1))).add_(mu.unsqueeze(1))
    rel_model.sample_gaussian_tensors = release_sample
    ours.noise = lambda n, like: queue_o.pop(0)
    try:
        yield
    finally:
        rel_model.sample_gaussian_tensors, ours.noise = real_release, real_ours


class RALTerms:
    """RAL's release loss: its total, and each term read off its sub-modules (the NCE and QDL
    modules' outputs, its triplet method) and off its model's output list (the matching term,
    and the unweighted MIL and KL terms)."""

    def __init__(self, criterion):
        self.criterion = criterion
        for attr, term in {"clip_nce_criterion": "clip_nce", "video_nce_criterion": "frame_nce",
                           "qdl": "qdl"}.items():
            getattr(criterion, attr).register_forward_hook(self._hook(term))
        triplet = criterion.get_clip_triplet_loss

        def wrapped(scores, labels):
            value = triplet(scores, labels)
            self.seen[next(self.trip_names)] = float(value)
            return value
        criterion.get_clip_triplet_loss = wrapped

    def _hook(self, term):
        def hook(module, args, output):
            self.seen[term] = float(output)
        return hook

    def __call__(self, input_list, batch) -> tuple[dict, float]:
        self.seen = {"oml": float(input_list[6]), "mil": float(input_list[7]), "vib": float(input_list[8])}
        self.trip_names = iter(("clip_trip", "frame_trip"))   # the release's order
        total, _ = self.criterion(input_list, batch)
        return dict(self.seen), float(total)


def release_weighted_sum(method: str, seen: dict, rcfg: dict, warm: bool) -> float:
    lf = rcfg["loss_factor"]
    base = (lf[0] * seen["clip_nce"] + seen["clip_trip"] + lf[1] * seen["frame_nce"] + seen["frame_trip"]
            + lf[2] * seen["qdl"])
    if method == "ral":   # the MIL and KL weights are fixed in the release's loss
        return base + lf[3] * seen["oml"] + 4e-3 * seen["mil"] + 2.5e-4 * seen["vib"]
    return (base + lf[4] * (seen["edl_frame"] + seen["edl_clip"] + seen["edl_fused"])
            + (lf[3] * seen["edl_intra"] if warm else 0.0) + lf[5] * seen["edl_consistency"])


def compare_terms(method: str, ours, loss, rel, batch: dict, rcfg: dict, seed: int) -> list[dict]:
    import Losses.loss as rel_loss_module

    labels = batch["query_labels"]
    B, H = batch["clip_feats"].shape[0], ours.cfg.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    noise = [torch.randn(B, 6, H, generator=g), torch.randn(B, 6, H, generator=g)]
    with torch.no_grad(), pinned_gaussians(method, ours, noise):
        out = ours(batch)
        rel_input = rel(release_batch(batch))
    if method == "ral":
        terms, order, phases = RALTerms(loss_crit := getattr(rel, "_crit")), ("clip", "frame"), (False,)
    else:
        terms, order, phases = ReleaseTerms(loss_crit := getattr(rel, "_crit")), ("frame", "clip"), (False, True)
        real_dc = rel_loss_module.get_dc_loss

        def dc(evidences, device):
            value = real_dc(evidences, device)
            terms.seen["edl_consistency"] = float(value)
            return value
        rel_loss_module.get_dc_loss = dc
    rows = []
    for warm in phases:
        for hard in (False, True):
            if hasattr(loss, "after_warmup"):
                loss.after_warmup = warm
                loss_crit.cfg["warmup_end"] = warm
            loss_crit.cfg["use_hard_negative"] = hard
            mine = loss(out, labels, hard, torch.Generator().manual_seed(seed))
            ranks = our_ranks(seed, len(labels), labels, B, hard, loss.hard_pool_size)
            with torch.no_grad(), pinned_randint(ranks, order):
                seen, total = terms(rel_input, release_batch(batch))
            rel_sum = release_weighted_sum(method, seen, rcfg, warm)
            rel_terms = {**seen, "total": total}
            rel_err = {t: abs(float(mine[t]) - v) / max(abs(v), 1e-12) for t, v in rel_terms.items()}
            rows.append({"after_warmup": warm, "hard_negatives": hard, "release": rel_terms,
                         "ours": {t: float(mine[t]) for t in rel_terms}, "relative_diff": rel_err,
                         "max_relative_diff": max(rel_err.values()),
                         "release_sum_of_terms_vs_total": abs(rel_sum - total) / abs(total),
                         "ok": max(rel_err.values()) <= TERM_TOL and abs(rel_sum - total) <= 1e-5 * abs(total)})
    return rows


def release_model(parts, rcfg: dict, ckpt: Path, rcfg_extra: dict):
    _, get_models, ReleaseLoss, _ = parts
    rel = get_models(rcfg)
    rel.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    rel._crit = ReleaseLoss(dict(rcfg, **rcfg_extra))
    return rel


def ours_step_fn(method: str, cfg, ckpt: Path, batch: dict, seed: int, backend: str):
    m = get_method(method)
    model = load_model(ckpt, method=method, backend=backend)[0].train()
    if backend == "cpu":   # as the train stage does for the CPU backend (params.yaml cpu.numpy_blas)
        from prvr.backends.cpu.kernels import configure_blas

        print("BLAS:", configure_blas(True), file=sys.stderr)
    loss = m.build_loss(cfg)
    m.start_epoch(model, loss, 10_000)
    opt = build_optimizer(m.param_groups(model, 0.01), TVR_OPTIM, t_total=10_000)
    gen = torch.Generator().manual_seed(seed)

    def step():
        terms = loss(model(batch), batch["query_labels"], True, gen)
        opt.zero_grad(set_to_none=False)
        terms["total"].backward()
        opt.step()
    return step


def release_step_fn(parts, rcfg: dict, ckpt: Path, batch: dict):
    BertAdam = parts[3]
    rel = release_model(parts, rcfg, ckpt, {"warmup_end": True, "use_hard_negative": True}).train()
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    named = list(rel.named_parameters())
    groups = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    ropt = BertAdam(groups, lr=TVR_OPTIM["lr"], weight_decay=0.01, warmup=0.01, t_total=10_000,
                    schedule="warmup_linear")
    rb = release_batch(batch)

    def step():
        out = rel._crit(rel(rb), rb)
        total = out[0] if isinstance(out, tuple) else out
        ropt.zero_grad()
        total.backward()
        ropt.step()
    return step


def speed(args) -> dict:
    """Each implementation in its own process: ours with the train stage's start-up environment
    (prvr.procenv), the release as a plain interpreter; rounds alternate."""
    import subprocess

    from prvr.procenv import allocator_env_needed, thread_env_needed

    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    ours_env = {**plain, **allocator_env_needed(plain), **thread_env_needed(plain)}
    envs = {"release": plain, **{b: ours_env for b in args.backends.split(",")}}
    rounds: dict[str, list] = {name: [] for name in envs}
    for _ in range(args.rounds):
        for name, env in envs.items():
            cmd = [sys.executable, __file__, "--method", args.method, "--release", str(args.release),
                   "--videos", str(args.videos), "--reps", str(args.reps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads), "--seed", str(args.seed), "--work", str(args.work),
                   "--time-one", name]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rounds[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {name}: {rounds[name][-1]}", flush=True)
    res = {}
    for name, rs in rounds.items():
        res[name] = {"min_s": min(r["min_s"] for r in rs), "median_s": statistics.median(r["median_s"] for r in rs),
                     "cpu_median_s": statistics.median(r["cpu_median_s"] for r in rs),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "steps": sum(r["reps"] for r in rs)}
    for name in envs:
        if name != "release":
            res[f"speedup_{name}_min"] = res["release"]["min_s"] / res[name]["min_s"]
            res[f"speedup_{name}_median"] = res["release"]["median_s"] / res[name]["median_s"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(LAYOUT), required=True)
    ap.add_argument("--release", type=Path, required=True)
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/prvr_token_parity"))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backends", default="cpu,reference", help="our backends to time")
    ap.add_argument("--time-one", choices=["release", "cpu", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = import_release(args.release, args.method, args.work)
    rcfg = dict(parts[0])
    rcfg.setdefault("visual_feat_dim", 3072)   # its data loader sets it from the features (TVR: 3072)
    m = get_method(args.method)
    cfg = config_from_release(rcfg, m.config_class(), release_keys(args.method))
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / f"{args.method}_release.ckpt"
    batch = make_batch(args.videos, cfg, args.seed + 1)
    if args.time_one:
        if not ckpt.exists():
            write_release_checkpoint(args.method, ckpt, cfg, rcfg, args.seed, 0.02)
        step = release_step_fn(parts, rcfg, ckpt, batch) if args.time_one == "release" else \
            ours_step_fn(args.method, cfg, ckpt, batch, args.seed, args.time_one)
        torch.manual_seed(args.seed)
        print(json.dumps(_steps(step, args.reps, args.warmup)), flush=True)
        return 0
    write_release_checkpoint(args.method, ckpt, cfg, rcfg, args.seed, 0.02)
    ours = load_model(ckpt, method=args.method, backend="reference")[0].eval()
    rel = release_model(parts, rcfg, ckpt, {"warmup_end": False, "use_hard_negative": False}).eval()
    scores = compare_scores(ours, rel, batch, rcfg)
    print(f"scores {scores['shape']}: max |diff| {scores['max_abs_diff']:.3g}", flush=True)
    terms = compare_terms(args.method, ours, m.build_loss(cfg), rel, batch, rcfg, args.seed)
    for row in terms:
        print(f"warm-up over {row['after_warmup']!s:5} hard {row['hard_negatives']!s:5}: max relative diff "
              f"{row['max_relative_diff']:.3g}, release sum vs total {row['release_sum_of_terms_vs_total']:.2g}",
              flush=True)
    result = {"command": f"python benchmarks/token_parity.py --method {args.method} --release <checkout>",
              "machine": machine_info(torch.device("cpu")), "videos": args.videos,
              "queries": int(batch["query_labels"].numel()), "scores": scores, "loss_terms": terms}
    if not args.no_speed:
        result["speed"] = sp = speed(args)
        for name in args.backends.split(","):
            print(f"train step: ours ({name}) min {sp[name]['min_s']:.2f} s median {sp[name]['median_s']:.2f} s | "
                  f"release min {sp['release']['min_s']:.2f} s median {sp['release']['median_s']:.2f} s | "
                  f"x{sp[f'speedup_{name}_min']:.2f} (min), x{sp[f'speedup_{name}_median']:.2f} (median)", flush=True)
    result["ok"] = scores["ok"] and all(r["ok"] for r in terms)
    write_results(args.out or default_out(f"{args.method}_parity"), result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
