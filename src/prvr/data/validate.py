"""Check an MS-SL collection before anything trains on it; write a JSON report.

`validate_collection(paths, visual_dim, text_dim)` returns a report::

    {"collection_dir", "collection", "feature", "ok",
     "dims": {"visual", "text", "expected_visual", "expected_text"},
     "frames": {"rows", "ids"},
     "splits": {split: {"videos", "captions", "frames_per_video": {min, median, max},
                        "tokens_per_caption": {min, median, max}}},
     "overlap": {"val_captions", "test_captions", "shared_captions", "val_videos",
                 "test_videos", "shared_videos", "identical"}   (val vs test; also a warning),
     "dense": {name: {"queries", "videos", "multi_video_queries", "max_videos_per_query"}},
     "problems": {"errors": [{"file", "message"}, ...], "warnings": [...]}}

Each problem is one line naming the file (relative to the collection folder) and what is
wrong; a check that finds many offenders reports one problem with a count and the first few.
Errors make the data unusable (the validate stage exits 1); warnings are informational.
Big files are streamed: feature.bin is memory-mapped and scanned in chunks, hdf5 caption
features one caption at a time, with tqdm bars.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from .layout import (SPLITS, CollectionPaths, DataError, caption_key_alias, parse_caption_lines,
                     parse_video2frames_text, read_ids, read_shape, split_video_ids, _decode_text,
                     _read_bytes)
from .splits import dense_problems, dense_split_files, split_overlap

log = logging.getLogger(__name__)

_SCAN_BYTES = 64 << 20  # feature.bin chunk size
_EXAMPLES = 3


def _examples(items: Iterable[str], n: int = _EXAMPLES) -> str:
    items = list(items)
    shown = ", ".join(f"'{str(x)[:80]}'" for x in items[:n])
    return shown + (", ..." if len(items) > n else "")


def _stats(values: list[int] | np.ndarray) -> dict[str, float | None]:
    arr = np.asarray(values)
    if arr.size == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


class _Problems:
    def __init__(self, root: Path):
        self.root = root
        self.errors: list[dict[str, str]] = []
        self.warnings: list[dict[str, str]] = []

    def _rel(self, path: Path | str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def error(self, path: Path | str, message: str) -> None:
        rel = self._rel(path)
        self.errors.append({"file": rel, "message": f"{rel}: {message}"})

    def warning(self, path: Path | str, message: str) -> None:
        rel = self._rel(path)
        self.warnings.append({"file": rel, "message": f"{rel}: {message}"})


def _scan_feature_bin(path: Path, n: int, d: int, ids: list[str] | None, progress: bool
                      ) -> tuple[int, list[str]]:
    """(number of rows with NaN/Inf, first few of their ids or row numbers)."""
    if n == 0:
        return 0, []
    data = np.memmap(path, dtype="<f4", mode="r", shape=(n, d))
    rows = max(1, _SCAN_BYTES // (4 * d))
    bad_count = 0
    first: list[str] = []
    with tqdm(total=n * d * 4, unit="B", unit_scale=True, desc="scan feature.bin",
              disable=not progress or n * d * 4 < _SCAN_BYTES) as bar:
        for start in range(0, n, rows):
            chunk = np.asarray(data[start:start + rows])
            ok = np.isfinite(chunk).all(axis=1)
            if not ok.all():
                bad = np.flatnonzero(~ok) + start
                bad_count += int(bad.size)
                for r in bad[:_EXAMPLES - len(first)]:
                    first.append(ids[r] if ids is not None and r < len(ids) else f"row {r}")
            bar.update(chunk.nbytes)
    del data
    return bad_count, first


def _check_overlap(paths: CollectionPaths, P: _Problems, split_caps: dict, report: dict) -> None:
    """Val vs test, by caption ids and video ids: counts in the report, a warning when shared."""
    if "val" not in split_caps or "test" not in split_caps:
        return
    o = report["overlap"] = split_overlap(split_caps["val"], split_caps["test"])
    if o["shared_captions"] or o["shared_videos"]:
        what = "is the test split" if o["identical"] else "overlaps the test split"
        P.warning(paths.caption_file("val"), f"the validation split {what}: {o['shared_captions']} of "
                  f"{o['test_captions']} test captions and {o['shared_videos']} of {o['test_videos']} "
                  "test videos; model selection on it sees the test split (train.val_split: holdout "
                  "avoids this)")


def _check_dense(paths: CollectionPaths, P: _Problems, names: Iterable[str],
                 v2f: dict[str, list[str]] | None, report: dict) -> None:
    """Dense ground-truth splits: every one in the folder, and each name asked for must exist."""
    try:
        files = dense_split_files(paths)
    except DataError as exc:
        P.error(paths.collection_dir, str(exc))
        return
    for name in names:
        if name not in files:
            P.error(paths.text_dir / f"{paths.collection}{name}.gt.jsonl", f"dense split '{name}' "
                    f"(evaluate.extra_splits) not found here nor in the collection folder")
    has_frames = None if v2f is None else (lambda v: bool(v2f.get(v)))
    h5 = None
    if paths.query_feat_file.is_file() and files:
        import h5py

        try:
            h5 = h5py.File(paths.query_feat_file, "r")
        except OSError:
            h5 = None  # reported by the text-feature checks
    try:
        for name, (cap, gt) in files.items():
            has_text = None if h5 is None else (
                lambda q: q in h5 or (caption_key_alias(q) or q) in h5)
            problems, split = dense_problems(name, cap, gt, has_frames, has_text)
            for where, what in problems:
                P.errors.append({"file": P._rel(where), "message": f"{P._rel(where)}: {what}"})
            if split is not None:
                report.setdefault("dense", {})[name] = {
                    "queries": len(split.query_ids), "videos": len(split.video_ids),
                    "multi_video_queries": split.multi,
                    "max_videos_per_query": max((len(g) for g in split.gt_video_ids), default=0)}
    finally:
        if h5 is not None:
            h5.close()


def _check_bigfile(paths: CollectionPaths, P: _Problems, split_videos: dict[str, list[str]],
                   splits: dict, visual_dim: int | None, progress: bool, report: dict
                   ) -> tuple[int | None, dict[str, list[str]] | None]:
    """shape.txt, id.txt, feature.bin and video2frames.txt: (feature dimension, video2frames)."""
    d, ids = _check_frame_features(paths, P, visual_dim, progress, report)
    v2f = _check_video2frames(paths, P, split_videos, splits, ids)
    return d, v2f


def _check_frame_features(paths: CollectionPaths, P: _Problems, visual_dim: int | None,
                          progress: bool, report: dict) -> tuple[int | None, list[str] | None]:
    """shape.txt, id.txt and feature.bin: (feature dimension, frame ids)."""
    n = d = None
    ids: list[str] | None = None
    try:
        n, d = read_shape(paths.shape_file)
    except DataError as exc:
        P.error(paths.shape_file, str(exc).split(": ", 1)[-1])
    if d is not None and visual_dim is not None and d != visual_dim:
        P.error(paths.shape_file, f"feature dimension {d} differs from visual_dim {visual_dim} "
                "in params.yaml")
    try:
        ids = read_ids(paths.id_file)
    except DataError as exc:
        P.error(paths.id_file, str(exc).split(": ", 1)[-1])
    if ids is not None:
        if n is not None and len(ids) != n:
            P.error(paths.id_file, f"{len(ids)} ids but shape.txt says {n} rows")
        if len(set(ids)) != len(ids):
            dup = [i for i, c in Counter(ids).items() if c > 1]
            P.error(paths.id_file, f"{len(dup)} frame ids appear more than once ({_examples(dup)})")
    if not paths.feature_file.is_file():
        P.error(paths.feature_file, "not found")
    elif n is not None and d is not None:
        size = paths.feature_file.stat().st_size
        if size != n * d * 4:
            P.error(paths.feature_file, f"{size} bytes, but shape.txt {n} x {d} float32 needs {n * d * 4}")
        else:
            bad_rows, first = _scan_feature_bin(paths.feature_file, n, d, ids, progress)
            if bad_rows:
                P.error(paths.feature_file, f"{bad_rows} frame vectors hold NaN or Inf ({_examples(first)})")
    report["frames"] = {"rows": n, "ids": None if ids is None else len(ids)}
    return d, ids


def _check_video2frames(paths: CollectionPaths, P: _Problems, split_videos: dict[str, list[str]],
                        splits: dict, ids: list[str] | None) -> dict[str, list[str]] | None:
    """video2frames.txt: parsed, every split video present with frames, frame ids in id.txt."""
    v2f: dict[str, list[str]] | None = None
    v2f_file = paths.video2frames_file
    try:
        text = _decode_text(_read_bytes(v2f_file))
        v2f, dup_keys = parse_video2frames_text(text, source=P._rel(v2f_file))
        if dup_keys:
            P.error(v2f_file, f"{len(dup_keys)} video ids appear more than once ({_examples(dup_keys)})")
    except DataError as exc:
        msg = str(exc)
        P.errors.append({"file": P._rel(v2f_file),
                         "message": msg if msg.startswith(P._rel(v2f_file)) else f"{P._rel(v2f_file)}: "
                         + msg.split(": ", 1)[-1]})
    if v2f is not None:
        for split, videos in split_videos.items():
            absent = [v for v in videos if v not in v2f]
            if absent:
                P.error(v2f_file, f"{len(absent)} videos of split '{split}' have no entry ({_examples(absent)})")
            empty = [v for v in videos if v in v2f and not v2f[v]]
            if empty:
                P.error(v2f_file, f"{len(empty)} videos of split '{split}' have 0 frames ({_examples(empty)})")
            splits[split]["frames_per_video"] = _stats([len(v2f[v]) for v in videos if v in v2f])
        if ids is not None:
            _check_v2f_frame_ids(v2f_file, P, v2f, ids, split_videos)
        repeated = [v for v, frames in v2f.items() if len(set(frames)) != len(frames)]
        if repeated:
            P.warning(v2f_file, f"{len(repeated)} videos list a frame id more than once "
                      f"({_examples(repeated)})")
    return v2f


def _check_v2f_frame_ids(v2f_file: Path, P: _Problems, v2f: dict[str, list[str]], ids: list[str],
                         split_videos: dict[str, list[str]]) -> None:
    """Frame ids of video2frames.txt missing from id.txt: an error for split videos, else a warning."""
    known = set(ids)
    referenced: set[str] = set()
    for frames in v2f.values():
        referenced.update(frames)
    unknown = referenced - known
    if unknown:
        used = set().union(*(v2f[v] for vs in split_videos.values() for v in vs if v in v2f)) \
            if split_videos else set()
        used_unknown = sorted(unknown & used)
        if used_unknown:
            P.error(v2f_file, f"{len(used_unknown)} frame ids are not in id.txt "
                    f"({_examples(used_unknown)})")
        other = sorted(unknown - used)
        if other:
            P.warning(v2f_file, f"{len(other)} frame ids of videos in no split are not in "
                      f"id.txt ({_examples(other)})")


def _check_h5_videos(paths: CollectionPaths, P: _Problems, split_videos: dict[str, list[str]],
                     splits: dict, visual_dim: int | None, progress: bool, report: dict
                     ) -> tuple[int | None, dict[str, range] | None]:
    """The per-video HDF5 file (feature_format hdf5, bigfile_hdf5): every video of a split present, a 2-d
    float dataset with frames, of width visual_dim, finite. (width, {video: range(frames)})."""
    from .h5features import scan_videos

    f = paths.video_feat_file
    scan = scan_videos(f, split_videos, progress)
    report["frames"] = {"videos": sum(len(v) for v in scan["frames"].values())}
    if scan["error"]:
        P.error(f, scan["error"])
        return None, None
    for split, videos in split_videos.items():
        for kind, what in (("absent", "have no features"), ("bad", "cannot be used"),
                           ("non_finite", "hold NaN or Inf")):
            found = scan[kind][split]
            if found:
                vid, why = found[0]
                P.error(f, f"{len(found)} videos of split '{split}' {what}: video '{vid}' {why}"
                        + (f" (also {_examples(v for v, _ in found[1:])})" if len(found) > 1 else ""))
        splits[split]["frames_per_video"] = _stats(scan["frames"][split])
    dims = Counter(scan["widths"].values())
    expected = visual_dim if visual_dim is not None else (max(dims, key=dims.get) if dims else None)
    off = [v for v, w in scan["widths"].items() if w != expected]
    if off:
        P.error(f, f"{len(off)} videos have a width other than {expected} (visual_dim in "
                f"params.yaml): video '{off[0]}' has width {scan['widths'][off[0]]}")
    return (next(iter(dims)) if len(dims) == 1 else None), {v: range(n) for v, n in scan["counts"].items()}


def _check_bigfile_hdf5(paths: CollectionPaths, P: _Problems, split_videos: dict[str, list[str]],
                        splits: dict, visual_dim: int | None, progress: bool, report: dict
                        ) -> tuple[int | None, dict[str, list[str]] | None]:
    """feature_format bigfile_hdf5: video2frames.txt as for BigFile (no id.txt to check frame
    ids against), feature.hdf5 as the per-video HDF5 file, and each split video's frame count
    in feature.hdf5 equal to the number of frames video2frames.txt lists."""
    v2f = _check_video2frames(paths, P, split_videos, splits, None)
    d, counts = _check_h5_videos(paths, P, split_videos, splits, visual_dim, progress, report)
    if v2f is not None and counts is not None:
        for split, videos in split_videos.items():
            off = [v for v in videos if v in v2f and v in counts and len(counts[v]) != len(v2f[v])]
            if off:
                v = off[0]
                P.error(paths.video_feat_file, f"{len(off)} videos of split '{split}' have a frame "
                        f"count other than {paths.video2frames_file.name} lists: video '{v}' has "
                        f"{len(counts[v])} frames, {paths.video2frames_file.name} lists {len(v2f[v])}"
                        + (f" (also {_examples(off[1:])})" if len(off) > 1 else ""))
    return d, v2f


def validate_collection(paths: CollectionPaths, visual_dim: int | None = None,
                        text_dim: int | None = None, progress: bool = True,
                        dense_splits: Iterable[str] = ()) -> dict[str, Any]:
    """Run every check on one collection; never raises for bad data (it is all in the report).

    Dense ground-truth splits found in the folder are always checked; `dense_splits` names those
    that must exist (evaluate.extra_splits)."""
    t0 = time.time()
    root = paths.collection_dir
    P = _Problems(root)
    report: dict[str, Any] = {
        "collection_dir": str(root), "collection": paths.collection, "feature": paths.feature,
    }
    splits, split_caps = _check_captions(paths, P)
    split_videos = {s: split_video_ids(c) for s, c in split_caps.items()}
    _warn_train_overlap(paths, P, split_videos)
    _check_overlap(paths, P, split_caps, report)

    # -- visual features ------------------------------------------------------------------------
    check = {"bigfile": _check_bigfile, "hdf5": _check_h5_videos,
             "bigfile_hdf5": _check_bigfile_hdf5}[paths.feature_format]
    d, v2f = check(paths, P, split_videos, splits, visual_dim, progress, report)

    # -- text features --------------------------------------------------------------------------
    text_dims = _check_text_features(paths, P, split_caps, splits, text_dim, progress)
    hfile = paths.query_feat_file
    if len(text_dims) > 1:
        P.error(hfile, f"caption features have different dimensions: {sorted(text_dims)}")
    _check_dense(paths, P, dense_splits, v2f, report)

    report["dims"] = {"visual": d, "text": sorted(text_dims)[0] if len(text_dims) == 1 else sorted(text_dims) or None,
                      "expected_visual": visual_dim, "expected_text": text_dim}
    report["splits"] = {s: splits[s] for s in SPLITS if s in splits}
    report["problems"] = {"errors": P.errors, "warnings": P.warnings}
    report["ok"] = not P.errors
    report["seconds"] = round(time.time() - t0, 3)
    return report


def _check_captions(paths: CollectionPaths, P: _Problems
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[tuple[str, str, str]]]]:
    """Each split's caption file: (per-split report counts, per-split parsed captions)."""
    splits: dict[str, dict[str, Any]] = {}
    split_caps: dict[str, list[tuple[str, str, str]]] = {}
    for split, cap_file in paths.caption_files.items():
        if not cap_file.is_file():
            P.error(cap_file, f"caption file of split '{split}' not found")
            continue
        try:
            caps, bad = parse_caption_lines(cap_file)
        except DataError as exc:
            P.error(cap_file, str(exc).split(": ", 1)[-1])
            continue
        if bad:
            no, what = bad[0]
            more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
            P.error(f"{P._rel(cap_file)}:{no}", f"{what}{more}")
        if not caps:
            P.error(cap_file, f"split '{split}' has no captions")
        dup = [cid for cid, c in Counter(cid for cid, _, _ in caps).items() if c > 1]
        if dup:
            P.error(cap_file, f"{len(dup)} caption ids appear more than once ({_examples(dup)})")
        split_caps[split] = caps
        splits[split] = {"videos": len(split_video_ids(caps)), "captions": len(caps)}
    return splits, split_caps


