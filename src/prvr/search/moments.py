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
    """Per query: the mean IoU with the ground truth of a span of `length` rows placed uniformly
    at every start in its video of `n_rows` rows (the chance level of a localiser that knows only
    how long moments are)."""
    length = np.clip(np.asarray(length), 1, np.asarray(n_rows))
    starts = np.arange(int(np.max(n_rows)))[None, :]                       # (1, N)
    valid = starts <= (np.asarray(n_rows) - length)[:, None]                # (Q, N)
    iou = temporal_iou(starts, starts + length[:, None], np.asarray(gt0)[:, None], np.asarray(gt1)[:, None])
    return (iou * valid).sum(1) / valid.sum(1)


def read_ground_truth(path: Path, caption_texts: Mapping[str, str] | None = None,
                      n_frames: Mapping[str, int] | None = None) -> tuple[dict[str, tuple[str, int, int]], dict]:
    """({caption id: (video id, start row, end row)}, info) from a moments file: the demo's rows
    file, or TVR's annotations joined through `caption_texts` {caption id: text} and
    `n_frames` {video id: rows}. info says how many annotations matched."""
    out: dict[str, tuple[str, int, int]] = {}
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines, 1):
        try:
            rows.append(json.loads(ln))
        except ValueError:
            raise ValueError(f"{path}: line {i} is not JSON") from None
    if rows and "start_feature" in rows[0]:
        for r in rows:
            out[str(r["query_id"])] = (str(r["video_id"]), int(r["start_feature"]), int(r["end_feature"]))
        return out, {"annotations": len(rows), "matched": len(out), "format": "rows"}
    if caption_texts is None or n_frames is None:
        raise ValueError(f"{path}: second-based annotations need the captions and the videos' rows")
    by_key: dict[tuple[str, str], list[str]] = {}
    for cap_id, text in caption_texts.items():
        by_key.setdefault((cap_id.split("#", 1)[0], _norm(text)), []).append(cap_id)
    for r in rows:
        try:
            vid, text, (t0, t1), duration = str(r["vid_name"]), str(r["desc"]), r["ts"], float(r["duration"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: an annotation without vid_name, desc, ts [start, end] and duration") from None
        for cap_id in by_key.get((vid, _norm(text)), []):
            n = n_frames.get(vid)
            if n and duration > 0:
                start = min(int(math.floor(float(t0) / duration * n)), n - 1)
                end = max(min(int(math.ceil(float(t1) / duration * n)), n), start + 1)
                out[cap_id] = (vid, start, end)
    return out, {"annotations": len(rows), "matched": len(out), "captions": len(caption_texts), "format": "tvr"}


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


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
