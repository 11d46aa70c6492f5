"""Which queries and videos each split holds: val/test overlap, the seeded holdout validation
split, and dense multi-ground-truth evaluation splits.

* Overlap. In the MS-SL bundle TVR's validation split IS its test split; selecting the best
  epoch on it makes the test numbers optimistic. `split_overlap` counts the caption ids and
  video ids two splits share; `selection_warning` turns that into the one sentence the report
  and the MLflow run put first.
* Holdout (`train.val_split: holdout`). A fixed share of the TRAINING videos, with all their
  captions, becomes the validation split, so model selection never sees the test split. The
  draw is a function of (the set of training video ids, fraction, seed) only: the same split on
  every run and every resume, whatever the caption file's order.
* Dense ground truth. A dense split `<name>` (e.g. `denseval_v` for TVR, `denseval` for
  ActivityNet and Charades, as github CELL-POSTECH/prvr-ea ships them) is a pair of files in
  the collection folder or its TextData/: `<collection><name>.caption.txt` (MS-SL caption
  format) and `<collection><name>.gt.jsonl`, one JSON object a line,
  `{"query_id", "caption", "gt_video_ids": [...]}`. The queries are the `.gt.jsonl` lines (the
  caption file may hold more captions); the videos searched are those of the caption file
  (distinct ids in order of first appearance). A query is a hit at k when ANY of its videos
  ranks within k (prvr.metrics.retrieval_metrics with a list of ids per query).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .layout import CollectionPaths, DataError, _decode_text, _read_bytes, parse_caption_lines

Caption = tuple[str, str, str]  # (cap_id, video_id, text), as prvr.data.layout reads them
VAL_SPLIT_MODES = ("val", "holdout")
DENSE_STEM = "denseval"
_EXAMPLES = 3


def _examples(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(f"'{str(x)[:80]}'" for x in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


# ---------------------------------------------------------------------------------------------
# val/test overlap


def split_overlap(val: Sequence[Caption], test: Sequence[Caption]) -> dict[str, Any]:
    """What the validation split shares with the test split, by caption ids and by video ids.

    `identical`: both hold exactly the same caption ids (the MS-SL TVR case)."""
    val_caps, test_caps = {c for c, _, _ in val}, {c for c, _, _ in test}
    val_vids, test_vids = {v for _, v, _ in val}, {v for _, v, _ in test}
    return {
        "val_captions": len(val_caps), "test_captions": len(test_caps),
        "shared_captions": len(val_caps & test_caps),
        "val_videos": len(val_vids), "test_videos": len(test_vids),
        "shared_videos": len(val_vids & test_vids),
        "identical": bool(test_caps) and val_caps == test_caps,
    }


def selection_warning(overlap: dict[str, Any] | None, val_split: str = "val") -> str | None:
    """The one sentence a report and an MLflow run start with when the best epoch was picked on
    (part of) the test split; None when it was not (holdout validation, or no overlap)."""
    if val_split == "holdout" or not overlap:
        return None
    caps, vids = int(overlap.get("shared_captions", 0)), int(overlap.get("shared_videos", 0))
    if not caps and not vids:
        return None
    how = "on the test split" if overlap.get("identical") else "partly on the test split"
    return (f"Warning: this model was selected {how} (the validation split holds {caps:,} of the "
            f"{int(overlap['test_captions']):,} test captions and {vids:,} of the "
            f"{int(overlap['test_videos']):,} test videos), so its test numbers are optimistic; "
            "set train.val_split: holdout to select on held-out training videos.")


# ---------------------------------------------------------------------------------------------
# the seeded holdout


def holdout_videos(video_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The training videos that become the validation split, in the order of `video_ids`.

    round(fraction * n) of the n distinct videos (at least one, and at least one stays in
    training), drawn by numpy's default generator seeded with `seed` from the SORTED ids."""
    distinct = sorted(set(video_ids))
    n = len(distinct)
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"train.holdout_fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"a holdout split needs at least 2 training videos, got {n}")
    k = min(max(int(round(fraction * n)), 1), n - 1)
    order = np.random.default_rng(int(seed)).permutation(n)
    chosen = {distinct[i] for i in order[:k]}
    return [v for v in dict.fromkeys(video_ids) if v in chosen]


def holdout_captions(train: Sequence[Caption], fraction: float, seed: int
                     ) -> tuple[list[Caption], list[Caption]]:
    """(training captions, validation captions): every caption of a held-out video moves to
    validation; both keep file order."""
    held = set(holdout_videos([v for _, v, _ in train], fraction, seed))
    return [c for c in train if c[1] not in held], [c for c in train if c[1] in held]


# ---------------------------------------------------------------------------------------------
# dense ground truth: reading