def _warn_train_overlap(paths: CollectionPaths, P: _Problems, split_videos: dict[str, list[str]]) -> None:
    """A warning for each val/test split that shares videos with train."""
    if "train" in split_videos:
        train_v = set(split_videos["train"])
        for s in ("val", "test"):
            shared = [v for v in split_videos.get(s, []) if v in train_v]
            if shared:
                P.warning(paths.caption_file(s), f"{len(shared)} videos of split '{s}' are also in "
                          f"train ({_examples(shared)})")


def _check_text_features(paths: CollectionPaths, P: _Problems,
                         split_caps: dict[str, list[tuple[str, str, str]]], splits: dict,
                         text_dim: int | None, progress: bool) -> set[int]:
    """The caption feature HDF5 file: every caption present, 2-d float, finite, of text_dim;
    returns the text feature dimensions seen."""
    text_dims: set[int] = set()
    hfile = paths.query_feat_file
    if not hfile.is_file():
        P.error(hfile, "not found")
    else:
        import h5py

        try:
            with h5py.File(hfile, "r") as h5:
                total = sum(len(c) for c in split_caps.values())
                bar = tqdm(total=total, desc="scan caption features", unit="caption",
                           disable=not progress or total < 5000)
                for split, caps in split_caps.items():
                    found = _scan_caption_features(h5, caps, text_dim, text_dims, bar)
                    _report_caption_features(P, hfile, split, text_dim, found)
                    splits[split]["tokens_per_caption"] = _stats(found["tokens"])
                bar.close()
        except OSError as exc:
            P.error(hfile, f"not a readable HDF5 file ({str(exc).splitlines()[0]})")
    return text_dims


