"""Time one MS-SL training step: forward, the four losses, backward, BertAdam step.

    python benchmarks/bench_step_msssl.py                                   # ours only
    python benchmarks/bench_step_msssl.py --release /tmp/ms-sl --reps 5      # + the release

Synthetic batch at the TVR configuration (visual 3072, text 768, hidden 384, 32 clips):
B videos with `--captions` captions each of 8-30 tokens and 20-128 frames (uniform, fixed
seed). `--release` points at a copy of the public release (github HuiGuanLab/ms-sl; the
folder holding method/model.py) with its HEAD's call bug fixed (MS_SL_Net.forward passes a
`cross=` argument that get_pred_from_raw_query no longer takes: drop it). Its MS_SL_Net
(model + loss in one forward) and method/optimization.py's BertAdam run as they are, with the
same weights (our state dict mapped to its layout) and the same inputs; `easydict` is shimmed
when missing. The two implementations alternate step by step so both see the same machine
load; report the min wall times on a shared box. Nothing of the release is needed without
the flag.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from release_shim import shim_missing
from prvr.methods import get_method
from prvr.methods.msssl.model import MSSLConfig
from prvr.methods.msssl.release import to_release_state_dict
from prvr.optim import BertAdam

TVR = dict(margin=0.1, lr=2.5e-4, weight_decay=0.01, warmup=0.01)


def make_batch(n_videos: int, captions: int, cfg: MSSLConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_frames = torch.randint(20, cfg.max_frames + 1, (n_videos,), generator=g)
    labels = torch.arange(n_videos).repeat_interleave(captions)
    n_tok = torch.randint(8, cfg.max_query_len + 1, (len(labels),), generator=g)
    Lf, Lq = int(n_frames.max()), int(n_tok.max())

    def unit(x):
        return x / (x.norm(dim=-1, keepdim=True) + 1e-5)

    fm = torch.arange(Lf)[None] < n_frames[:, None]
    qm = torch.arange(Lq)[None] < n_tok[:, None]
    return {"clip_feats": unit(torch.rand(n_videos, cfg.n_clips, cfg.visual_dim, generator=g)),
            "frame_feats": unit(torch.rand(n_videos, Lf, cfg.visual_dim, generator=g)) * fm[..., None],
            "frame_mask": fm,
            "query_feats": unit(torch.randn(len(labels), Lq, cfg.text_dim, generator=g)) * qm[..., None],
            "query_mask": qm, "query_labels": labels}


class Ours:
    name = "ours"

    def __init__(self, cfg: MSSLConfig):
        m = get_method("msssl")
        self.model = m.build_model(cfg, "cpu").train()  # the CPU fast path
        self.loss = m.build_loss(cfg)
        self.opt = BertAdam(m.param_groups(self.model, TVR["weight_decay"]), lr=TVR["lr"], warmup=TVR["warmup"],
                            t_total=10_000, max_grad_norm=1.0, weight_decay=TVR["weight_decay"])
        self.gen = torch.Generator().manual_seed(0)

    def step(self, batch):
        loss = self.loss(self.model(batch), batch["query_labels"], False, self.gen)["total"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)  # as the train stage (and the release) zero them


class Release:
    name = "release"

    def __init__(self, root: Path, cfg: MSSLConfig, weights: dict):
        if not (root / "method" / "model.py").is_file():
            raise SystemExit(f"--release {root}: no method/model.py there")
        shim_missing("easydict")
        sys.path.insert(0, str(root))
        from easydict import EasyDict
        from method.model import MS_SL_Net
        from method.optimization import BertAdam as ReleaseBertAdam

        mc = EasyDict(visual_input_size=cfg.visual_dim, query_input_size=cfg.text_dim, hidden_size=cfg.hidden_size,
                      max_ctx_l=cfg.max_frames, max_desc_l=cfg.max_query_len, map_size=cfg.n_clips,
                      input_drop=cfg.input_drop, device=[0], drop=cfg.drop, n_heads=cfg.n_heads,
                      initializer_range=cfg.init_std, margin=cfg.margin, use_hard_negative=False,
                      hard_pool_size=cfg.hard_pool_size)
        self.model = MS_SL_Net(mc).train()
        self.model.load_state_dict(weights)
        no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]  # method/train.py's groups
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
                  {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
        self.opt = ReleaseBertAdam(groups, lr=TVR["lr"], weight_decay=TVR["weight_decay"], warmup=TVR["warmup"],
                                   t_total=10_000, schedule="warmup_linear")

    @staticmethod
    def convert(batch: dict) -> tuple:
        return (batch["clip_feats"], batch["frame_feats"], batch["frame_mask"].float(), batch["query_feats"],
                batch["query_mask"].float(), batch["query_labels"].tolist())

    def step(self, batch):
        loss, _ = self.model(*batch)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def time_steps(runners, reps: int, warmup: int) -> dict:
    """Wall and process-CPU seconds per step of each runner, alternating step by step."""
    times = {r.name: [] for r, _ in runners}
    for i in range(warmup + reps):
        for runner, batch in runners:
            c0, t0 = time.process_time(), time.perf_counter()
            runner.step(batch)
            if i >= warmup:
                times[runner.name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {n: {"min": min(w for w, _ in ts), "median": statistics.median(w for w, _ in ts),
                "cpu_min": min(c for _, c in ts)} for n, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=128, help="videos per batch")
    ap.add_argument("--captions", type=int, default=5, help="captions per video (TVR has 5)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--release", type=Path, help="a copy of the public MS-SL release (call bug fixed)")
    ap.add_argument("--seed", type=int, default=2018)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = MSSLConfig(visual_dim=3072, text_dim=768, hidden_size=384, margin=TVR["margin"])
    batch = make_batch(args.videos, args.captions, cfg, args.seed)
    ours = Ours(cfg)
    runners = [(ours, batch)]
    if args.release is not None:
        weights = to_release_state_dict(ours.model.state_dict(), cfg)
        runners.append((Release(args.release, cfg, weights), Release.convert(batch)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.videos} videos, "
          f"{len(batch['query_labels'])} queries, {int(batch['frame_mask'].sum())} real frames "
          f"of {batch['frame_mask'].numel()} slots; {args.reps} timed steps after {args.warmup} warm-up")
    res = time_steps(runners, args.reps, args.warmup)
    for name, r in res.items():
        print(f"{name:>8}: wall min {r['min']:.3f} s, median {r['median']:.3f} s, process CPU min {r['cpu_min']:.3f} s")
    if "release" in res:
        rel, our = res["release"], res["ours"]
        print(f"release / ours: wall min x{rel['min'] / our['min']:.2f}, median x{rel['median'] / our['median']:.2f}, "
              f"CPU min x{rel['cpu_min'] / our['cpu_min']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
