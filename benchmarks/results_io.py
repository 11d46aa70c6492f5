"""Where the benchmarks write their JSON: benchmarks/results/<name>.json unless told a path.

One folder for every benchmark's machine-readable figures, so that figures live beside the
benchmarks and not in docstrings or prose (benchmarks/README.md cites them).
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def default_out(name: str) -> Path:
    """benchmarks/results/<name>.json"""
    return RESULTS / f"{name}.json"


def write_results(path: str | Path, results) -> Path:
    """Write `results` as indented JSON to `path` (its folder made if missing) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"wrote {path}", flush=True)
    return path
