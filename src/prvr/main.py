"""The `prvr` command (also `python -m prvr`): search an index; more subcommands register in
COMMANDS (name -> (help, add_arguments, run)).

    prvr search --index DIR --query-id ID [--query-id ...] [--query-ids-file F] --k K [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="an index folder (stages/index.py)")
    p.add_argument("--query-id", action="append", default=[], metavar="ID",
                   help="a caption id of the index's dataset (repeatable)")
    p.add_argument("--query-ids-file", default=None, metavar="F", help="a file of caption ids, one per line")
    p.add_argument("--k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per query and line (else a "
                   "readable list)")
    p.add_argument("--data-dir", default=None, help="where data/<dataset>/ lives (default: the build's)")


def _search(args: argparse.Namespace) -> int:
    from .search import SearchError, open_index

    ids = list(args.query_id)
    if args.query_ids_file:
        path = Path(args.query_ids_file)
        try:
            from_file = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise SearchError(f"{path}: cannot read the query ids ({exc})") from None
        if not from_file:
            raise SearchError(f"{path}: no caption ids in it (one per line)")
        ids += from_file
    if not ids:
        raise SearchError("give --query-id or --query-ids-file")
    if args.k < 1:
        raise SearchError(f"--k {args.k}: expected >= 1")
    index = open_index(args.index, data_dir=args.data_dir)
    k, n = args.k, len(index.video_ids)
    if k > n:   # clamped, and said once (stdout stays one JSON line per query)
        print(f"prvr search: note: --k {k} is more than the {n} videos of {args.index}; giving {n} hits a query",
              file=sys.stderr)
        k = n
    for lo in range(0, len(ids), 256):   # every id checked before any line is written
        index.query_features(ids[lo:lo + 256])
    for lo in range(0, len(ids), 256):
        for obj in index.search_ids(ids[lo:lo + 256], k):
            print(json.dumps(obj) if args.json else _readable(obj), flush=True)
    return 0


def _readable(obj: dict) -> str:
    lines = [obj.get("query_id") or obj.get("text") or ""]
    for rank, h in enumerate(obj["hits"], 1):
        m = h["moment"]
        sec = "" if m["start_s"] is None else f" ({m['start_s']:.1f}-{m['end_s']:.1f} s)"
        lines.append(f"  {rank:3d}. {h['video_id']}  {h['score']:.4f}  rows {m['start_feature']}-{m['end_feature']}{sec}")
    return "\n".join(lines)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "search": ("top-k videos and moments for stored queries of an index's dataset", _search_args, _search),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prvr", description="partially relevant video retrieval")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    from .search import SearchError

    try:
        return COMMANDS[args.command][2](args)
    except SearchError as exc:
        print(f"prvr {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
