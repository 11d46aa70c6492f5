"""Time one full GMMFormer v2 training step: forward, all losses, backward, optimiser step.

    python benchmarks/bench_train_step.py                       # both backends, CPU (+ CUDA when present)
    python benchmarks/bench_train_step.py --release /tmp/GMMFormer_v2   # + the release, same batches

Synthetic batches at the TVR configuration (visual 3072, text 768, hidden 384): B videos,
each with 1-8 captions of 8-30 tokens and 20-128 frames (uniform, fixed seed). `--release`
points at a checkout of the public release (the folder holding `src/Models/gmmformerV2`);
its model, loss (src/Losses/loss.py) and BertAdam (src/Opts/optimization.py) are imported
from there as they are, with `ipdb`/`easydict` shimmed when missing and `.cuda()` made a
no-op on a machine without CUDA. Nothing of the release is needed without the flag.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from release_shim import cuda_as_noop, shim_missing
from prvr.methods import get_method
from prvr.methods.gmmformer_v2 import GMMFormerConfig
from prvr.methods.gmmformer_v2.release import to_release_state_dict
from prvr.optim import build_optimizer

METHOD = get_method("gmmformer_v2")
TVR_OPTIM = dict(lr=3e-4, weight_decay=0.01, warmup_proportion=0.01, grad_clip_norm=1.0)


def release_loss_config(cfg: GMMFormerConfig) -> dict:
    """The release's loss settings (positional loss_factor / neg_factor) from our named fields."""
    return dict(margin=cfg.margin, loss_factor=[cfg.clip_nce, cfg.frame_nce, cfg.qdl, cfg.oml],
                neg_factor=[cfg.qdl_delta, cfg.qdl_alpha, cfg.qdl_lambda], hard_pool_size=cfg.hard_pool_size)


def make_batch(n_videos: int, cfg: GMMFormerConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_frames = torch.randint(20, cfg.max_frames + 1, (n_videos,), generator=g)
    n_caps = torch.randint(1, 9, (n_videos,), generator=g)
    labels = torch.repeat_interleave(torch.arange(n_videos), n_caps)
    n_tok = torch.randint(8, cfg.max_query_len + 1, (len(labels),), generator=g)
    Lf, Lq = int(n_frames.max()), int(n_tok.max())

    def unit(x):
        return x / (x.norm(dim=-1, keepdim=True) + 1e-5)

    frame_mask = torch.arange(Lf)[None] < n_frames[:, None]
    query_mask = torch.arange(Lq)[None] < n_tok[:, None]
    return {
        "clip_feats": unit(torch.rand(n_videos, cfg.n_clips, cfg.visual_dim, generator=g)),
        "frame_feats": unit(torch.rand(n_videos, Lf, cfg.visual_dim, generator=g)) * frame_mask[..., None],
        "frame_mask": frame_mask,
        "query_feats": unit(torch.randn(len(labels), Lq, cfg.text_dim, generator=g)) * query_mask[..., None],
        "query_mask": query_mask,
        "query_labels": labels,
    }


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """Our train step on one backend (reference: the plain network; cpu: the CPU fast path)."""

    def __init__(self, cfg: GMMFormerConfig, device: torch.device, backend: str = "reference"):
        self.name = backend
        self.model = METHOD.build_model(cfg, backend).to(device).train()
        self.loss = METHOD.build_loss(cfg)
        groups = METHOD.param_groups(self.model, TVR_OPTIM["weight_decay"])
        self.opt = build_optimizer(groups, TVR_OPTIM, t_total=10_000)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, batch):
        out = self.model(batch)
        return self.loss(out, batch["query_labels"], hard_negatives=False, generator=self.gen)["total"]

    def update(self, loss):
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)  # as the train stage (and the release) zero them


