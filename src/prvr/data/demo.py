"""Embedded corpus generator: synthetic PRVR data in the exact MS-SL layout.

The corpus is a real partially-relevant retrieval task, built from a latent model:

* A shared *event vocabulary* of latent vectors (dimension `latent_dim`), and a shared
  *scene vocabulary* for backgrounds.
* Every video is untrimmed: `n` frames (variable, some longer than 128) made of background
  frames (its scene latent) and several non-overlapping *moments*. A moment is one event of
  the vocabulary plus an instance perturbation, and spans a contiguous frame range.
  Frame latents get a small per-frame drift and are rendered into the visual feature
  space by ONE fixed random projection `A` (visual_dim x latent_dim) plus Gaussian noise.
* Every caption describes exactly ONE moment of its video: its content tokens are the
  moment latent (plus a per-token perturbation) rendered into text space by a different
  fixed projection `B` (text_dim x latent_dim) plus noise; filler tokens (a shared filler
  vocabulary, no visual meaning) are mixed in at random positions. Token counts vary and
  some captions have more than 30 tokens.

So a caption matches only part of its video: scoring the best-matching temporal bin beats
pooling the whole video (tests/test_demo.py checks this with the oracle map A pinv(B)).

Everything is a deterministic function of (preset, seed, scale): each video draws from its
own generator seeded by (seed, split, index), so the output files are byte-identical across
runs and the real-dataset-shaped presets can be written as a stream, one video at a time.
Output is built in a temporary folder next to the target and renamed into place.

Two options, off by default (the default corpus stays byte-identical), feed the honest-numbers
checks: `val_is_test` writes the test captions as the validation split too (MS-SL's TVR), and
`dense_gt` writes a dense multi-ground-truth split `<collection>denseval` (caption file and
.gt.jsonl in the collection folder, see prvr.data.splits): a test caption's videos are its own
and every other test video that shows a moment of the same latent event.

CLI: python -m prvr.data.demo --out DIR --preset demo --seed 7 [--scale S] [--dense-gt] [--val-is-test]
     [--videos TRAIN,VAL,TEST] [--frames LO,HI] [--frames-median M] [--captions LO,HI]
(the last four: other sizes on the preset's content model, see `custom_preset`)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class SplitSize:
    videos: int
    captions: int | None = None  # exact total; None: each video draws from caps_range


@dataclass(frozen=True)
class Preset:
    name: str
    collection: str
    feature: str
    visual_dim: int
    text_dim: int
    splits: dict[str, SplitSize]
    caps_range: tuple[int, int] = (2, 6)      # per video, used when a split has no exact total
    frames_range: tuple[int, int] = (20, 200)  # clip bounds of the video length
    frames_median: float = 70.0                # log-normal median of the video length
    frames_sigma: float = 0.55
    latent_dim: int = 48
    n_events: int = 160
    n_scenes: int = 24
    n_fillers: int = 24
    extra_moments: tuple[int, int] = (0, 2)    # uncaptioned moments per video (inclusive)
    moment_frac: tuple[float, float] = (0.06, 0.22)
    instance_scale: float = 0.5   # moment latent = event + instance_scale * N(0, I)
    scene_scale: float = 0.8      # background latent = scale * (scene + 0.6 N(0, I))
    drift_scale: float = 0.35     # per-frame latent drift
    visual_noise: float = 1.8     # per-coordinate visual noise (signal has unit variance)
    token_jitter: float = 1.0     # per-content-token latent perturbation
    text_noise: float = 1.4       # per-coordinate text noise
    content_tokens: tuple[int, int] = (3, 16)
    filler_tokens: tuple[int, int] = (2, 20)
    streaming: bool = False
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        name="demo", collection="demo", feature="demo_feats", visual_dim=256, text_dim=128,
        splits={"train": SplitSize(600), "val": SplitSize(150), "test": SplitSize(150)},
        caps_range=(2, 6), frames_range=(20, 200), frames_median=70.0,
    ),
    # Real-dataset-shaped presets: sizes from the MS-SL data page (val = test sizes).
    "tvr-shaped": Preset(
        name="tvr-shaped", collection="tvr", feature="i3d_resnet", visual_dim=3072, text_dim=768,
        splits={"train": SplitSize(17435, 87175), "val": SplitSize(2179, 10895),
                "test": SplitSize(2179, 10895)},
        frames_range=(16, 140), frames_median=60.0, frames_sigma=0.4, n_events=600,
        n_scenes=80, streaming=True,
    ),
    "act-shaped": Preset(
        name="act-shaped", collection="activitynet", feature="i3d", visual_dim=1024, text_dim=1024,
        splits={"train": SplitSize(9043, 33721), "val": SplitSize(4430, 15753),
                "test": SplitSize(4430, 15753)},
        frames_range=(16, 400), frames_median=90.0, frames_sigma=0.6, n_events=600,
        n_scenes=80, streaming=True,
    ),
    "cha-shaped": Preset(
        name="cha-shaped", collection="charades", feature="i3d_rgb_lgi", visual_dim=1024,
        text_dim=1024,
        splits={"train": SplitSize(5538, 12408), "val": SplitSize(1334, 3720),
                "test": SplitSize(1334, 3720)},
        frames_range=(12, 160), frames_median=40.0, frames_sigma=0.45, n_events=400,
        n_scenes=60, streaming=True,
    ),
}
# CLIP-layout presets (DL-DKD's per-video / per-caption HDF5 files, 512-d video and queries):
# the real-dataset-shaped content at CLIP's widths; TVR / ActivityNet query files keyed
# <video>#<n> as DL-DKD's are (read through layout.caption_key_alias).
for _name, _alias in (("tvr", True), ("act", True), ("cha", False)):
    _base = PRESETS[f"{_name}-shaped"]
    PRESETS[f"{_name}-clip"] = Preset(**{
        **_base.__dict__, "name": f"{_name}-clip", "visual_dim": 512, "text_dim": 512,
        "extra": {"layout": "hdf5", "alias_keys": _alias}})

_VERBS = ("opens", "closes", "holds", "throws", "picks up", "puts down", "looks at", "walks to",
          "sits on", "stands by", "pours", "cuts", "washes", "reads", "talks to", "hugs",
          "points at", "carries", "drops", "pushes")
_OBJECTS = ("the door", "a cup", "the phone", "a book", "the table", "a chair", "the window",
            "a bag", "the laptop", "a knife", "the bottle", "a box", "the bed", "a towel",
            "the car", "a dog", "the camera", "a guitar", "the sofa", "a ball", "the lamp",
            "a plate", "the mirror", "a broom", "the fridge", "a shoe", "the blanket",
            "a letter", "the stove", "a jacket")
_SUBJECTS = ("someone", "a man", "a woman", "the person", "a boy", "a girl", "he", "she")
_FILLERS = ("then", "slowly", "again", "quickly", "while", "and", "after", "that", "in", "the",
            "room", "near", "with", "his", "her", "hand")


# --------------------------------------------------------------------------- sizes

def _scaled(preset: Preset, scale: float) -> dict[str, SplitSize]:
    if not (scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    out = {}
    for split, size in preset.splits.items():
        n = max(1, int(round(size.videos * scale)))
        # keep the captions-per-video ratio (TVR: exactly 5 per video at every scale)
        caps = None if size.captions is None else max(n, int(round(n * size.captions / size.videos)))
        out[split] = SplitSize(n, caps)
    return out


def _split_plan(preset: Preset, size: SplitSize, seed: int, split: str):
    """Per-video (n_frames, n_captions) for one split, deterministic."""
    rng = np.random.default_rng([seed, 2, _SPLIT_CODE[split]])
    lo, hi = preset.frames_range
    lengths = np.exp(rng.normal(math.log(preset.frames_median), preset.frames_sigma, size.videos))
    lengths = np.clip(np.rint(lengths), lo, hi).astype(np.int64)
    if size.captions is None:
        clo, chi = preset.caps_range
        caps = rng.integers(clo, chi + 1, size.videos)
    else:
        extra = size.captions - size.videos
        caps = 1 + rng.multinomial(extra, np.full(size.videos, 1.0 / size.videos))
    return lengths, caps.astype(np.int64)


# --------------------------------------------------------------------------- latent world

@dataclass
class _World:
    A: np.ndarray        # (Dv, d) visual projection
    B: np.ndarray        # (Dt, d) text projection
    events: np.ndarray   # (n_events, d)
    scenes: np.ndarray   # (n_scenes, d)
    fillers: np.ndarray  # (n_fillers, Dt)


def _world(preset: Preset, seed: int) -> _World:
    rng = np.random.default_rng([seed, 0])
    d = preset.latent_dim
    A = (rng.standard_normal((preset.visual_dim, d)) / math.sqrt(d)).astype(np.float32)
    B = (rng.standard_normal((preset.text_dim, d)) / math.sqrt(d)).astype(np.float32)
    events = rng.standard_normal((preset.n_events, d)).astype(np.float32)
    scenes = rng.standard_normal((preset.n_scenes, d)).astype(np.float32)
    fillers = rng.standard_normal((preset.n_fillers, preset.text_dim)).astype(np.float32)
    return _World(A, B, events, scenes, fillers)


def _moment_spans(rng: np.random.Generator, n: int, k: int, frac: tuple[float, float]):
    """k non-overlapping [start, end) spans in [0, n), in random temporal order."""
    lengths = np.maximum(1, np.rint(n * rng.uniform(frac[0], frac[1], k))).astype(np.int64)
    budget = max(k, int(0.8 * n))
    if lengths.sum() > budget:
        lengths = np.maximum(1, np.floor(lengths * budget / lengths.sum())).astype(np.int64)
    while lengths.sum() > n:  # rounding up to 1 frame each can overshoot on tiny videos
        lengths[np.argmax(lengths)] -= 1
    gap_total = n - int(lengths.sum())
    gaps = rng.multinomial(gap_total, rng.dirichlet(np.ones(k + 1)))
    order = rng.permutation(k)  # temporal slot of moment j is order[j]
    spans = np.zeros((k, 2), dtype=np.int64)
    pos = 0
    slot_len = lengths[np.argsort(order)]  # length of the moment placed in each slot
    slot_start = []
    for s in range(k):
        pos += int(gaps[s])
        slot_start.append(pos)
        pos += int(slot_len[s])
    for j in range(k):
        s = order[j]
        spans[j] = (slot_start[s], slot_start[s] + slot_len[s])
    return spans


def _moment_events(preset: Preset, rng: np.random.Generator, n: int, n_caps: int):
    """(number of moments k, event id of each moment): the first draws of a video's generator."""
    k = n_caps + int(rng.integers(preset.extra_moments[0], preset.extra_moments[1] + 1))
    k = min(k, n)
    return k, rng.integers(0, preset.n_events, k)


