"""Seeds, compared: a dataset's MLflow runs grouped by method and settings apart from the seed.

`compare(dataset)` reads the experiment `prvr-<dataset>` (the store of prvr.tracking), keeps
the runs with test metrics, and groups them by method and every logged setting except the
seed and the settings that only say where or how a run ran (RUN_LOCAL). For each group and
each protocol it gives mean, standard deviation (sample, n - 1; none for n = 1) and n of
R@1/5/10/100 and SumR; the paper's numbers of the method beside the standard protocol; which
settings differ between the groups; and a bar chart with error bars (PNG, and as text in the
Markdown). Protocols are read from the metric names the evaluate stage logs: `test_<m>` is the
standard protocol (one relevant video per query), `test_<split>_<m>` an extra split (e.g.
`test_denseval_v_sumr`, the dense multi-ground-truth one).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .atomic import atomic_path, write_text_atomic
from .metrics import METRIC_KEYS

SEED_KEYS = ("train.seed",)
# Logged parameters that say where or how a run ran, not what it trained.
RUN_LOCAL = ("settings_hash", "data_root", "train.device", "evaluate.device", "train.num_workers")
STANDARD = "standard"
LABELS = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "r100": "R@100", "sumr": "SumR"}
_METRIC = re.compile(r"^test_(?:(?P<split>.+)_)?(?P<m>" + "|".join(METRIC_KEYS) + r")$")


@dataclass
class RunRecord:
    """What the comparison needs of one MLflow run."""

    run_id: str
    method: str
    params: dict[str, str]
    metrics: dict[str, dict[str, float]]   # protocol -> {r1, ..., sumr}
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> str:
        return next((self.params[k] for k in SEED_KEYS if k in self.params), "-")


@dataclass
class Group:
    """Runs of one method with the same settings apart from the seed."""

    label: str
    method: str
    settings: dict[str, str]
    runs: list[RunRecord]


def protocol_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{protocol: {r1, ..., sumr}} from an MLflow run's metrics (see the module docstring)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        m = _METRIC.match(key)
        if m:
            out.setdefault(m.group("split") or STANDARD, {})[m.group("m")] = float(value)
    return {p: v for p, v in out.items() if all(k in v for k in METRIC_KEYS)}


def load_runs(dataset: str, tracking_uri: str | None = None) -> list[RunRecord]:
    """The finished runs of `prvr-<dataset>` that have test metrics, oldest first."""
    from .tracking import default_tracking_uri, experiment_name, mlflow_installed

    if not mlflow_installed():
        raise ValueError("mlflow is not installed: the seeds comparison reads the MLflow store "
                         "(pip install mlflow)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    exp = client.get_experiment_by_name(experiment_name(dataset))
    if exp is None:
        raise ValueError(f"{client.tracking_uri}: no MLflow experiment '{experiment_name(dataset)}' "
                         "(train on this dataset first)")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    records = []
    for r in runs:
        metrics = protocol_metrics(r.data.metrics)
        if metrics:
            method = r.data.tags.get("method") or r.data.params.get("method", "?")
            records.append(RunRecord(r.info.run_id, method, dict(r.data.params), metrics,
                                     dict(r.data.tags)))
    return records


def _grouping(params: Mapping[str, str], ignore: Iterable[str]) -> dict[str, str]:
    skip = set(SEED_KEYS) | set(ignore)
    return {k: v for k, v in sorted(params.items()) if k not in skip}


def differing_settings(groups: Sequence[Group]) -> dict[str, list[str | None]]:
    """{setting: its value in each group} for the settings not equal in every group."""
    keys = sorted({k for g in groups for k in g.settings})
    rows = {k: [g.settings.get(k) for g in groups] for k in keys}
    return {k: v for k, v in rows.items() if len(set(v)) > 1}


def group_runs(runs: Sequence[RunRecord], ignore: Iterable[str] = RUN_LOCAL) -> list[Group]:
    """Runs grouped by method and settings apart from the seed (groups in order of first run).
    A method with one group is labelled by its name; else by the settings that tell its groups
    apart (up to two), or a number."""
    ignore = tuple(ignore)
    by_key: dict[tuple, Group] = {}
    for r in runs:
        settings = _grouping(r.params, ignore)
        key = (r.method, tuple(settings.items()))
        if key not in by_key:
            by_key[key] = Group(r.method, r.method, settings, [])
        by_key[key].runs.append(r)
    groups = list(by_key.values())
    for method in dict.fromkeys(g.method for g in groups):
        mine = [g for g in groups if g.method == method]
        if len(mine) < 2:
            continue
        diff = differing_settings(mine)
        for i, g in enumerate(mine):
            tell = [f"{k}={g.settings.get(k)}" for k in list(diff)[:2]]
            g.label = f"{method} ({', '.join(tell)})" if len(diff) <= 2 else f"{method} #{i + 1}"
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, sample standard deviation with n - 1 (None when n < 2), n)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def summary(groups: Sequence[Group]) -> dict[str, list[dict[str, Any]]]:
    """{protocol: [{"group", "method", "n", <metric>: {"mean", "std"}}, ...]} over the groups
    with runs on that protocol (standard first)."""
    protocols = sorted({p for g in groups for r in g.runs for p in r.metrics},
                       key=lambda p: (p != STANDARD, p))
    out: dict[str, list[dict[str, Any]]] = {}
    for p in protocols:
        rows = []
        for g in groups:
            vals = [r.metrics[p] for r in g.runs if p in r.metrics]
            if not vals:
                continue
            row: dict[str, Any] = {"group": g.label, "method": g.method, "n": len(vals)}
            for k in METRIC_KEYS:
                mean, std, _ = mean_std([v[k] for v in vals])
                row[k] = {"mean": mean, "std": std}
            rows.append(row)
        out[p] = rows
    return out


def _pm(cell: Mapping[str, Any]) -> str:
    return f"{cell['mean']:.1f}" + ("" if cell["std"] is None else f" ± {cell['std']:.1f}")


def _paper(method: str, dataset: str) -> Mapping[str, float] | None:
    from .methods import get_method

    try:
        return get_method(method).paper.get(dataset)
    except ValueError:  # a method no longer in this code base
        return None


def text_bars(rows: Sequence[Mapping[str, Any]], metric: str = "sumr", width: int = 40) -> list[str]:
    """A bar chart in text: one bar per group, mean as '█', ± one standard deviation as '─'."""
    top = max(r[metric]["mean"] + (r[metric]["std"] or 0.0) for r in rows) or 1.0
    name_w = max(len(r["group"]) for r in rows)
    lines = []
    for r in rows:
        mean, std = r[metric]["mean"], r[metric]["std"] or 0.0
        bar = "█" * round(width * mean / top)
        err = "─" * max(0, round(width * (mean + std) / top) - len(bar))
        lines.append(f"{r['group']:<{name_w}} |{bar}{err} {_pm(r[metric])} (n={r['n']})")
    return lines


def _table(rows: Sequence[Mapping[str, Any]], dataset: str, protocol: str) -> list[str]:
    lines = ["| group | method | n | " + " | ".join(LABELS[k] for k in METRIC_KEYS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in METRIC_KEYS) + " |"]
    papers = {}
    for r in rows:
        lines.append(f"| {r['group']} | {r['method']} | {r['n']} | "
                     + " | ".join(_pm(r[k]) for k in METRIC_KEYS) + " |")
        paper = _paper(r["method"], dataset) if protocol == STANDARD else None
        if paper and r["method"] not in papers:
            papers[r["method"]] = paper
    for method, paper in papers.items():
        lines.append(f"| {method}, paper | {method} | - | "
                     + " | ".join(f"{paper[k]:.1f}" for k in METRIC_KEYS) + " |")
    return lines


def render_markdown(dataset: str, groups: Sequence[Group], table: Mapping[str, list],
                    figure: str | None) -> str:
    """The comparison report (deterministic for the same runs)."""
    from .data.splits import SELECTION_TAG

    runs = [r for g in groups for r in g.runs]
    lines = [f"# Seeds compared on `{dataset}`", ""]
    warned = [r for r in runs if r.tags.get(SELECTION_TAG)]
    if warned:
        lines += [f"Warning: {len(warned)} of these {len(runs)} runs were selected on the test "
                  "split, so their test numbers are optimistic (see each run's "
                  f"`{SELECTION_TAG}` tag).", ""]
    lines += [f"{len(runs)} finished runs with test metrics in {len(groups)} groups (same method "
              "and settings apart from the seed). Cells: mean ± sample standard deviation "
              "(n - 1) over the group's runs; n runs.", ""]
    for protocol, rows in table.items():
        what = ("standard protocol (one relevant video per query)" if protocol == STANDARD
                else f"split `{protocol}` (a hit when any of the query's videos ranks within k)")
        lines += [f"## Test, {what}", ""] + _table(rows, dataset, protocol) + [""]
        lines += ["SumR per group:", "", "```"] + text_bars(rows) + ["```", ""]
    if figure:
        lines += [f"![recall with error bars]({figure})", ""]
    lines += _settings_section(groups) + _runs_section(groups)
    return "\n".join(lines).rstrip() + "\n"


def _settings_section(groups: Sequence[Group]) -> list[str]:
    diff = differing_settings(groups)
    if not diff:
        return ["## Settings that differ between the groups", "",
                "None (one group, or groups of different methods with equal settings).", ""]
    lines = ["## Settings that differ between the groups", "",
             "| setting | " + " | ".join(g.label for g in groups) + " |",
             "| --- | " + " | ".join("---" for _ in groups) + " |"]
    for key, values in diff.items():
        lines.append(f"| `{key}` | " + " | ".join("-" if v is None else f"`{v}`" for v in values) + " |")
    return lines + [""]


def _runs_section(groups: Sequence[Group]) -> list[str]:
    lines = ["## Runs", "", "| group | MLflow run | seed | DVC experiment | standard SumR |",
             "| --- | --- | --- | --- | --- |"]
    for g in groups:
        for r in g.runs:
            sumr = r.metrics.get(STANDARD, {}).get("sumr")
            lines.append(f"| {g.label} | `{r.run_id}` | {r.seed} | {r.tags.get('dvc_exp_name', '-')} | "
                         f"{'-' if sumr is None else f'{sumr:.1f}'} |")
    return lines + [""]


def plot(table: Mapping[str, list], path: str | Path, title: str) -> None:
    """One row per protocol: R@k (left) and SumR (right) per group, bars at the mean and error
    bars of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(table), 2, figsize=(11, 3.6 * len(table)), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    for (protocol, rows), (ax_r, ax_s) in zip(table.items(), axes):
        w = 0.8 / len(rows)
        for i, r in enumerate(rows):
            for ax, keys in ((ax_r, METRIC_KEYS[:-1]), (ax_s, ("sumr",))):
                x = [j - 0.4 + w * (i + 0.5) for j in range(len(keys))]
                ax.bar(x, [r[k]["mean"] for k in keys], w, label=f"{r['group']} (n={r['n']})",
                       yerr=[r[k]["std"] or 0.0 for k in keys], capsize=3)
        for ax, keys in ((ax_r, METRIC_KEYS[:-1]), (ax_s, ("sumr",))):
            ax.set_xticks(list(range(len(keys))), [LABELS[k] for k in keys])
            ax.grid(axis="y", alpha=0.3)
        ax_r.set_ylabel(f"{protocol}: recall (%)")
        ax_r.set_ylim(0, 100)
        ax_r.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)


def compare(dataset: str, out_dir: str | Path, tracking_uri: str | None = None,
            ignore: Iterable[str] = RUN_LOCAL) -> dict[str, Any]:
    """Write `<out_dir>/compare.md`, `compare.png` and `compare.json`; returns the summary."""
    runs = load_runs(dataset, tracking_uri)
    if not runs:
        raise ValueError(f"MLflow experiment prvr-{dataset}: no finished run has test metrics yet")
    groups = group_runs(runs, ignore)
    table = summary(groups)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(table, out / "compare.png", f"{dataset}: test metrics over seeds (mean ± std)")
    write_text_atomic(out / "compare.md", render_markdown(dataset, groups, table, "compare.png"))
    record = {"dataset": dataset, "protocols": table, "differing_settings": differing_settings(groups),
              "groups": [{"label": g.label, "method": g.method,
                          "runs": [{"run_id": r.run_id, "seed": r.seed,
                                    "dvc_exp_name": r.tags.get("dvc_exp_name")} for r in g.runs]}
                         for g in groups]}
    write_text_atomic(out / "compare.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
