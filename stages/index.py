"""DVC stage `index`: a search index over split S of the current dataset (prvr.search).

    python stages/index.py [--checkpoint F] [--method M] [--split S] [--out DIR]
                           [--params params.yaml] [--dataset NAME] [--no-progress]

With no --checkpoint, the best checkpoint of the current `dataset` and `model.name`
(runs/<ds>/<m>/checkpoints/best.pt). --split defaults to search.split (test), --out to
runs/<ds>/<m>/index/, where <m> is the method of the checkpoint indexed. Reads params.yaml
(`search`, `datasets.<ds>`) and the dataset's features; writes the index folder (atomically):
manifest.json, the stage-1 vectors, the exact encodings, the faiss index.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from prvr.cli import setup_logging, stage_parser

log = logging.getLogger("prvr.stages.index")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, data_dir=True)
    parser.add_argument("--checkpoint", default=None, help="checkpoint to index with (ours or a release's)")
    parser.add_argument("--split", default=None, help="split to index (default: search.split)")
    parser.add_argument("--out", default=None, help="index folder (default: runs/<ds>/<m>/index/)")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    from prvr import paths
    from prvr.checkpoint import CheckpointError
    from prvr.config import ConfigError, load_params, load_settings, search_settings
    from prvr.data.layout import DataError
    from prvr.search import SearchError, build_index

    try:
        params = load_params(args.params)
        settings = load_settings(args.params, args.dataset, args.method)
        ds, method = settings["dataset"], settings["method"]
        search = search_settings(params, args.params)
        split = args.split or search["split"]
        ckpt = Path(args.checkpoint) if args.checkpoint else paths.ckpt_dir(ds, method) / "best.pt"
        if args.checkpoint and not args.out:
            # the default folder is named after the method the checkpoint holds, not model.name:
            # a release checkpoint of another method never overwrites this method's index
            from prvr.checkpoint import load_model

            method = load_model(ckpt, "cpu", method=args.method)[1]["method"]
        out = Path(args.out) if args.out else paths.index_dir(ds, method)
        log.info("read %s: dataset %s, split %s, checkpoint %s", args.params, ds, split, ckpt)
        manifest = build_index(ckpt, params, ds, split, out, method=args.method if args.checkpoint else method,
                               data_dir=args.data_dir, progress=not args.no_progress)
    except (ConfigError, DataError, CheckpointError, SearchError, ValueError, KeyError) as exc:
        print(f"index: error: {exc}", file=sys.stderr)
        return 1
    log.info("wrote %s: %d videos, %d vectors (%s), %.0f bytes per video (%.1f s)", out, manifest["n_videos"],
             manifest["n_vectors"], manifest["stage1"]["kind"], manifest["bytes_per_video"], time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
