"""DVC stage `fetch`: make the dataset's MS-SL collection available, write data/<dataset>/source.json.

    python stages/fetch.py [--params params.yaml] [--dataset NAME] [--data-dir data] [--no-progress]

Exit status 0 on success; 1 with one line on stderr when the dataset cannot be found or
fetched (where it looked, how to get it).
"""
from __future__ import annotations

import logging
import sys
import time

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, load_settings
from prvr.data.fetch import fetch
from prvr.data.layout import DataError

log = logging.getLogger("prvr.stages.fetch")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, data_dir=True)
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    try:
        settings = load_settings(args.params, args.dataset)
        log.info("read %s: dataset %s, collection %s, feature %s, data_root %s", args.params,
                 settings["dataset"], settings["collection"], settings["feature"], settings["data_root"])
        record = fetch(settings, args.data_dir, progress=not args.no_progress)
    except (ConfigError, DataError) as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1
    log.info("dataset %s: %s collection at %s (%.1f s)", record["dataset"], record["origin"],
             record["collection_dir"], time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