@dataclass(frozen=True)
class DenseSplit:
    """A dense evaluation split: its queries (the .gt.jsonl lines, in file order), each with all
    its relevant videos, and the videos searched (those of the caption file)."""

    name: str
    caption_file: Path
    gt_file: Path
    query_ids: list[str]
    texts: list[str]
    gt_video_ids: list[tuple[str, ...]]
    video_ids: list[str]

    @property
    def multi(self) -> int:
        """Number of queries with more than one relevant video."""
        return sum(len(g) > 1 for g in self.gt_video_ids)


@dataclass
class GtFile:
    """A .gt.jsonl file read leniently: good rows and what is wrong with the others."""

    rows: list[tuple[str, str, tuple[str, ...]]]   # (query_id, caption, gt video ids)
    malformed: list[tuple[int, str]]               # (line number, what is wrong)
    empty: list[str]                               # query ids with an empty gt list
    duplicates: list[str]                          # query ids on more than one line


def _gt_row(line: str) -> tuple[str, str, tuple[str, ...]] | str:
    """A parsed line, or what is wrong with it."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    qid, caption, gts = item.get("query_id"), item.get("caption", ""), item.get("gt_video_ids")
    if not isinstance(qid, str) or not qid.strip():
        return "'query_id' must be a non-empty string"
    if not isinstance(caption, str):
        return f"query '{qid[:60]}': 'caption' must be a string"
    if not isinstance(gts, list) or not all(isinstance(v, str) and v for v in gts):
        return f"query '{qid[:60]}': 'gt_video_ids' must be a list of non-empty strings"
    return qid, caption, tuple(dict.fromkeys(gts))


def parse_gt_file(path: str | Path) -> GtFile:
    """Read a .gt.jsonl leniently (blank lines skipped; JSON is data, nothing is evaluated)."""
    text = _decode_text(_read_bytes(Path(path)))
    out = GtFile([], [], [], [])
    seen: set[str] = set()
    for no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = _gt_row(line)
        if isinstance(row, str):
            out.malformed.append((no, row))
            continue
        if row[0] in seen:
            out.duplicates.append(row[0])
            continue
        seen.add(row[0])
        if row[2]:
            out.rows.append(row)
        else:
            out.empty.append(row[0])
    return out


def dense_split_files(paths: CollectionPaths) -> dict[str, tuple[Path, Path]]:
    """{name: (caption file, gt file)} of every dense split in the collection folder or its
    TextData/ (found by either file; the other may be missing, which the checks report)."""
    found: dict[str, tuple[Path, Path]] = {}
    stem = f"{paths.collection}{DENSE_STEM}"
    for folder in (paths.collection_dir, paths.text_dir):
        names = {p.name[len(paths.collection):-len(suffix)]
                 for suffix in (".caption.txt", ".gt.jsonl")
                 for p in folder.glob(f"{stem}*{suffix}") if p.is_file()}
        for name in sorted(names):
            cap = folder / f"{paths.collection}{name}.caption.txt"
            if name in found:
                raise DataError(f"{cap}: dense split '{name}' is also in {found[name][0].parent}; "
                                "keep one of the two")
            found[name] = (cap, folder / f"{paths.collection}{name}.gt.jsonl")
    return found


def dense_split_paths(paths: CollectionPaths, name: str) -> tuple[Path, Path]:
    """(caption file, gt file) of dense split `name`; DataError saying where it looked."""
    files = dense_split_files(paths)
    if name not in files:
        known = ", ".join(sorted(files)) or "none"
        raise DataError(f"{paths.collection_dir}: no dense split '{name}' (expected "
                        f"{paths.collection}{name}.caption.txt and {paths.collection}{name}.gt.jsonl "
                        f"here or in TextData/; found: {known})")
    return files[name]


# ---------------------------------------------------------------------------------------------
# dense ground truth: checking

Problem = tuple[str, str]  # (file, or file:line; what is wrong)


def _count(path: Path, items: list[str], what: str) -> list[Problem]:
    return [(str(path), f"{len(items)} {what} ({_examples(items)})")] if items else []


def _read_dense_files(name: str, caption_file: Path, gt_file: Path
                      ) -> tuple[list[Problem], list[Caption], GtFile | None]:
    """Problems of the two files on their own, the captions and the gt file."""
    problems: list[Problem] = []
    caps: list[Caption] = []
    gt = None
    for path in (caption_file, gt_file):
        if not path.is_file():
            problems.append((str(path), f"file of dense split '{name}' not found"))
    if caption_file.is_file():
        caps, bad = parse_caption_lines(caption_file)
        if bad:
            more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
            problems.append((f"{caption_file}:{bad[0][0]}", f"{bad[0][1]}{more}"))
        seen: dict[str, int] = {}
        for cap_id, _, _ in caps:
            seen[cap_id] = seen.get(cap_id, 0) + 1
        problems += _count(caption_file, [c for c, n in seen.items() if n > 1],
                           "caption ids appear more than once")
    if gt_file.is_file():
        gt = parse_gt_file(gt_file)
        if gt.malformed:
            (no, what), more = gt.malformed[0], len(gt.malformed) - 1
            problems.append((f"{gt_file}:{no}", what + (f" (and {more} more malformed lines)"
                                                         if more else "")))
        problems += _count(gt_file, gt.empty, "queries have an empty gt_video_ids list")
        problems += _count(gt_file, gt.duplicates, "query ids appear on more than one line")
        if not gt.rows and not gt.malformed and not gt.empty:
            problems.append((str(gt_file), f"dense split '{name}' has no queries"))
    return problems, caps, gt


def dense_problems(name: str, caption_file: str | Path, gt_file: str | Path,
                   has_frames: Callable[[str], bool] | None = None,
                   has_text: Callable[[str], bool] | None = None
                   ) -> tuple[list[Problem], DenseSplit | None]:
    """Every problem of a dense split (one line each, with a count and the first few offenders)
    and the split built from its good lines (None when a file is missing).

    Checked: malformed lines, duplicate ids, empty gt lists, query ids that are not captions of
    the caption file, ground-truth ids that are not videos of the caption file, and, when
    `has_frames` / `has_text` are given, videos without frames and queries without text
    features."""
    caption_file, gt_file = Path(caption_file), Path(gt_file)
    problems, caps, gt = _read_dense_files(name, caption_file, gt_file)
    if gt is None or not caption_file.is_file():
        return problems, None
    videos = list(dict.fromkeys(v for _, v, _ in caps))
    known_caps, known_vids = {c for c, _, _ in caps}, set(videos)
    problems += _count(gt_file, [q for q, _, _ in gt.rows if q not in known_caps],
                       f"query ids are not captions of {caption_file.name}")
    unknown = list(dict.fromkeys(v for _, _, g in gt.rows for v in g if v not in known_vids))
    problems += _count(gt_file, unknown, f"ground-truth video ids are not videos of {caption_file.name}")
    if has_frames is not None:
        problems += _count(caption_file, [v for v in videos if not has_frames(v)],
                           "videos have no frames in video2frames.txt")
    if has_text is not None:
        problems += _count(gt_file, [q for q, _, _ in gt.rows if not has_text(q)],
                           "queries have no text feature")
    split = DenseSplit(name, caption_file, gt_file, [q for q, _, _ in gt.rows],
                       [t for _, t, _ in gt.rows], [g for _, _, g in gt.rows], videos)
    return problems, split


def read_dense_split(paths: CollectionPaths, name: str,
                     has_frames: Callable[[str], bool] | None = None,
                     has_text: Callable[[str], bool] | None = None) -> DenseSplit:
    """Dense split `name` of the collection; DataError (one line: file and what is wrong, with
    the number of further problems) when anything is wrong with it."""
    problems, split = dense_problems(name, *dense_split_paths(paths, name), has_frames, has_text)
    if problems or split is None:
        where, what = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{where}: {what}{more}")
    return split


# The MLflow tag that carries `selection_warning` on a training run (read by prvr.compare).
SELECTION_TAG = "selection_warning"


def holdout_split_data(train, fraction: float, seed: int):
    """(training SplitData, validation SplitData) of a `prvr.data.datasets.SplitData` train split:
    `holdout_captions` on its captions; the validation split is named 'val' and keeps the
    training caption file as its source."""
    from .datasets import SplitData

    caps = list(zip(train.query_ids, train.query_video_ids, train.texts))
    parts = holdout_captions(caps, fraction, seed)
    out = []
    for name, part in zip(("train", "val"), parts):
        videos: dict[str, list[int]] = {}
        for i, (_, vid, _) in enumerate(part):
            videos.setdefault(vid, []).append(i)
        out.append(SplitData(name=name, caption_file=train.caption_file,
                             query_ids=[c for c, _, _ in part], query_video_ids=[v for _, v, _ in part],
                             texts=[t for _, _, t in part], video_ids=list(videos), video_queries=videos))
    return out[0], out[1]


def dense_split_data(split: DenseSplit):
    """A `prvr.data.datasets.SplitData` of a dense split (named as the split), for the eval
    loaders: its queries in gt-file order, each under its first relevant video, and the videos
    of its caption file. The ground truth of the metrics is `split.gt_video_ids`."""
    from .datasets import SplitData

    first = [g[0] for g in split.gt_video_ids]
    videos: dict[str, list[int]] = {v: [] for v in split.video_ids}
    for i, vid in enumerate(first):
        videos.setdefault(vid, []).append(i)
    return SplitData(name=split.name, caption_file=split.caption_file, query_ids=list(split.query_ids),
                     query_video_ids=first, texts=list(split.texts), video_ids=list(split.video_ids),
                     video_queries=videos)
