"""The embedded corpus generator: layout, determinism, atomic output, and that the task is PRVR."""
from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from prvr.data import demo
from prvr.data.datasets import Corpus, QueryDataset, VideoDataset
from prvr.data.features import FeatureStore
from prvr.data.layout import CollectionPaths, read_captions, read_video2frames


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory) -> Path:
    """The full demo preset (as the pipeline generates it)."""
    return demo.generate_corpus(tmp_path_factory.mktemp("demo"), "demo", seed=7, progress=False)


def test_demo_layout_and_sizes(demo_corpus):
    paths = CollectionPaths(demo_corpus, "demo", "demo_feats")
    assert demo_corpus.name == "demo" and not paths.missing()
    assert [p.name for p in demo_corpus.parent.iterdir()] == ["demo"]  # no temp folder left
    store = FeatureStore(paths.feature_dir)
    assert store.dim == 256
    sizes = {}
    for split in ("train", "val", "test"):
        caps = read_captions(paths.caption_file(split))
        vids = list(dict.fromkeys(v for _, v, _ in caps))
        sizes[split] = len(vids)
        per_video = np.bincount(np.unique([v for _, v, _ in caps], return_inverse=True)[1])
        assert per_video.min() >= 2 and per_video.max() <= 6
        for cap_id, vid, _ in caps:
            assert cap_id.startswith(vid + "#enc#")
    assert sizes == {"train": 600, "val": 150, "test": 150}
    lengths = np.array([store.num_frames(v) for v in store.video_ids])
    assert lengths.min() >= 20 and lengths.max() <= 200
    assert (lengths > 128).sum() >= 20 and (lengths < 32).sum() >= 1  # both regimes occur
    assert all(store.is_contiguous(v) for v in store.video_ids)
    v2f = read_video2frames(paths.video2frames_file)
    first = next(iter(v2f))
    assert v2f[first][:2] == [f"{first}_0", f"{first}_1"]
    with h5py.File(paths.query_feat_file, "r") as h5:
        tok = np.array([h5[k].shape[0] for k in list(h5.keys())[:400]])
        assert h5[next(iter(h5.keys()))].shape[1] == 128 and h5[next(iter(h5.keys()))].dtype == np.float32
    assert tok.max() > 30 and tok.min() < 30


def _oracle_metrics(corpus: Corpus, split: str, W: np.ndarray):
    vds, qds = VideoDataset(corpus, split), QueryDataset(corpus, split)
    clips = np.stack([vds[i]["clip_feats"] for i in range(len(vds))])          # (V, 32, Dv)
    means = np.stack([corpus.features.get(v).mean(0) for v in vds.split.video_ids])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    q = np.stack([W @ qds[i]["query_feats"].mean(0) for i in range(len(qds))])  # (Q, Dv)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = {v: i for i, v in enumerate(vds.split.video_ids)}
    labels = np.array([index[v] for v in qds.split.query_video_ids])

    def recall(scores):
        rank = (scores > scores[np.arange(len(q)), labels][:, None]).sum(1)
        return {k: float((rank < k).mean()) for k in (1, 5, 10)}

    return recall(np.einsum("qd,vkd->qvk", q, clips).max(-1)), recall(q @ means.T)


def test_best_matching_clip_beats_mean_pooling(demo_corpus):
    """A caption matches one moment: max over clip bins must clearly beat whole-video pooling."""
    corpus = Corpus(demo_corpus, "demo_feats")
    W = demo.oracle_text_to_visual("demo", seed=7)
    clip, pooled = _oracle_metrics(corpus, "test", W)
    assert clip[1] > 2 * pooled[1] and clip[1] > pooled[1] + 0.25, (clip, pooled)
    assert sum(clip.values()) > sum(pooled.values()) + 0.6, (clip, pooled)
    assert clip[1] < 0.95  # not trivially solved even by the oracle map


def test_generation_is_deterministic_per_seed(tmp_path):
    a = demo.generate_corpus(tmp_path / "a", "demo", seed=7, scale=0.03, progress=False)
    b = demo.generate_corpus(tmp_path / "b", "demo", seed=7, scale=0.03, progress=False)
    c = demo.generate_corpus(tmp_path / "c", "demo", seed=8, scale=0.03, progress=False)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) == 8 and da == db
    assert all(da[k] != dc[k] for k in da if k.endswith(("feature.bin", ".hdf5")))


def test_regeneration_replaces_atomically_and_failure_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "root"
    first = demo.generate_corpus(out, "demo", seed=1, scale=0.02, progress=False)
    before = _digests(first)
    calls = {"n": 0}
    real = demo._render_video

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kw)

    monkeypatch.setattr(demo, "_render_video", flaky)
    with pytest.raises(RuntimeError):
        demo.generate_corpus(out, "demo", seed=2, scale=0.02, progress=False)
    assert _digests(first) == before  # the old corpus is untouched
    assert sorted(p.name for p in out.iterdir()) == ["demo"]  # no temp folder left
    monkeypatch.setattr(demo, "_render_video", real)
    demo.generate_corpus(out, "demo", seed=2, scale=0.02, progress=False)
    assert _digests(first) != before and sorted(p.name for p in out.iterdir()) == ["demo"]


@pytest.mark.parametrize("preset,collection,feature,dv,dt,ratio", [
    ("tvr-shaped", "tvr", "i3d_resnet", 3072, 768, 5.0),
    ("cha-shaped", "charades", "i3d_rgb_lgi", 1024, 1024, 12408 / 5538),
])
def test_shaped_presets_at_small_scale(tmp_path, preset, collection, feature, dv, dt, ratio):
    root = demo.generate_corpus(tmp_path, preset, seed=3, scale=0.004, progress=False)
    assert root.name == collection
    corpus = Corpus(root, feature)
    assert corpus.visual_dim == dv
    train = corpus.split("train")
    full = demo.PRESETS[preset].splits["train"]
    assert len(train.video_ids) == round(full.videos * 0.004)
    assert len(train.query_ids) == round(len(train.video_ids) * ratio)
    assert len(corpus.split("test").video_ids) == len(corpus.split("val").video_ids)
    assert corpus.text.get(train.query_ids[0]).shape[1] == dt


def test_cli(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--preset", "demo", "--seed", "5", "--scale", "0.02"]) == 0
    assert (tmp_path / "demo" / "FeatureData" / "demo_feats" / "feature.bin").is_file()
    assert demo.main(["--out", str(tmp_path / "x"), "--scale", "0"]) == 2
    assert "scale must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x" / "demo").exists()
