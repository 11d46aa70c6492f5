"""The `prvr` command (also `python -m prvr`); subcommands register in COMMANDS
(name -> (help, add_arguments, run)).

    prvr search --index DIR --query-id ID [--query-id ...] [--query-ids-file F] --k K [--json]
    prvr search --index DIR --text "a sentence" [--text ...] --encoder DIR --k K [--json]
    prvr check-encoder --dataset D --encoder DIR [--split S] [--n N] [--json] [--out F]
    prvr tiny-encoder --dataset D --out DIR          (a random stand-in, for the demo)
    prvr serve --index DIR [--encoder DIR] [--videos DIR|FILE] [--host H] [--port P]
    prvr export-qdrant --index DIR (--qdrant-url URL | --qdrant-path DIR) --collection NAME [--recreate]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from .search.index import SearchError


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="an index folder (stages/index.py)")
    p.add_argument("--query-id", action="append", default=[], metavar="ID",
                   help="a caption id of the index's dataset (repeatable)")
    p.add_argument("--query-ids-file", default=None, metavar="F", help="a file of caption ids, one per line")
    p.add_argument("--text", action="append", default=[], metavar="SENTENCE",
                   help="a free-text query (repeatable; needs --encoder)")
    p.add_argument("--encoder", default=None, metavar="DIR",
                   help="the text encoder's folder (or hub name) for --text (docs/text.md)")
    p.add_argument("--k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per query and line (else a "
                   "readable list)")
    p.add_argument("--data-dir", default=None, help="where data/<dataset>/ lives (default: the build's)")


def _search(args: argparse.Namespace) -> int:
    from .search import open_index

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
    texts = [t.strip() for t in args.text]
    if not ids and not texts:
        raise SearchError("give --query-id, --query-ids-file or --text")
    if any(not t for t in texts):
        raise SearchError("--text: an empty sentence")
    if texts and not args.encoder:
        raise SearchError("--text needs --encoder DIR (the text model the index's dataset features came from)")
    if args.k < 1:
        raise SearchError(f"--k {args.k}: expected >= 1")
    index = open_index(args.index, data_dir=args.data_dir)
    encoder = index.load_encoder(args.encoder) if texts else None
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
    for lo in range(0, len(texts), 64):
        for obj in index.search_texts(texts[lo:lo + 64], k, encoder):
            print(json.dumps(obj) if args.json else _readable(obj), flush=True)
    return 0


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="a dataset of params.yaml (demo, tvr, act, cha, tvr_clip, ...)")
    p.add_argument("--params", default="params.yaml", help="the settings file (default params.yaml)")
    p.add_argument("--data-dir", default="data", help="where data/<dataset>/ lives (default data)")


def _corpus_and_spec(args):
    from .config import load_params, load_settings, search_settings
    from .data.datasets import Corpus
    from .text import encoder_spec

    params = load_params(args.params)
    if args.dataset not in (params.get("datasets") or {}):
        raise SearchError(f"{args.params}: no dataset {args.dataset!r} (known: {', '.join(params.get('datasets') or {})})")
    settings = load_settings(args.params, args.dataset)
    facts = search_settings(params, args.params)["datasets"].get(args.dataset)
    return Corpus.from_settings(settings, args.data_dir), encoder_spec(settings, facts, args.dataset)


def _check_args(p: argparse.ArgumentParser) -> None:
    _dataset_args(p)
    p.add_argument("--encoder", required=True, metavar="DIR", help="the text encoder's folder (or hub name)")
    p.add_argument("--split", default="test", help="whose captions to sample (default test)")
    p.add_argument("--n", type=int, default=200, help="captions to compare (default 200; 0 = all)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--out", default=None, metavar="F", help="also write the JSON report to F")


def _check(args: argparse.Namespace) -> int:
    from .atomic import write_text_atomic
    from .text import load_encoder
    from .text.check import check_encoder, readable

    if args.n < 0:
        raise SearchError(f"--n {args.n}: expected >= 0")
    corpus, spec = _corpus_and_spec(args)
    report = check_encoder(corpus, load_encoder(args.encoder, spec), args.split, args.n)
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else readable(report))
    return 0


def _tiny_args(p: argparse.ArgumentParser) -> None:
    _dataset_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--seed", type=int, default=0)


def _tiny(args: argparse.Namespace) -> int:
    from .data.layout import read_captions
    from .text.tiny import make_tiny_encoder

    corpus, spec = _corpus_and_spec(args)
    texts = [c[2] for c in read_captions(corpus.paths.caption_file("train"))]
    out = make_tiny_encoder(args.out, spec.kind, spec.dim, texts, seed=args.seed)
    print(f"prvr tiny-encoder: wrote {out}: a random {spec.kind} encoder of width {spec.dim} "
          f"(tokenizer trained on {len(texts)} captions); a stand-in whose hits mean nothing", file=sys.stderr)
    return 0


def _qdrant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="an index folder (stages/index.py)")
    p.add_argument("--qdrant-url", default=None, metavar="URL", help="a Qdrant server, e.g. http://host:6333")
    p.add_argument("--qdrant-path", default=None, metavar="DIR", help="Qdrant's local mode, on disk")
    p.add_argument("--collection", required=True, help="the Qdrant collection to write")
    p.add_argument("--recreate", action="store_true", help="replace the collection when it exists")
    p.add_argument("--data-dir", default=None, help="where data/<dataset>/ lives (default: the build's)")


def _qdrant(args: argparse.Namespace) -> int:
    from .search import open_index
    from .search.qdrant import connect, export_qdrant

    client = connect(args.qdrant_url, args.qdrant_path)
    index = open_index(args.index, data_dir=args.data_dir)
    n = export_qdrant(index, client, args.collection, recreate=args.recreate)
    print(f"prvr export-qdrant: wrote {n} videos of {args.index} to collection {args.collection!r}", file=sys.stderr)
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="an index folder (stages/index.py)")
    p.add_argument("--encoder", default=None, metavar="DIR", help="text encoder for typed queries (docs/text.md)")
    p.add_argument("--videos", default=None, metavar="DIR|FILE",
                   help="the video files: a folder of <video_id>.<ext>, or a mapping file (docs/serve.md)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="connections served at once; more get 503 (default 32)")
    p.add_argument("--data-dir", default=None, help="where data/<dataset>/ lives (default: the build's)")


def _serve(args: argparse.Namespace) -> int:
    from .serve import run_server

    return run_server(args)


def _readable(obj: dict) -> str:
    lines = [obj.get("query_id") or obj.get("text") or ""]
    for rank, h in enumerate(obj["hits"], 1):
        m = h["moment"]
        sec = "" if m["start_s"] is None else f" ({m['start_s']:.1f}-{m['end_s']:.1f} s)"
        lines.append(f"  {rank:3d}. {h['video_id']}  {h['score']:.4f}  rows {m['start_feature']}-{m['end_feature']}{sec}")
    return "\n".join(lines)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "search": ("top-k videos and moments for stored queries or typed sentences", _search_args, _search),
    "check-encoder": ("cosine of a text encoder's output against a dataset's stored query features",
                      _check_args, _check),
    "tiny-encoder": ("write a random stand-in text encoder of a dataset's width (the demo has no real one)",
                     _tiny_args, _tiny),
    "serve": ("a search page and JSON API over an index", _serve_args, _serve),
    "export-qdrant": ("write an index's stage-1 vectors to a Qdrant multivector collection", _qdrant_args, _qdrant),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prvr", description="partially relevant video retrieval")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    from .config import ConfigError
    from .data.layout import DataError

    try:
        return COMMANDS[args.command][2](args)
    except (SearchError, ConfigError, DataError) as exc:
        print(f"prvr {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