def _render_video(preset: Preset, world: _World, seed: int, split: str, index: int,
                  n: int, n_caps: int):
    """Frames (n, Dv) float32 and, per caption, (tokens (L, Dt) float32, text)."""
    rng = np.random.default_rng([seed, 1, _SPLIT_CODE[split], index])
    d = preset.latent_dim
    k, event_ids = _moment_events(preset, rng, n, n_caps)
    moments = world.events[event_ids] + preset.instance_scale * rng.standard_normal((k, d)).astype(np.float32)
    scene = world.scenes[rng.integers(0, preset.n_scenes)]
    background = preset.scene_scale * (scene + 0.6 * rng.standard_normal(d).astype(np.float32))
    latents = np.broadcast_to(background, (n, d)).copy()
    spans = _moment_spans(rng, n, k, preset.moment_frac)
    for j in range(k):
        latents[spans[j, 0]:spans[j, 1]] = moments[j]
    latents += preset.drift_scale * rng.standard_normal((n, d)).astype(np.float32)
    frames = latents @ world.A.T
    frames += preset.visual_noise * rng.standard_normal(frames.shape, dtype=np.float32)

    # Captions: each describes one distinct captioned moment (the first n_caps moments when
    # there are enough; a video shorter than its caption count reuses moments).
    captions = []
    for c in range(n_caps):
        j = c % k
        n_content = int(rng.integers(preset.content_tokens[0], preset.content_tokens[1] + 1))
        n_filler = int(rng.integers(preset.filler_tokens[0], preset.filler_tokens[1] + 1))
        content = moments[j] + preset.token_jitter * rng.standard_normal((n_content, d)).astype(np.float32)
        content = content @ world.B.T
        filler = world.fillers[rng.integers(0, preset.n_fillers, n_filler)]
        tokens = np.concatenate([content, filler], axis=0)
        tokens = tokens[rng.permutation(len(tokens))]
        tokens = tokens + preset.text_noise * rng.standard_normal(tokens.shape, dtype=np.float32)
        e = int(event_ids[j])
        words = [_SUBJECTS[int(rng.integers(len(_SUBJECTS)))], _VERBS[e % len(_VERBS)],
                 _OBJECTS[(e // len(_VERBS)) % len(_OBJECTS)]]
        words += [_FILLERS[int(i)] for i in rng.integers(0, len(_FILLERS), min(n_filler, 6))]
        captions.append((tokens.astype(np.float32, copy=False), " ".join(words)))
    caption_spans = spans[np.arange(n_caps) % k]
    return frames.astype("<f4", copy=False), captions, caption_spans


def _single_thread_blas():
    """The matmuls here are small: extra BLAS threads only fight other processes for cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its default thread count
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def video_id(preset: Preset, split: str, index: int) -> str:
    return f"{preset.collection}_{split}_{index:06d}"


# --------------------------------------------------------------------------- writer

def dense_ground_truth(preset: Preset, seed: int, lengths: np.ndarray, caps: np.ndarray,
                       split: str = "test") -> list[tuple[str, list[str]]]:
    """[(caption id, its videos)] of a split: a caption fits its own video and every other
    video of the split with a moment of the same event (own video first, then split order)."""
    events, cap_events = [], []
    for i in range(len(lengths)):
        rng = np.random.default_rng([seed, 1, _SPLIT_CODE[split], i])
        k, ev = _moment_events(preset, rng, int(lengths[i]), int(caps[i]))
        events.append(set(ev.tolist()))
        cap_events.append([int(ev[c % k]) for c in range(int(caps[i]))])
    by_event: dict[int, list[int]] = {}
    for i, ev in enumerate(events):
        for e in sorted(ev):
            by_event.setdefault(e, []).append(i)
    out = []
    for i, evs in enumerate(cap_events):
        vid = video_id(preset, split, i)
        for c, e in enumerate(evs):
            others = [video_id(preset, split, j) for j in by_event[e] if j != i]
            out.append((f"{vid}#enc#{c}", [vid, *others]))
    return out


def write_moments(p: Preset, world: _World, seed: int, plan, path: Path, split: str = "test") -> None:
    """Each caption's moment of a split (its video re-rendered: the spans its captions describe)."""
    lengths, caps = plan
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for i in range(len(lengths)):
            vid = video_id(p, split, i)
            spans = _render_video(p, world, seed, split, i, int(lengths[i]), int(caps[i]))[2]
            for c, (start, end) in enumerate(spans.tolist()):
                fh.write(json.dumps({"query_id": f"{vid}#enc#{c}", "video_id": vid,
                                     "start_feature": int(start), "end_feature": int(end)}) + "\n")


def _write_options(p: Preset, tmp: Path, seed: int, plans, dense_gt: bool, val_is_test: bool) -> None:
    """The optional files: val captions = test captions; the dense split of the test videos."""
    text_dir = tmp / "TextData"
    test_caps = text_dir / f"{p.collection}test.caption.txt"
    if val_is_test:
        shutil.copyfile(test_caps, text_dir / f"{p.collection}val.caption.txt")
    if dense_gt:
        texts = dict(line.split(" ", 1) for line in test_caps.read_text(encoding="utf-8").splitlines())
        shutil.copyfile(test_caps, tmp / f"{p.collection}denseval.caption.txt")
        with open(tmp / f"{p.collection}denseval.gt.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for cap_id, videos in dense_ground_truth(p, seed, *plans["test"]):
                fh.write(json.dumps({"query_id": cap_id, "caption": texts[cap_id],
                                     "gt_video_ids": videos}) + "\n")


def _write_bigfile_corpus(p: Preset, world: _World, seed: int, plans, sizes: dict[str, SplitSize],
                          tmp: Path, bar: tqdm) -> tuple[int, int]:
    """TextData/ (captions, RoBERTa-like query tokens) and FeatureData/<feature>/ (bigfile) under
    tmp; returns (frame rows, captions) written."""
    text_dir = tmp / "TextData"
    feat_dir = tmp / "FeatureData" / p.feature
    text_dir.mkdir(parents=True)
    feat_dir.mkdir(parents=True)
    n_rows = 0
    n_caps_total = 0
    with open(feat_dir / "feature.bin", "wb") as fbin, \
            open(feat_dir / "id.txt", "w", encoding="ISO-8859-1", newline="\n") as fid, \
            open(feat_dir / "video2frames.txt", "w", encoding="ISO-8859-1", newline="\n") as fv2f, \
            h5py.File(text_dir / f"roberta_{p.collection}_query_feat.hdf5", "w") as h5:
        fv2f.write("{")
        first_video = True
        for split in SPLITS:
            with open(text_dir / f"{p.collection}{split}.caption.txt", "w",
                      encoding="utf-8", newline="\n") as fcap:
                for i in range(sizes[split].videos):
                    rows, n_caps = _write_video(p, world, seed, split, i, plans[split],
                                                (fbin, fid, fv2f, h5, fcap), first_video)
                    first_video = False
                    n_rows += rows
                    n_caps_total += n_caps
                    bar.update(1)
        fv2f.write("}\n")
    with open(feat_dir / "shape.txt", "w", encoding="ascii", newline="\n") as fh:
        fh.write(f"{n_rows} {p.visual_dim}\n")
    return n_rows, n_caps_total


def _write_video(p: Preset, world: _World, seed: int, split: str, i: int, plan, files,
                 first_video: bool) -> tuple[int, int]:
    """Render video i of split and append it to the open corpus files; returns (frames, captions)."""
    fbin, fid, fv2f, h5, fcap = files
    lengths, caps = plan
    vid = video_id(p, split, i)
    frames, captions, _ = _render_video(p, world, seed, split, i, int(lengths[i]), int(caps[i]))
    fbin.write(frames.tobytes())
    frame_ids = [f"{vid}_{t}" for t in range(len(frames))]
    fid.write(" ".join(frame_ids))
    fid.write("\n")
    fv2f.write(("" if first_video else ", ") + repr(vid) + ": " + repr(frame_ids))
    for c, (tokens, text) in enumerate(captions):
        cap_id = f"{vid}#enc#{c}"
        fcap.write(f"{cap_id} {text}\n")
        h5.create_dataset(cap_id, data=tokens, track_times=False)
    return len(frames), len(captions)


def custom_preset(base: str, videos: tuple[int, int, int] | None = None,
                  frames: tuple[int, int] | None = None, captions: tuple[int, int] | None = None,
                  frames_median: float | None = None) -> Preset:
    """Preset `base` with other sizes: (train, val, test) videos (each video then draws its
    caption count from `captions`, else the base's caps_range), frame-count bounds and median.
    Without arguments it is the base preset itself (same corpus, byte for byte)."""
    if base not in PRESETS:
        raise ValueError(f"unknown preset '{base}' (known: {', '.join(PRESETS)})")
    p, kw = PRESETS[base], {}
    if videos is not None:
        if len(videos) != 3 or min(videos) < 1:
            raise ValueError(f"videos: expected three counts >= 1 (train, val, test), got {videos}")
        kw["splits"] = {s: SplitSize(int(n)) for s, n in zip(SPLITS, videos)}
    for name, pair in (("frames_range", frames), ("caps_range", captions)):
        if pair is not None:
            if len(pair) != 2 or not 1 <= pair[0] <= pair[1]:
                raise ValueError(f"{name}: expected LO,HI with 1 <= LO <= HI, got {pair}")
            kw[name] = (int(pair[0]), int(pair[1]))
    if frames_median is not None:
        kw["frames_median"] = float(frames_median)
    if not kw:
        return p
    return Preset(**{**p.__dict__, **kw, "name": f"{base}-custom"})


def generate_corpus(out_dir: str | os.PathLike, preset: str | Preset = "demo", seed: int = 7,
                    scale: float = 1.0, progress: bool = True, dense_gt: bool = False,
                    val_is_test: bool = False, layout: str | None = None,
                    video_file: str | None = None, query_file: str | None = None,
                    moments: bool = False) -> Path:
    """Write `<out_dir>/<collection>/` in MS-SL layout; returns that folder.

    `layout` (default: the preset's, else 'bigfile'): 'bigfile' (FeatureData/<feature>/),
    'hdf5' (the CLIP layout instead: FeatureData/<video_file>, TextData/<query_file>, see
    write_h5_layout), 'both', or 'bigfile_hdf5' (FeatureData/<feature>/feature.hdf5 +
    video2frames.txt, see write_frames_h5_layout).

    Deterministic in (preset, seed, scale, options). Builds in a temporary folder next to the
    target and renames it into place (an existing corpus there is replaced). `dense_gt` and
    `val_is_test`: see the module docstring. `moments` (opt-in) also writes
    `<collection>test.moments.jsonl`: each test caption's moment as feature rows
    {"query_id", "video_id", "start_feature", "end_feature"} (end exclusive), the ground truth
    of the search's moment metrics."""
    if isinstance(preset, Preset):
        p, preset = preset, preset.name
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    else:
        p = PRESETS[preset]
    layout = layout or p.extra.get("layout", "bigfile")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (known: {', '.join(LAYOUTS)})")
    sizes = _scaled(p, scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / p.collection
    t0 = time.time()
    world = _world(p, seed)
    plans = {s: _split_plan(p, sizes[s], seed, s) for s in SPLITS}
    total_videos = sum(sizes[s].videos for s in SPLITS)

    tmp = Path(tempfile.mkdtemp(prefix=f".{p.collection}.tmp-", dir=out_dir))
    try:
        with _single_thread_blas():
            bar = tqdm(total=total_videos, desc=f"generate {preset}", unit="video", disable=not progress)
            n_rows, n_caps_total = _write_bigfile_corpus(p, world, seed, plans, sizes, tmp, bar)
            bar.close()
            _write_options(p, tmp, seed, plans, dense_gt, val_is_test)
            if moments:
                write_moments(p, world, seed, plans["test"], tmp / f"{p.collection}test.moments.jsonl")
            if layout == "bigfile_hdf5":
                write_frames_h5_layout(tmp, p, progress)
            elif layout != "bigfile":
                write_h5_layout(tmp, p, keep_bigfile=layout == "both", video_file=video_file,
                                query_file=query_file, progress=progress)
            _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated %s (seed %d, scale %g): %d videos, %d captions, %d frames x %d -> %s in %.1fs",
             preset, seed, scale, total_videos, n_caps_total, n_rows, p.visual_dim, target,
             time.time() - t0)
    return target


LAYOUTS = ("bigfile", "hdf5", "both", "bigfile_hdf5")


def write_frames_h5_layout(collection_dir: Path, p: Preset, progress: bool = True) -> None:
    """Rewrite a generated BigFile corpus in feature_format bigfile_hdf5: the feature folder's
    frames converted to feature.hdf5 (prvr.data.convert_bigfile), then feature.bin, shape.txt
    and id.txt removed; video2frames.txt and the RoBERTa query file stay."""
    from .convert_bigfile import convert_bigfile

    feat_dir = collection_dir / "FeatureData" / p.feature
    convert_bigfile(feat_dir, progress=progress)
    for name in ("feature.bin", "shape.txt", "id.txt"):
        (feat_dir / name).unlink()


def write_h5_layout(collection_dir: Path, p: Preset, keep_bigfile: bool = False,
                    video_file: str | None = None, query_file: str | None = None,
                    progress: bool = True) -> None:
    """Rewrite a generated BigFile corpus in the CLIP layout, same content: each video's frames
    (video2frames order) as one contiguous float32 (frames, Dv) dataset of
    FeatureData/<video_file>, each caption's tokens as a dataset of TextData/<query_file>
    (under layout.caption_key_alias's key for presets with extra['alias_keys']). Without
    keep_bigfile the BigFile folder and the RoBERTa file are removed."""
    from .features import FeatureStore
    from .layout import caption_key_alias, default_h5_feature, default_query_feature

    feat_dir = collection_dir / "FeatureData" / p.feature
    roberta = collection_dir / "TextData" / default_query_feature(p.collection)
    video_path = collection_dir / "FeatureData" / (video_file or default_h5_feature(p.collection))
    query_path = collection_dir / "TextData" / (query_file or default_query_feature(p.collection, "hdf5"))
    video_tmp, query_tmp = (f.with_name(f.name + ".tmp") for f in (video_path, query_path))
    store = FeatureStore(feat_dir)
    with h5py.File(video_tmp, "w") as h5:
        for vid in tqdm(store.video_ids, desc="write video hdf5", unit="video",
                        disable=not progress or len(store) < 2000):
            h5.create_dataset(vid, data=store.get(vid), track_times=False)
    with h5py.File(roberta, "r") as src, h5py.File(query_tmp, "w") as h5:
        for cap_id in src:
            key = (caption_key_alias(cap_id) or cap_id) if p.extra.get("alias_keys") else cap_id
            h5.create_dataset(key, data=src[cap_id][()], track_times=False)
    if not keep_bigfile:
        shutil.rmtree(feat_dir)
        roberta.unlink()
    os.replace(video_tmp, video_path)
    os.replace(query_tmp, query_path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`, replacing an existing `dst`."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def oracle_text_to_visual(preset: str = "demo", seed: int = 7) -> np.ndarray:
    """The generator's oracle linear map text -> visual space, A pinv(B): (Dv, Dt).

    Only for checking that the generated task is partially relevant (tests, sanity checks):
    it uses the generator's hidden projections."""
    w = _world(PRESETS[preset], seed)
    return (w.A @ np.linalg.pinv(w.B)).astype(np.float32)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prvr.data.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="root folder; the corpus goes to OUT/<collection>/")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of the preset's split sizes (e.g. 0.05)")
    ap.add_argument("--dense-gt", action="store_true",
                    help="also write the dense ground-truth split <collection>denseval")
    ap.add_argument("--val-is-test", action="store_true",
                    help="write the test captions as the validation split too (as MS-SL's TVR)")
    ap.add_argument("--moments", action="store_true",
                    help="also write <collection>test.moments.jsonl (each test caption's moment)")
    ap.add_argument("--layout", default=None, choices=LAYOUTS,
                    help="feature layout (default: the preset's; bigfile but for the *-clip presets)")
    ap.add_argument("--videos", type=_ints, default=None, metavar="TRAIN,VAL,TEST",
                    help="video counts per split instead of the preset's (captions per video "
                         "then drawn from --captions or the preset's range)")
    ap.add_argument("--frames", type=_ints, default=None, metavar="LO,HI", help="frames per video bounds")
    ap.add_argument("--frames-median", type=float, default=None, help="median frames per video")
    ap.add_argument("--captions", type=_ints, default=None, metavar="LO,HI", help="captions per video")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        preset = custom_preset(args.preset, args.videos, args.frames, args.captions, args.frames_median)
        path = generate_corpus(args.out, preset, args.seed, args.scale,
                               dense_gt=args.dense_gt, val_is_test=args.val_is_test,
                               layout=args.layout, moments=args.moments)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
