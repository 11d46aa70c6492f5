"""Time one full GMMFormer v1 training step: forward, all losses, backward, optimiser step.

    python benchmarks/bench_step_gmmformer_v1.py                          # ours only
    python benchmarks/bench_step_gmmformer_v1.py --release /tmp/GMMFormer # + the release
    python benchmarks/bench_step_gmmformer_v1.py --release /tmp/GMMFormer --as-shipped 2
        # each in its own process as its users run it (ours under the stage's malloc settings)

TVR configuration (visual 3072, text 768, hidden 384, 4 heads, dropout 0.2): B videos, each
with 5 captions (TVR's count) of 8-30 tokens and 20-128 frames (uniform, fixed seed); frames
and tokens padded to the batch's longest, as the release's collate does. `--release` points at
a copy of the public release (the folder holding `src/Models/gmmformer`); its model, loss and
BertAdam are imported from there as they are, with `ipdb`/`easydict` shimmed when missing and
`.cuda()` a no-op without CUDA. Both start from the same weights (ours mapped to the release
layout) and alternate step by step on the same batch, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from release_shim import cuda_as_noop, shim_missing
from prvr.methods import get_method
from prvr.methods.gmmformer_v1.release import to_release_state_dict
from prvr.optim import build_optimizer

TVR = dict(lr=3e-4, weight_decay=0.01, warmup_proportion=0.01, grad_clip_norm=1.0)
METHOD = get_method("gmmformer_v1")


def make_batch(n_videos: int, cfg, seed: int, captions: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_frames = torch.randint(20, cfg.max_frames + 1, (n_videos,), generator=g)
    labels = torch.arange(n_videos).repeat_interleave(captions)
    n_tok = torch.randint(8, cfg.max_query_len + 1, (len(labels),), generator=g)
    Lf, Lq = int(n_frames.max()), int(n_tok.max())

    def unit(x):
        return x / (x.norm(dim=-1, keepdim=True) + 1e-5)

    frame_mask = torch.arange(Lf)[None] < n_frames[:, None]
    query_mask = torch.arange(Lq)[None] < n_tok[:, None]
    return {"clip_feats": unit(torch.rand(n_videos, cfg.n_clips, cfg.visual_dim, generator=g)),
            "frame_feats": unit(torch.rand(n_videos, Lf, cfg.visual_dim, generator=g)) * frame_mask[..., None],
            "frame_mask": frame_mask,
            "query_feats": unit(torch.randn(len(labels), Lq, cfg.text_dim, generator=g)) * query_mask[..., None],
            "query_mask": query_mask, "query_labels": labels}


def import_release(root: Path):
    """(GMMFormer_Net, loss, BertAdam, EasyDict) of the release under root/src."""
    src = Path(root) / "src"
    if not (src / "Models" / "gmmformer" / "model.py").is_file():
        raise SystemExit(f"--release {root}: no src/Models/gmmformer/model.py there")
    shim_missing("ipdb", "easydict")
    cuda_as_noop()  # the release hard-codes .cuda()
    sys.path.insert(0, str(src))
    from easydict import EasyDict
    from Losses.loss import loss as ReleaseLoss
    from Models.gmmformer.model import GMMFormer_Net
    from Opts.optimization import BertAdam
    return GMMFormer_Net, ReleaseLoss, BertAdam, EasyDict


def release_model(root: Path, cfg):
    Net, _, _, EasyDict = import_release(root)
    mc = EasyDict(visual_input_size=cfg.visual_dim, query_input_size=cfg.text_dim, hidden_size=cfg.hidden_size,
                  max_ctx_l=cfg.max_frames, max_desc_l=cfg.max_query_len, map_size=cfg.n_clips,
                  input_drop=cfg.input_drop, drop=cfg.drop, n_heads=cfg.n_heads,
                  initializer_range=cfg.init_std, margin=cfg.margin, use_hard_negative=False,
                  hard_pool_size=cfg.hard_pool_size)
    return Net(mc)


def release_loss_cfg(cfg, hard: bool) -> dict:
    return dict(margin=cfg.margin, hard_pool_size=cfg.hard_pool_size, use_hard_negative=hard,
                loss_factor=[cfg.clip_nce, cfg.frame_nce, cfg.qdl], neg_factor=[cfg.qdl_margin, cfg.qdl_alpha])


def release_batch(batch: dict) -> dict:
    return {"clip_video_features": batch["clip_feats"], "frame_video_features": batch["frame_feats"],
            "videos_mask": batch["frame_mask"].float(), "text_feat": batch["query_feats"],
            "text_mask": batch["query_mask"].float(), "text_labels": batch["query_labels"].tolist()}


class Ours:
    name = "ours"

    def __init__(self, cfg):
        self.model = METHOD.build_model(cfg, "cpu").train()  # the CPU fast path
        self.loss = METHOD.build_loss(cfg)
        self.opt = build_optimizer(METHOD.param_groups(self.model, TVR["weight_decay"]), TVR, t_total=10_000)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, batch) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.loss(self.model(batch), batch["query_labels"], False, self.gen)["total"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)  # as the train stage (and the release) zero them
        return time.perf_counter() - t0, time.process_time() - c0


class Release:
    name = "release"

    def __init__(self, root: Path, cfg, weights: dict):
        _, Loss, BertAdam, _ = import_release(root)
        self.model = release_model(root, cfg).train()
        self.model.load_state_dict(weights)
        self.loss = Loss(release_loss_cfg(cfg, hard=False))
        no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
                  {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
        self.opt = BertAdam(groups, lr=TVR["lr"], weight_decay=0.01, warmup=0.01, t_total=10_000,
                            schedule="warmup_linear")

    def step(self, batch) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad()
        self.loss(self.model(batch), batch).backward()
        self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=128, help="videos per batch")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--release", type=Path, help="a copy of the public GMMFormer (v1) release")
    ap.add_argument("--seed", type=int, default=9527)
    ap.add_argument("--allocator-env", action="store_true",
                    help="re-exec under the train stage's CPU allocator and thread waits (prvr.procenv), "
                         "as the stage runs; both implementations share the process, so both get them")
    ap.add_argument("--as-shipped", type=int, metavar="ROUNDS", default=0,
                    help="each as its users run it, in its own process: ours under the train stage's "
                         "malloc settings, the release under glibc's defaults; ROUNDS alternating rounds "
                         "of --reps steps each (needs --release)")
    ap.add_argument("--only", choices=["ours", "release"], help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # per-step times, for --as-shipped
    args = ap.parse_args(argv)
    if args.as_shipped:
        if args.release is None:
            raise SystemExit("--as-shipped needs --release")
        return as_shipped(args)
    if args.allocator_env:
        from prvr.procenv import allocator_env_needed, reexec_with_allocator_env

        reexec_with_allocator_env()  # returns when the settings are already in place
        print(f"allocator settings: {'missing' if allocator_env_needed() else 'in place'}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = METHOD.config({}, {"visual_dim": 3072, "text_dim": 768})  # the TVR defaults
    batch = make_batch(args.videos, cfg, args.seed)
    runners = [(Ours(cfg), batch)]
    if args.release is not None:
        weights = to_release_state_dict(runners[0][0].model.state_dict(), cfg)
        runners.append((Release(args.release, cfg, weights), release_batch(batch)))
    if args.only:
        runners = [r for r in runners if r[0].name == args.only]
    times = {r.name: [] for r, _ in runners}  # (wall, CPU) seconds per timed step
    for i in range(args.warmup + args.reps):
        for runner, b in runners:
            t = runner.step(b)
            if i >= args.warmup:
                times[runner.name].append(t)
                print(f"  step {i - args.warmup + 1} {runner.name}: wall {t[0]:.3f} s, CPU {t[1]:.3f} s", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.videos} videos, "
          f"{len(batch['query_labels'])} queries, {int(batch['frame_mask'].sum())} real frames "
          f"of {batch['frame_mask'].numel()} slots; {args.reps} timed steps each")
    if args.json:
        args.json.write_text(json.dumps(times))
    report(times)
    return 0


def report(times: dict) -> None:
    stats = {}
    for name, ts in times.items():
        wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
        stats[name] = (min(wall), statistics.median(wall), min(cpu), statistics.median(cpu))
        print(f"{name:>8}: wall min {stats[name][0]:.3f} s, median {stats[name][1]:.3f} s; "
              f"CPU min {stats[name][2]:.3f} s, median {stats[name][3]:.3f} s per step")
    if "release" in stats and "ours" in stats:
        r = [a / b for a, b in zip(stats["release"], stats["ours"])]
        print(f"release / ours: wall x{r[0]:.2f} (min), x{r[1]:.2f} (median); "
              f"CPU x{r[2]:.2f} (min), x{r[3]:.2f} (median)")


def as_shipped(args) -> int:
    """Alternate child runs: ours with the stage's malloc settings, the release without."""
    from prvr.procenv import ALLOCATOR_OPTIONS

    plain = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_OPTIONS and k != "LD_PRELOAD"}
    times = {"ours": [], "release": []}
    base = [sys.executable, str(Path(__file__).resolve()), "--videos", str(args.videos), "--reps",
            str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--seed", str(args.seed), "--release", str(args.release)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        for rnd in range(args.as_shipped):
            for name, extra, env in (("ours", ["--allocator-env"], plain),
                                     ("release", [], {**plain, "PRVR_MALLOC": "system"})):
                subprocess.run(base + extra + ["--only", name, "--json", str(out)], env=env, check=True,
                               stdout=subprocess.DEVNULL)
                got = json.loads(out.read_text())[name]
                times[name] += got
                print(f"  round {rnd + 1} {name}: wall " + ", ".join(f"{w:.3f}" for w, _ in got) + " s",
                      flush=True)
    print("as shipped: ours under the train stage's malloc settings, the release under glibc's defaults")
    report(times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