def _scan_caption_features(h5: Any, caps: list[tuple[str, str, str]], text_dim: int | None,
                           text_dims: set[int], bar: tqdm) -> dict[str, Any]:
    """Read each caption's feature of one split; the captions by problem, and token counts."""
    import h5py

    fid = h5.id
    tokens: list[int] = []
    absent: list[str] = []
    empty: list[str] = []
    bad_shape: list[str] = []
    wrong_dim: Counter = Counter()
    non_finite: list[str] = []
    for cap_id, _, _ in caps:
        bar.update(1)
        # The low-level API is ~3x faster per caption than h5[cap_id][()].
        key = cap_id if cap_id in h5 else (caption_key_alias(cap_id) or cap_id)
        try:
            node = h5py.h5d.open(fid, key.encode("utf-8"))
        except KeyError:  # absent, or a group / other non-dataset object
            (bad_shape if key in h5 else absent).append(cap_id)
            continue
        shape, dtype = node.shape, node.dtype
        if len(shape) not in (1, 2) or not np.issubdtype(dtype, np.floating):
            bad_shape.append(cap_id)
            continue
        t, dt = shape if len(shape) == 2 else (1, shape[0])  # (D,): one vector
        tokens.append(t)
        text_dims.add(int(dt))
        if text_dim is not None and dt != text_dim:
            wrong_dim[int(dt)] += 1
        if t == 0:
            empty.append(cap_id)
            continue
        values = np.empty(shape, dtype)
        node.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
        if not np.isfinite(values).all():
            non_finite.append(cap_id)
    return {"tokens": tokens, "absent": absent, "empty": empty, "bad_shape": bad_shape,
            "wrong_dim": wrong_dim, "non_finite": non_finite}


