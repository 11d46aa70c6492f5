"""Atomic file writes: every output is written to a temp file beside it, then renamed into
place, so a crash or an error never leaves a half-written file under the final name.
Temp files are named `.<name>.<random><suffix>` in the target's folder."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds it is renamed onto `path`,
    when it raises the temp file is removed. `suffix` lets writers that infer the format
    from the name (matplotlib) see the right extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON with a trailing newline, keys in the order given."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
