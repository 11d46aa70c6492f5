"""The per-dataset Markdown report: every method trained on the dataset side by side.

For each method: test R@1/5/10/100 and SumR, the paper's numbers for that method (tvr/act/cha),
parameter count, training time per epoch; one figure of training curves with all methods and
one of test recall@k. The chance level of the test split is always shown: the expected R@k of a
uniformly random ranking of `n_videos` videos when each query has `n_relevant` relevant
videos, ``1 - C(V - m, k) / C(V, k)`` (= k / V for one relevant video).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_text_atomic
from .metrics import KS, METRIC_KEYS

DATASET_NAMES = {"tvr": "TVR", "act": "ActivityNet Captions", "cha": "Charades-STA"}


@dataclass
class MethodResult:
    """What the report shows of one method on the dataset."""

    method: str
    title: str
    test: dict[str, Any]
    train: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    paper: dict[str, float] | None = None
    paper_selection: str = "test"     # prvr.methods.base.Method.paper_selection
    search: dict[str, Any] | None = None   # metrics/<ds>/<m>/search.json (the search_eval stage)

    @property
    def seconds_per_epoch(self) -> float | None:
        times = [r["epoch_time_s"] for r in self.history if "epoch_time_s" in r]
        return sum(times) / len(times) if times else None


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(results: list[MethodResult], path: str | os.PathLike, title: str) -> None:
    """Training loss (weighted total) and validation SumR per epoch, one line per method."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        epochs = [h["epoch"] for h in r.history]
        if r.history and "loss_total" in r.history[0]:
            ax1.plot(epochs, [h["loss_total"] for h in r.history], marker="o", ms=3, label=r.title)
        if r.history and "val_sumr" in r.history[0]:
            ax2.plot(epochs, [h["val_sumr"] for h in r.history], marker="o", ms=3, label=r.title)
    for ax, ylabel, what in ((ax1, "training loss (weighted total)", "training loss (per-epoch mean)"),
                             (ax2, "SumR", "validation SumR")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(what)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def plot_recall_at_k(results: list[MethodResult], chance: dict[str, float], path: str | os.PathLike,
                     title: str) -> None:
    """Test R@k, grouped bars: one per method, and the chance level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [(r.title, r.test) for r in results] + [("chance", chance)]
    w = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar([x - 0.4 + w * (i + 0.5) for x in range(len(KS))], [values[f"r{k}"] for k in KS], w,
               label=label)
    ax.set_xticks(list(range(len(KS))), [f"R@{k}" for k in KS])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def _fmt(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def _metrics_table(dataset: str, results: list[MethodResult], chance: dict[str, float]) -> list[str]:
    lines = ["| method | R@1 | R@5 | R@10 | R@100 | SumR | parameters | s/epoch | best epoch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        n_params = r.train.get("n_parameters")
        lines.append(f"| {r.title} | " + " | ".join(_fmt(r.test[k]) for k in METRIC_KEYS)
                     + f" | {f'{int(n_params):,}' if n_params else '-'} | {_fmt(r.seconds_per_epoch)} | "
                     f"{r.train.get('best_epoch', '-')} |")
        if r.paper:
            lines.append(f"| {r.title}, paper | " + " | ".join(_fmt(r.paper.get(k)) for k in METRIC_KEYS)
                         + " | | | |")
    lines.append("| chance (random ranking) | " + " | ".join(_fmt(chance[k]) for k in METRIC_KEYS)
                 + " | | | |")
    return lines


def selection_sentence(results: list[MethodResult], validation: dict[str, Any] | None) -> str | None:
    """The sentence that opens the report when a method was selected on (part of) the test split:
    validation.json's val/test overlap, and each method's `val_split` (run.json; default val)."""
    from .data.splits import selection_warning

    overlap = (validation or {}).get("overlap")
    warned = [r for r in results if selection_warning(overlap, str(r.train.get("val_split", "val")))]
    if not warned:
        return None
    sentence = selection_warning(overlap)
    if len(warned) < len(results):
        who = ", ".join(r.title for r in warned) + (" was" if len(warned) == 1 else " were")
        sentence = sentence.replace("this model was", who, 1)
    return sentence


def paper_selection_sentence(results: list[MethodResult], validation: dict[str, Any] | None) -> str | None:
    """For paper rows that are a release's best validation epoch: what that validation split
    shares with the test split here (validation.json's overlap), so a reader knows whether
    they are test numbers selected on the test split."""
    picked = [r.title for r in results if r.paper and r.paper_selection == "best_validation"]
    if not picked:
        return None
    who = ", ".join(picked)
    head = (f"{who}, paper: the best validation epoch of the release's training logs, not a "
            "separate test run; ")
    o = (validation or {}).get("overlap")
    if not o:
        return head + "validate measured no val/test overlap for this dataset."
    caps, vids = int(o.get("shared_captions", 0)), int(o.get("shared_videos", 0))
    if o.get("identical"):
        return head + (f"here the validation split is the test split ({int(o['test_captions']):,} "
                       "captions), so those are test numbers selected on the test split.")
    if caps or vids:
        return head + (f"here the validation split shares {caps:,} of the {int(o['test_captions']):,} "
                       f"test captions and {vids:,} of the {int(o['test_videos']):,} test videos, so "
                       "those numbers were selected partly on the test split.")
    return head + ("here the validation split shares no caption or video with the test split, so "
                   "those are held-out numbers.")


def extra_splits(test: dict[str, Any]) -> list[str]:
    """Names of the extra evaluation splits in a test record (keys `<name>_sumr`)."""
    return sorted(k[:-len("_sumr")] for k in test if k.endswith("_sumr") and len(k) > len("_sumr"))


def _extra_tables(results: list[MethodResult]) -> list[str]:
    """One table per extra (dense multi-ground-truth) split: a hit when any relevant video ranks
    within k."""
    lines: list[str] = []
    for name in sorted({n for r in results for n in extra_splits(r.test)}):
        lines += ["", f"Split `{name}` (dense ground truth: a query is a hit at k when any of its "
                  "relevant videos ranks within k):", "",
                  "| method | R@1 | R@5 | R@10 | R@100 | SumR |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r.title} | " + " | ".join(_fmt(r.test.get(f"{name}_{k}")) for k in METRIC_KEYS) + " |"
                  for r in results if f"{name}_sumr" in r.test]
    return lines


def _search_table(results: list[MethodResult]) -> list[str]:
    """The two-stage search of each method's index against exhaustive scoring, its latency and
    size, and where ground truth exists, its moments."""
    rows = [r for r in results if r.search]
    if not rows:
        return []
    lines = ["", "## Search", "",
             "Two-stage search (faiss over the method's index vectors, then its own score) against "
             "exhaustive scoring of the same split (`stages/search_eval.py`):", "",
             "| method | queries | recall@k | top-1 agreement | p50 ms | p99 ms | bytes/video | stage 1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r.search
        k = s.get("k", 10)
        lines.append(f"| {r.title} | {s.get('queries')} | {_fmt3(s.get(f'recall_at_{k}'))} (k={k}) | "
                     f"{_fmt3(s.get('top1_agreement'))} | {_fmt(s.get('latency_p50_ms'))} | "
                     f"{_fmt(s.get('latency_p99_ms'))} | {_fmt(s.get('bytes_per_video'))} | {s.get('stage1_kind', '-')} |")
    moments = [r for r in rows if r.search.get("moment_queries")]
    if moments:
        lines += ["", "Moments (the right video in the top k with IoU >= t; IoU of the moment found in the "
                  "right video, and a same-length span placed at random):", "",
                  "| method | queries | R@1 IoU.5 | R@5 IoU.5 | R@10 IoU.5 | R@10 IoU.7 | IoU | chance IoU |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in moments:
            s = r.search
            lines.append(f"| {r.title} | {int(s['moment_queries'])} | {_fmt(s.get('r1_iou0.5'))} | "
                         f"{_fmt(s.get('r5_iou0.5'))} | {_fmt(s.get('r10_iou0.5'))} | {_fmt(s.get('r10_iou0.7'))} | "
                         f"{_fmt3(s.get('iou_right_video'))} | {_fmt3(s.get('iou_chance'))} |")
    return lines


def _fmt3(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def render_markdown(dataset: str, results: list[MethodResult], validation: dict[str, Any] | None,
                    figures: dict[str, str]) -> str:
    """The report text (deterministic for the same inputs)."""
    first = results[0].test
    chance = chance_metrics(int(first["n_videos"]))
    lines = [f"# PRVR methods on `{dataset}`", ""]
    warning = selection_sentence(results, validation)
    if warning:
        lines += [warning, ""]
    lines += [f"Test split `{first.get('split')}`: {first.get('n_queries')} queries, "
              f"{first.get('n_videos')} videos. Every method: the same features, splits and metric "
              "code; its best checkpoint by validation SumR.", ""]
    lines += ["## Test metrics", ""] + _metrics_table(dataset, results, chance) + _extra_tables(results)
    if dataset in DATASET_NAMES:
        ref = f"Paper rows: the test results each paper reports on {DATASET_NAMES[dataset]}."
    else:
        ref = (f"No published numbers for `{dataset}`; chance is the expected recall of a random "
               f"ranking of {first['n_videos']} videos with one relevant video per query (R@k = 100 k / V).")
    picked = paper_selection_sentence(results, validation) if dataset in DATASET_NAMES else None
    if picked:
        ref += " " + picked
    lines += ["", ref] + _search_table(results)
    lines += ["", "## Figures", "", f"![training curves]({figures['curves']})", "",
              f"![recall at k]({figures['recall']})", ""]
    lines += _data_section(validation) + _tracking_section(dataset, results)
    return "\n".join(lines)


def _data_section(validation: dict[str, Any] | None) -> list[str]:
    lines = ["## Data", ""]
    if not validation:
        return lines + ["No validation report found.", ""]
    dims = validation.get("dims", {})
    lines.append(f"Collection `{validation.get('collection')}`, feature `{validation.get('feature')}` "
                 f"(dims: visual {dims.get('visual')}, text {dims.get('text')}); validation "
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
    return lines + [""]


def _tracking_section(dataset: str, results: list[MethodResult]) -> list[str]:
    lines = ["## Tracking", "", f"MLflow experiment `prvr-{dataset}` "
             "(`mlflow ui --backend-store-uri sqlite:///mlflow.db`):", ""]
    for r in results:
        run_id = r.train.get("mlflow_run_id")
        lines.append(f"- {r.title}: " + (f"run `{run_id}`" if run_id else "no MLflow run recorded")
                     + f", settings hash `{r.train.get('settings_hash')}`, device `{r.train.get('device')}`.")
    return lines + [""]


def build_report(dataset: str, results: list[MethodResult], validation: dict[str, Any] | None,
                 out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, training_curves.png and recall_at_k.png under out_dir."""
    if not results:
        raise ValueError(f"no method has test results on '{dataset}' (run the evaluate stage)")
    out_dir = Path(out_dir)
    files = {"report": out_dir / "report.md", "curves": out_dir / "training_curves.png",
             "recall": out_dir / "recall_at_k.png"}
    chance = chance_metrics(int(results[0].test["n_videos"]))
    plot_training_curves(results, files["curves"], f"{dataset}: training")
    plot_recall_at_k(results, chance, files["recall"], f"{dataset}: test recall@k")
    text = render_markdown(dataset, results, validation,
                           {"curves": files["curves"].name, "recall": files["recall"].name})
    write_text_atomic(files["report"], text)
    return files