def _report_caption_features(P: _Problems, hfile: Path, split: str, text_dim: int | None,
                             found: dict[str, Any]) -> None:
    """One error per kind of caption feature problem of a split."""
    absent, bad_shape, wrong_dim = found["absent"], found["bad_shape"], found["wrong_dim"]
    empty, non_finite = found["empty"], found["non_finite"]
    if absent:
        P.error(hfile, f"{len(absent)} captions of split '{split}' have no text "
                f"feature ({_examples(absent)})")
    if bad_shape:
        P.error(hfile, f"{len(bad_shape)} caption features of split '{split}' are "
                f"not 2-d float arrays ({_examples(bad_shape)})")
    if wrong_dim:
        dims = ", ".join(f"{k} ({v} captions)" for k, v in sorted(wrong_dim.items()))
        P.error(hfile, f"split '{split}': text feature dimension {dims} differs from "
                f"text_dim {text_dim} in params.yaml")
    if empty:
        P.error(hfile, f"{len(empty)} captions of split '{split}' have 0 tokens "
                f"({_examples(empty)})")
    if non_finite:
        P.error(hfile, f"{len(non_finite)} caption features of split '{split}' hold "
                f"NaN or Inf ({_examples(non_finite)})")


def report_path(settings: dict[str, Any], data_dir: str | os.PathLike = "data") -> Path:
    return Path(data_dir) / str(settings["dataset"]) / "validation.json"