class Release:
    name = "release"

    def __init__(self, root: Path, cfg: GMMFormerConfig, device: torch.device, weights: dict):
        src = root / "src"
        if not (src / "Models" / "gmmformerV2" / "model.py").is_file():
            raise SystemExit(f"--release {root}: no src/Models/gmmformerV2/model.py there")
        shim_missing("ipdb", "easydict")
        cuda_as_noop()  # the release hard-codes .cuda()
        sys.path.insert(0, str(src))
        from easydict import EasyDict
        from Losses.loss import loss as ReleaseLoss
        from Models.gmmformerV2.model import GMMFormerV2_Net
        from Opts.optimization import BertAdam as ReleaseBertAdam

        mc = EasyDict(visual_input_size=cfg.visual_dim, query_input_size=cfg.text_dim, hidden_size=cfg.hidden_size,
                      max_ctx_l=cfg.max_frames, max_desc_l=cfg.max_query_len, map_size=cfg.n_clips,
                      input_drop=cfg.input_drop, drop=cfg.drop, n_heads=cfg.n_heads,
                      initializer_range=cfg.init_std, margin=cfg.margin, use_hard_negative=False,
                      hard_pool_size=cfg.hard_pool_size, sft_factor=cfg.sft_factor)
        self.model = GMMFormerV2_Net(mc).to(device).train()
        self.model.load_state_dict(weights)
        self.loss = ReleaseLoss(dict(release_loss_config(cfg), use_hard_negative=False))
        no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
                  {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
        self.opt = ReleaseBertAdam(groups, lr=TVR_OPTIM["lr"], weight_decay=0.01, warmup=0.01,
                                   t_total=10_000, schedule="warmup_linear")

    @staticmethod
    def convert(batch: dict) -> dict:
        return {"clip_video_features": batch["clip_feats"], "frame_video_features": batch["frame_feats"],
                "videos_mask": batch["frame_mask"].float(), "text_feat": batch["query_feats"],
                "text_mask": batch["query_mask"].float(), "text_labels": batch["query_labels"].tolist()}

    def forward(self, batch):
        return self.loss(self.model(batch), batch)

    def update(self, loss):
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def _one_step(runner, batch, device) -> tuple[float, float, float]:
    """(forward+loss wall s, step wall s, step process-CPU s)"""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    loss = runner.forward(batch)
    _sync(device)
    t1 = time.perf_counter()
    runner.update(loss)
    _sync(device)
    return t1 - t0, time.perf_counter() - t0, time.process_time() - c0


def time_steps(runners, device, reps: int, warmup: int) -> dict:
    """Median step time of each runner; runners alternate step by step so that they see
    the same machine load."""
    times = {r.name: [] for r, _ in runners}
    for i in range(warmup + reps):
        for runner, batch in runners:
            fwd, total, cpu = _one_step(runner, batch, device)
            if i >= warmup:
                times[runner.name].append((fwd, total, cpu))
    out = {}
    for name, ts in times.items():
        out[name] = {"step": statistics.median(t for _, t, _ in ts), "fwd": statistics.median(f for f, _, _ in ts),
                     "bwd": statistics.median(t - f for f, t, _ in ts), "min": min(t for _, t, _ in ts),
                     "cpu": statistics.median(c for _, _, c in ts)}
    return out


def machine_info(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = f"torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        info += f", {torch.cuda.get_device_name(device)}"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, nargs="+", default=[32, 128], help="videos per batch")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all = CPU, plus CUDA when present")
    ap.add_argument("--release", type=Path, help="a checkout of the public GMMFormer v2 release")
    ap.add_argument("--seed", type=int, default=9527)
    ap.add_argument("--backends", default="reference,cpu",
                    help="our backends to time, comma-separated (reference, cpu)")
    return run(ap.parse_args(argv))


def run(args) -> int:

    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        print("no CUDA device", file=sys.stderr)
        return 1
    cfg = GMMFormerConfig()  # TVR
    for device in devices:
        print(f"\n## {device.type}: {machine_info(device)}")
        print("wall seconds per step (median, min) and process CPU seconds per step (median); "
              "speed-up = the first backend's / this one's (median wall; CPU)")
        print(f"{'videos':>6} {'queries':>7} {'frames':>6} | {'impl':>7} | {'step s':>7} {'fwd+loss':>8} "
              f"{'bwd+opt':>8} {'min':>7} {'cpu s':>7} | speed-up")
        for n in args.videos:
            torch.manual_seed(args.seed)
            batch = make_batch(n, cfg, args.seed + n)
            ours = [Ours(cfg, device, b) for b in args.backends.split(",")]
            for o in ours[1:]:
                o.model.load_state_dict(ours[0].model.state_dict())
            runners = [(o, _to(batch, device)) for o in ours]
            if args.release is not None:
                weights = to_release_state_dict(ours[0].model.state_dict(), cfg)
                runners.append((Release(args.release, cfg, device, weights), _to(Release.convert(batch), device)))
            torch.manual_seed(args.seed)
            results = time_steps(runners, device, args.reps, args.warmup)
            first = results[runners[0][0].name]
            for runner, _ in runners:
                r = results[runner.name]
                ratio = f"x{first['step'] / r['step']:.2f}; x{first['cpu'] / r['cpu']:.2f}"
                print(f"{n:>6} {len(batch['query_labels']):>7} {int(batch['frame_mask'].sum()):>6} | "
                      f"{runner.name:>7} | {r['step']:7.3f} {r['fwd']:8.3f} {r['bwd']:8.3f} {r['min']:7.3f} "
                      f"{r['cpu']:7.3f} | {ratio}", flush=True)
            del runners
    return 0


if __name__ == "__main__":
    sys.exit(main())
