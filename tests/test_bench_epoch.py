"""The epoch benchmark's corpus options (prvr.data.demo sizes) and the stage's allocator settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prvr.data import demo

REPO = Path(__file__).resolve().parents[1]


def test_custom_preset_without_options_is_the_preset():
    assert demo.custom_preset("demo") is demo.PRESETS["demo"]


def test_custom_sizes_reach_the_corpus(tmp_path):
    p = demo.custom_preset("demo", videos=(6, 3, 4), frames=(20, 25), captions=(1, 2))
    out = demo.generate_corpus(tmp_path, p, seed=3, progress=False)
    caps = {s: (out / "TextData" / f"demo{s}.caption.txt").read_text().splitlines() for s in demo.SPLITS}
    videos = {s: {line.split("#", 1)[0] for line in lines} for s, lines in caps.items()}
    assert [len(videos[s]) for s in demo.SPLITS] == [6, 3, 4]
    per_video = [sum(1 for line in caps["train"] if line.startswith(v + "#")) for v in videos["train"]]
    assert min(per_video) >= 1 and max(per_video) <= 2
    from prvr.data.features import FeatureStore

    store = FeatureStore(out / "FeatureData" / "demo_feats")
    assert len(store.video_ids) == 13
    assert all(20 <= len(store.get(v)) <= 25 for v in store.video_ids)


@pytest.mark.parametrize("bad", [dict(videos=(1, 2)), dict(frames=(5, 2)), dict(captions=(0, 3))])
def test_custom_preset_refuses_bad_sizes(bad):
    with pytest.raises(ValueError):
        demo.custom_preset("demo", **bad)


def test_demo_cli_takes_the_size_flags(tmp_path):
    assert demo.main(["--out", str(tmp_path), "--preset", "demo", "--seed", "1", "--videos", "4,2,2",
                      "--frames", "20,30", "--captions", "1,3"]) == 0
    lines = (tmp_path / "demo" / "TextData" / "demotest.caption.txt").read_text().splitlines()
    assert len({line.split("#", 1)[0] for line in lines}) == 2
