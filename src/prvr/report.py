"""The per-dataset Markdown report: test metrics next to a reference, curves, data summary.

The reference is the paper's table for tvr/act/cha and, for the demo (or any dataset without
published numbers), the chance level of the test split: the expected R@k of a uniformly
random ranking of `n_videos` videos when each query has `n_relevant` relevant videos,
``1 - C(V - m, k) / C(V, k)`` (= k / V for one relevant video).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_text_atomic

KS = (1, 5, 10, 100)
KEYS = ("r1", "r5", "r10", "r100", "sumr")

# GMMFormer v2, test split, as the release reports them (spec table).
PAPER = {
    "tvr": {"name": "TVR", "r1": 16.2, "r5": 37.6, "r10": 48.8, "r100": 86.4, "sumr": 189.1},
    "act": {"name": "ActivityNet Captions", "r1": 8.9, "r5": 27.1, "r10": 40.2, "r100": 78.7, "sumr": 154.9},
    "cha": {"name": "Charades-STA", "r1": 2.5, "r5": 8.6, "r10": 13.9, "r100": 53.2, "sumr": 78.2},
}


def chance_recall(n_videos: int, k: int, n_relevant: int = 1) -> float:
    """Expected R@k (in %) of a uniformly random ranking."""
    v, m = int(n_videos), int(n_relevant)
    if v <= 0 or m <= 0:
        raise ValueError(f"chance_recall: need n_videos > 0 and n_relevant > 0, got {v}, {m}")
    if k >= v - m + 1:
        return 100.0
    # P(no relevant video in the top k) = prod_{i=0}^{k-1} (V - m - i) / (V - i)
    log_p = sum(math.log(v - m - i) - math.log(v - i) for i in range(k))
    return 100.0 * (1.0 - math.exp(log_p))


def chance_metrics(n_videos: int, n_relevant: int = 1) -> dict[str, float]:
    rec = {f"r{k}": chance_recall(n_videos, k, n_relevant) for k in KS}
    rec["sumr"] = sum(rec[f"r{k}"] for k in KS)
    return rec


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: float(v) for k, v in row.items() if v not in (None, "")})
    return rows


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})


def plot_training_curves(history: list[dict[str, float]], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss_total", "total (weighted)"), ("loss_clip_trip", "clip triplet"),
                       ("loss_frame_trip", "frame triplet"), ("loss_oml", "OML")):
        if history and key in history[0]:
            ax1.plot(epochs, [r[key] for r in history], marker="o", ms=3, label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss (per-epoch mean)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for key, label in (("val_r1", "R@1"), ("val_r5", "R@5"), ("val_r10", "R@10"), ("val_r100", "R@100")):
        if history and key in history[0]:
            ax2.plot(epochs, [r[key] for r in history], marker="o", ms=3, label=label)
    ax2b = ax2.twinx()
    if history and "val_sumr" in history[0]:
        ax2b.plot(epochs, [r["val_sumr"] for r in history], color="black", ls="--", label="SumR")
        ax2b.set_ylabel("SumR")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("recall (%)")
    ax2.set_title("validation")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def plot_recall_at_k(ours: dict[str, float], ref: dict[str, float], ref_label: str,
                     path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(KS))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [ours[f"r{k}"] for k in KS], w, label="this run")
    ax.bar([x + w / 2 for x in xs], [ref[f"r{k}"] for k in KS], w, label=ref_label)
    ax.set_xticks(list(xs), [f"R@{k}" for k in KS])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def _fmt(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else str(x)


def render_markdown(dataset: str, test: dict[str, Any], train: dict[str, Any],
                    validation: dict[str, Any] | None, history: list[dict[str, float]],
                    figures: dict[str, str]) -> str:
    """The report text (deterministic for the same inputs)."""
    paper = PAPER.get(dataset)
    lines = [f"# GMMFormer v2 on `{dataset}`", ""]
    lines += [f"Test split `{test.get('split')}`: {test.get('n_queries')} queries, "
              f"{test.get('n_videos')} videos; best checkpoint from epoch {train.get('best_epoch')} "
              f"(validation SumR {_fmt(train.get('val', {}).get('sumr'))}) of "
              f"{train.get('epochs_run')} epochs run"
              + (" (early stop)" if train.get("stopped_early") else "") + ".", ""]
    header = "| | R@1 | R@5 | R@10 | R@100 | SumR |"
    sep = "| --- | --- | --- | --- | --- | --- |"
    ours = "| this run | " + " | ".join(_fmt(test[k]) for k in KEYS) + " |"
    lines += ["## Test metrics", "", header, sep, ours]
    if paper:
        lines.append(f"| paper (GMMFormer v2, {paper['name']}) | "
                     + " | ".join(_fmt(paper[k]) for k in KEYS) + " |")
        lines.append("| difference | " + " | ".join(f"{test[k] - paper[k]:+.1f}" for k in KEYS) + " |")
        ref_note = "Paper numbers: the public release's test results (arXiv 2405.13824)."
    else:
        chance = chance_metrics(int(test["n_videos"]))
        lines.append("| chance (random ranking) | " + " | ".join(_fmt(chance[k]) for k in KEYS) + " |")
        lines.append("| ratio to chance | " + " | ".join(
            f"{test[k] / chance[k]:.1f}x" if chance[k] > 0 else "-" for k in KEYS) + " |")
        ref_note = (f"No published numbers for `{dataset}`: the reference is the chance level of "
                    f"a random ranking of {test['n_videos']} videos with one relevant video per "
                    "query (R@k = 100 k / V).")
    lines += ["", ref_note, ""]
    lines += ["## Figures", "", f"![training curves]({figures['curves']})", "",
              f"![recall at k]({figures['recall']})", ""]
    if history:
        lines += ["## Training", "", "| epoch | loss | lr | val SumR | time (s) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in history:
            lines.append(f"| {int(r['epoch'])} | {r.get('loss_total', float('nan')):.4f} | "
                         f"{r.get('lr', float('nan')):.2e} | {r.get('val_sumr', float('nan')):.1f} | "
                         f"{r.get('epoch_time_s', float('nan')):.0f} |")
        lines.append("")
    lines += ["## Data", ""]
    if validation:
        lines.append(f"Collection `{validation.get('collection')}`, feature `{validation.get('feature')}` "
                     f"(dims: visual {validation.get('dims', {}).get('visual')}, text "
                     f"{validation.get('dims', {}).get('text')}); validation "
                     + ("passed" if validation.get("ok") else "FAILED") + ".")
        lines += ["", "| split | videos | captions | frames/video (min/median/max) | tokens/caption (min/median/max) |",
                  "| --- | --- | --- | --- | --- |"]
        for split, info in (validation.get("splits") or {}).items():
            fr = info.get("frames_per_video") or {}
            tk = info.get("tokens_per_caption") or {}
            lines.append(f"| {split} | {info.get('videos')} | {info.get('captions')} | "
                         f"{fr.get('min')}/{fr.get('median')}/{fr.get('max')} | "
                         f"{tk.get('min')}/{tk.get('median')}/{tk.get('max')} |")
        warnings = (validation.get("problems") or {}).get("warnings") or []
        if warnings:
            lines += ["", "Warnings:"] + [f"- {w.get('file')}: {w.get('message')}" for w in warnings[:10]]
    else:
        lines.append("No validation report found.")
    lines += ["", "## Tracking", ""]
    run_id = train.get("mlflow_run_id")
    if run_id:
        lines.append(f"MLflow run `{run_id}` in experiment `prvr-{dataset}` "
                     "(`mlflow ui --backend-store-uri sqlite:///mlflow.db`).")
    else:
        lines.append("No MLflow run was recorded (tracking was off or unreachable).")
    lines += [f"Settings hash `{train.get('settings_hash')}`, device `{train.get('device')}`.", ""]
    return "\n".join(lines)


def build_report(dataset: str, test: dict[str, Any], train: dict[str, Any],
                 validation: dict[str, Any] | None, history: list[dict[str, float]],
                 out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, training_curves.png and recall_at_k.png under out_dir."""
    out_dir = Path(out_dir)
    files = {"report": out_dir / "report.md", "curves": out_dir / "training_curves.png",
             "recall": out_dir / "recall_at_k.png"}
    paper = PAPER.get(dataset)
    ref = paper if paper else chance_metrics(int(test["n_videos"]))
    ref_label = "paper" if paper else "chance"
    plot_training_curves(history, files["curves"], f"{dataset}: training")
    plot_recall_at_k(test, ref, ref_label, files["recall"], f"{dataset}: test recall@k")
    text = render_markdown(dataset, test, train, validation, history,
                           {"curves": files["curves"].name, "recall": files["recall"].name})
    write_text_atomic(files["report"], text)
    return files
