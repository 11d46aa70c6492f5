"""DVC stage `validate`: check the dataset's MS-SL collection, write data/<dataset>/validation.json.

    python stages/validate.py [--params params.yaml] [--dataset NAME] [--data-dir data] [--no-progress]

The report is always written (atomically). Exit status 1 when it holds errors (the first 20 are
printed, one line each, with the total) so the pipeline stops; warnings stay in the report.
"""
from __future__ import annotations

import logging
import sys
import time

from prvr.cli import setup_logging, stage_parser
from prvr.config import ConfigError, load_settings
from prvr.data.layout import DataError
from prvr.data.validate import validate

log = logging.getLogger("prvr.stages.validate")

SHOW = 20


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, data_dir=True)
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    try:
        settings = load_settings(args.params, args.dataset)
        log.info("read %s: dataset %s (visual_dim %s, text_dim %s)", args.params, settings["dataset"],
                 settings["visual_dim"], settings["text_dim"])
        report, out = validate(settings, args.data_dir, progress=not args.no_progress)
    except (ConfigError, DataError) as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 1
    errors = report["problems"]["errors"]
    warnings = report["problems"]["warnings"]
    log.info("read %s; wrote %s (%d errors, %d warnings, %.1f s)", report["collection_dir"], out,
             len(errors), len(warnings), time.time() - t0)
    for split, info in report["splits"].items():
        log.info("  %s: %s videos, %s captions", split, info.get("videos"), info.get("captions"))
    if errors:
        print(f"validate: error: {len(errors)} errors in {report['collection_dir']} "
              f"(report: {out}):", file=sys.stderr)
        for problem in errors[:SHOW]:
            print(f"  {problem['message']}", file=sys.stderr)
        if len(errors) > SHOW:
            print(f"  ... and {len(errors) - SHOW} more", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
