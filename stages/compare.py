"""Compare seeds: a dataset's MLflow runs, grouped by method and settings apart from the seed.

    python stages/compare.py [--params params.yaml] [--dataset NAME] [--out DIR] [--tracking-uri URI]

Reads the MLflow experiment prvr-<dataset> (the repository's mlflow.db, or MLFLOW_TRACKING_URI,
or --tracking-uri) and writes DIR/compare.md, compare.png and compare.json (DIR defaults to
reports/<dataset>): per group and protocol the mean ± std and n of R@1/5/10/100 and SumR, the
papers' numbers, a bar chart with error bars, which settings differ, and the runs. Not a DVC
stage: it reads the MLflow store, which lives outside DVC; run it after the experiments.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, load_params

log = logging.getLogger("prvr.stages.compare")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, progress=False)
    parser.add_argument("--out", default=None, help="output folder (default: reports/<dataset>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    args = parser.parse_args(argv)
    setup_logging()
    from prvr.compare import compare

    try:
        dataset = args.dataset or str(load_params(args.params).get("dataset"))
        out = Path(args.out) if args.out else Path("reports") / dataset
        record = compare(dataset, out, args.tracking_uri)
    except (ConfigError, ValueError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 1
    n_runs = sum(len(g["runs"]) for g in record["groups"])
    log.info("compared %d runs in %d groups; wrote %s", n_runs, len(record["groups"]),
             out / "compare.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
