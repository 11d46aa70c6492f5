"""Moment metrics of a search (docs/search.md): did the right video come back, and where in it.

Spans are feature rows [start, end) of a video's own features. Ground truth comes from
- the demo generator's opt-in `<collection>test.moments.jsonl` (rows already), or
- TVR's released annotations (`tvr_val_release.jsonl`: desc, vid_name, ts [start, end] in
  seconds, duration), joined to MS-SL's caption ids `<vid>#enc#<n>` by video and caption text;
  seconds become rows through the video's duration and its row count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

KS = (1, 5, 10)
IOUS = (0.3, 0.5, 0.7)


def temporal_iou(a0, a1, b0, b1) -> np.ndarray:
    """IoU of spans [a0, a1) and [b0, b1), elementwise (broadcasting)."""
    a0, a1, b0, b1 = (np.asarray(x, dtype=np.float64) for x in (a0, a1, b0, b1))
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)
    union = (a1 - a0) + (b1 - b0) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def chance_iou(length: np.ndarray, n_rows: np.ndarray, gt0: np.ndarray, gt1: np.ndarray) -> np.ndarray:
    """Per query: the chance level of a localiser. The expected IoU with the ground truth
    [gt0, gt1) of a span as long as the one localised (`length` rows, clipped to [1, n_rows])
    whose start is drawn uniformly from the n_rows - length + 1 starts that keep it inside the
    video of `n_rows` rows: a localiser that got the length right and the place at random."""
    n_rows = np.maximum(np.asarray(n_rows, dtype=np.int64), 1)
    length = np.clip(np.asarray(length, dtype=np.int64), 1, n_rows)
    starts = np.arange(int(np.max(n_rows)))[None, :]                       # (1, N)
    valid = starts <= (n_rows - length)[:, None]                            # (Q, N)
    iou = temporal_iou(starts, starts + length[:, None], np.asarray(gt0)[:, None], np.asarray(gt1)[:, None])
    return (iou * valid).sum(1) / valid.sum(1)


def read_ground_truth(path: Path, caption_texts: Mapping[str, str] | None = None,
                      n_frames: Mapping[str, int] | None = None) -> tuple[dict[str, tuple[str, int, int]], dict]:
    """({caption id: (video id, start row, end row)}, info) from a moments file (JSON lines, only
    parsed): the demo's rows file {"query_id", "video_id", "start_feature", "end_feature"}, or
    TVR's annotations {"desc", "vid_name", "ts": [start, end] s, "duration"} joined to caption
    ids through `caption_texts` {caption id: text} and `n_frames` {video id: rows}. info counts
    the annotations, the captions matched and (TVR) the annotations that matched no caption.
    A malformed line is a ValueError naming the file and the line."""
    path = Path(path)
    rows: list[tuple[int, dict]] = []
    for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            r = json.loads(ln)
        except ValueError:
            raise ValueError(f"{path}: line {i} is not JSON") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object")
        rows.append((i, r))
    if not rows:
        raise ValueError(f"{path}: no annotations")
    if "start_feature" in rows[0][1]:
        return _read_rows(path, rows)
    return _join_tvr(path, rows, caption_texts, n_frames)


def _read_rows(path: Path, rows: list[tuple[int, dict]]) -> tuple[dict[str, tuple[str, int, int]], dict]:
    out: dict[str, tuple[str, int, int]] = {}
    for i, r in rows:
        try:
            qid, vid, start, end = str(r["query_id"]), str(r["video_id"]), r["start_feature"], r["end_feature"]
        except KeyError as exc:
            raise ValueError(f"{path}: line {i} lacks {exc.args[0]} (a rows file has query_id, video_id, "
                             f"start_feature, end_feature)") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)) or not 0 <= start < end:
            raise ValueError(f"{path}: line {i}: start_feature {start!r}, end_feature {end!r}: expected "
                             f"integers 0 <= start < end")
        out[qid] = (vid, start, end)
    return out, {"annotations": len(rows), "matched": len(out), "format": "rows"}


def _join_tvr(path: Path, rows: list[tuple[int, dict]], caption_texts: Mapping[str, str] | None,
              n_frames: Mapping[str, int] | None) -> tuple[dict[str, tuple[str, int, int]], dict]:
    """TVR's seconds become rows through the video's duration and its row count (the features
    span the video evenly): [floor(t0 / duration * n), ceil(t1 / duration * n)), clipped to the
    video, at least one row. Only videos of `n_frames` (the indexed collection) take part."""
    if caption_texts is None or n_frames is None:
        raise ValueError(f"{path}: second-based annotations need the captions and the videos' rows")
    by_key: dict[tuple[str, str], list[str]] = {}
    for cap_id, text in caption_texts.items():
        by_key.setdefault((cap_id.split("#", 1)[0], _norm(text)), []).append(cap_id)
    out: dict[str, tuple[str, int, int]] = {}
    unmatched = 0
    for i, r in rows:
        try:
            vid, text, ts, duration = str(r["vid_name"]), str(r["desc"]), r["ts"], float(r["duration"])
            t0, t1 = (float(t) for t in ts)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: line {i}: expected vid_name, desc, ts [start, end] and duration "
                             f"(TVR's annotation format) or query_id, video_id, start_feature, end_feature") from None
        if not (duration > 0 and math.isfinite(duration) and math.isfinite(t0) and math.isfinite(t1) and t0 <= t1):
            raise ValueError(f"{path}: line {i}: ts {ts!r}, duration {r['duration']!r}: expected "
                             f"0 <= start <= end and duration > 0")
        caps = by_key.get((vid, _norm(text)), [])
        n = int(n_frames.get(vid, 0))
        if not caps or n <= 0:
            unmatched += 1
            continue
        # a row boundary computed in floating point (e.g. 3.5 / 7.0 * 14) stays that boundary
        start = min(max(int(math.floor(t0 / duration * n + 1e-6)), 0), n - 1)
        end = max(min(int(math.ceil(t1 / duration * n - 1e-6)), n), start + 1)
        for cap_id in caps:
            out[cap_id] = (vid, start, end)
    return out, {"annotations": len(rows), "matched": len(out), "unmatched_annotations": unmatched,
                 "captions": len(caption_texts), "format": "tvr"}


def _norm(text: str) -> str:
    """Caption text for the join: lower case, words only (punctuation and spacing differ)."""
    return " ".join("".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split())


def moment_metrics(results: Sequence[Mapping[str, Any]], truth: Mapping[str, tuple[str, int, int]],
                   own: Mapping[str, tuple[int, int]], n_frames: Mapping[str, int],
                   ks: Iterable[int] = KS, ious: Iterable[float] = IOUS) -> dict[str, float]:
    """Over the queries with ground truth: R@k of the right video with IoU >= t
    (`r{k}_iou{t}`), and the mean IoU of the moment localised in the right video (`own`: query
    id -> its span there, found whatever the ranking) against the chance level."""
    ks, ious = list(ks), list(ious)
    rs = [r for r in results if r["query_id"] in truth]
    out: dict[str, float] = {"moment_queries": float(len(rs))}
    if not rs:
        return out
    K = max(ks)
    hit_iou = np.zeros((len(rs), K))
    for i, r in enumerate(rs):
        vid, g0, g1 = truth[r["query_id"]]
        for j, h in enumerate(r["hits"][:K]):
            if h["video_id"] == vid:
                m = h["moment"]
                hit_iou[i, j] = temporal_iou(m["start_feature"], m["end_feature"], g0, g1)
    for k in ks:
        for t in ious:
            out[f"r{k}_iou{t}"] = 100.0 * float((hit_iou[:, :k] >= t).any(1).mean())
    q = [r["query_id"] for r in rs if r["query_id"] in own]
    if q:
        p0, p1 = np.array([own[x][0] for x in q]), np.array([own[x][1] for x in q])
        g0, g1 = np.array([truth[x][1] for x in q]), np.array([truth[x][2] for x in q])
        n = np.array([n_frames[truth[x][0]] for x in q])
        out["iou_right_video"] = float(temporal_iou(p0, p1, g0, g1).mean())
        out["iou_chance"] = float(chance_iou(p1 - p0, n, g0, g1).mean())
    return out