def write_offset_indexes(paths: CollectionPaths, cache_dir: str | os.PathLike) -> None:
    """Build (or confirm) the offset index of each HDF5 file of the collection in cache_dir
    (data/<dataset>/h5index), so that training and evaluation load it instead of opening every
    dataset through HDF5. A file that cannot be indexed is skipped: the report names it."""
    from .h5index import load_index

    for path in paths.video_h5_files + [paths.query_feat_file]:
        try:
            load_index(path, cache_dir)
        except DataError:
            continue


def validate(settings: dict[str, Any], data_dir: str | os.PathLike = "data", progress: bool = True
             ) -> tuple[dict[str, Any], Path]:
    """Validate the dataset of the resolved settings and write data/<dataset>/validation.json,
    and, when it holds no errors, the offset indexes of its HDF5 files in data/<dataset>/h5index.

    The report is written (atomically) whether or not it holds errors. A corpus that cannot be
    located at all raises DataError.
    """
    from ..atomic import write_json_atomic
    from .h5index import index_dir
    from .layout import locate

    paths = locate(settings, data_dir, must_exist=False)
    if not paths.collection_dir.is_dir():
        raise DataError(f"{paths.collection_dir}: no MS-SL collection folder here "
                        f"(dataset '{settings['dataset']}'); run the fetch stage")
    report = validate_collection(paths, settings.get("visual_dim"), settings.get("text_dim"), progress,
                                 (settings.get("evaluate") or {}).get("extra_splits") or ())
    report = {"dataset": settings["dataset"], **report}
    if report["ok"]:            # a collection with errors stops the pipeline: nothing to index
        write_offset_indexes(paths, index_dir(settings, data_dir))
    out = report_path(settings, data_dir)
    write_json_atomic(out, report)
    return report, out
