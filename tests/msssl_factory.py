"""Tiny MS-SL collections for tests (any test module may import this).

`write_collection(root)` writes `<root>/<collection>/` in the MS-SL layout with a few videos
per split and random finite features; every file can then be corrupted by the test.
`write_params(path, data_root, ...)` writes a params.yaml whose `datasets` section points at it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from prvr.data.layout import CollectionPaths

COLLECTION = "toy"
FEATURE = "toyfeat"
VISUAL_DIM = 8
TEXT_DIM = 6


def write_collection(root: str | Path, collection: str = COLLECTION, feature: str = FEATURE,
                     visual_dim: int = VISUAL_DIM, text_dim: int = TEXT_DIM,
                     videos: dict[str, int] | None = None, captions_per_video: int = 2,
                     frames: tuple[int, int] = (2, 5), tokens: tuple[int, int] = (2, 6),
                     seed: int = 0) -> CollectionPaths:
    """Write a small valid collection under `root`; returns its paths."""
    rng = np.random.default_rng(seed)
    videos = videos or {"train": 4, "val": 2, "test": 2}
    paths = CollectionPaths(Path(root) / collection, collection, feature)
    paths.text_dir.mkdir(parents=True, exist_ok=True)
    paths.feature_dir.mkdir(parents=True, exist_ok=True)
    frame_ids: list[str] = []
    v2f: dict[str, list[str]] = {}
    with h5py.File(paths.query_feat_file, "w") as h5:
        for split, n_videos in videos.items():
            lines = []
            for v in range(n_videos):
                vid = f"{split}_video_{v:03d}"
                n_frames = int(rng.integers(frames[0], frames[1] + 1))
                v2f[vid] = [f"{vid}_{i}" for i in range(n_frames)]
                frame_ids.extend(v2f[vid])
                for c in range(captions_per_video):
                    cap_id = f"{vid}#enc#{c}"
                    lines.append(f"{cap_id} a person does thing {c} in {split} video {v}\n")
                    n_tok = int(rng.integers(tokens[0], tokens[1] + 1))
                    h5.create_dataset(cap_id, data=rng.standard_normal((n_tok, text_dim)).astype(np.float32))
            paths.caption_file(split).write_text("".join(lines), encoding="utf-8")
    feats = rng.standard_normal((len(frame_ids), visual_dim)).astype("<f4")
    paths.feature_file.write_bytes(feats.tobytes())
    paths.shape_file.write_text(f"{len(frame_ids)} {visual_dim}\n")
    paths.id_file.write_text(" ".join(frame_ids) + "\n", encoding="iso-8859-1")
    paths.video2frames_file.write_text(repr(v2f), encoding="iso-8859-1")
    return paths


def write_params(path: str | Path, data_root: str | Path, dataset: str = "toy",
                 collection: str = COLLECTION, feature: str = FEATURE, visual_dim: int = VISUAL_DIM,
                 text_dim: int = TEXT_DIM, method: str = "gmmformer_v2", **extra: Any) -> Path:
    """A params.yaml in the layout of the repository's (`datasets.<dataset>` facts, a small
    `methods.<method>.all` recipe) with one dataset; extra keys go into its `datasets` section."""
    section = {"collection": collection, "feature": feature, "visual_dim": visual_dim, "text_dim": text_dim,
               "archive": None, "sha256": None, "generator": None}
    section.update(extra)
    recipe = {"seed": 1, "epochs": 1, "batch_size": 4, "patience": 10, "hard_negative_start_epoch": 1,
              "lr": 1e-3, "weight_decay": 0.01, "lr_warmup_proportion": 0.01, "grad_clip_norm": 1.0,
              "hidden_size": 16}
    if method == "gmmformer_v2":
        recipe.update({"n_heads": 4, "margin": 0.1, "sft_factor": 0.09, "clip_nce": 0.05, "frame_nce": 0.04,
                       "qdl": 8.0e-5, "oml": 0.09, "qdl_delta": 0.15, "qdl_alpha": 32, "qdl_lambda": 1,
                       "input_drop": 0.1, "drop": 0.1})
    params = {"dataset": dataset, "data_root": str(data_root), "model": {"name": method},
              "train": {"device": "cpu", "num_workers": 0}, "evaluate": {"split": "test"},
              "datasets": {dataset: section}, "methods": {method: {"all": recipe}}}
    path = Path(path)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path
