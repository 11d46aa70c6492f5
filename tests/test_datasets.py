"""The reader: FeatureStore, Corpus, datasets, collate and loaders on small hand-built corpora."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from prvr.data.datasets import (Corpus, QueryDataset, TrainVideoDataset, VideoDataset,
                                collate_queries, collate_train, collate_videos,
                                make_eval_loaders, make_train_loader)
from prvr.data.features import FeatureStore
from prvr.data.layout import DataError

DV, DT = 12, 7


# ----------------------------------------------------------------------------- slow reference

def ref_bins(x: np.ndarray, k: int) -> np.ndarray:
    """The spec's binning, one bin at a time, in float64."""
    n = len(x)
    edges = [min(round(i * n / k), n - 1) for i in range(k + 1)]  # round(): half to even
    out = []
    for i in range(k):
        a, b = edges[i], edges[i + 1]
        out.append(x[a:b].astype(np.float64).mean(axis=0) if a < b else x[a].astype(np.float64))
    return np.array(out)


def ref_norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.array([row / (np.sqrt((row ** 2).sum()) + 1e-5) for row in x])


def ref_clip(x):
    return ref_norm(ref_bins(x, 32))


def ref_frames(x):
    return ref_norm(ref_bins(x, 128) if len(x) > 128 else x)


def ref_query(t):
    return ref_norm(t)[:30]


# ----------------------------------------------------------------------------- corpus builder

def write_corpus(root: Path, videos: dict[str, np.ndarray], splits: dict[str, list[tuple[str, np.ndarray]]],
                 collection: str = "toy", feature: str = "feat", row_order: np.ndarray | None = None,
                 extra_rows: int = 0, seed: int = 0) -> Path:
    """An MS-SL folder. videos: id -> (n, DV) frames; splits: name -> [(cap_id, tokens)].
    row_order permutes the rows of feature.bin (frames of a video become non-contiguous)."""
    rng = np.random.default_rng(seed)
    cdir = root / collection
    fdir = cdir / "FeatureData" / feature
    tdir = cdir / "TextData"
    fdir.mkdir(parents=True)
    tdir.mkdir(parents=True)
    ids, rows = [], []
    for vid, x in videos.items():
        for t in range(len(x)):
            ids.append(f"{vid}_{t}")
            rows.append(x[t])
    for j in range(extra_rows):  # frames that belong to no video
        ids.append(f"junk_{j}")
        rows.append(rng.standard_normal(DV).astype(np.float32))
    rows = np.array(rows, dtype="<f4")
    ids = np.array(ids)
    if row_order is not None:
        rows, ids = rows[row_order], ids[row_order]
    rows.tofile(fdir / "feature.bin")
    (fdir / "id.txt").write_text(" ".join(ids), encoding="iso-8859-1")
    (fdir / "shape.txt").write_text(f"{len(rows)} {DV}\n")
    v2f = {vid: [f"{vid}_{t}" for t in range(len(x))] for vid, x in videos.items()}
    (fdir / "video2frames.txt").write_text(repr(v2f))
    with h5py.File(tdir / f"roberta_{collection}_query_feat.hdf5", "w") as h5:
        for name, caps in splits.items():
            with open(tdir / f"{collection}{name}.caption.txt", "w") as fh:
                for cap_id, tok in caps:
                    fh.write(f"{cap_id} some words for {cap_id}\n")
                    if cap_id not in h5:
                        h5.create_dataset(cap_id, data=tok.astype(np.float32))
    return cdir


LENGTHS = [1, 5, 31, 32, 33, 64, 77, 128, 129, 200, 301]


@pytest.fixture()
def toy(tmp_path):
    rng = np.random.default_rng(3)
    videos = {f"v{i}": rng.standard_normal((n, DV)).astype(np.float32) * rng.uniform(0.5, 3)
              for i, n in enumerate(LENGTHS)}
    tokens_len = [3, 30, 31, 45, 1, 12]
    splits = {"train": [], "val": [], "test": []}
    tokens = {}
    for i, vid in enumerate(videos):
        for k in range(1 + i % 3):
            cid = f"{vid}#enc#{k}"
            tokens[cid] = rng.standard_normal((tokens_len[(i + k) % len(tokens_len)], DT)).astype(np.float32)
            splits["train"].append((cid, tokens[cid]))
    # val/test: a subset of videos, captions of the test split interleaved across videos
    splits["val"] = [(c, tokens[c]) for c, _ in splits["train"] if c.startswith(("v1#", "v2#"))]
    test = [(c, tokens[c]) for c, _ in splits["train"] if c.startswith(("v3#", "v9#", "v10#"))]
    splits["test"] = test[::2] + test[1::2]
    total = sum(LENGTHS)
    order = np.random.default_rng(5).permutation(total + 10)
    cdir = write_corpus(tmp_path, videos, splits, row_order=order, extra_rows=10)
    return cdir, videos, tokens, splits


@pytest.fixture()
def contiguous(tmp_path):
    rng = np.random.default_rng(11)
    videos = {f"c{i}": rng.standard_normal((n, DV)).astype(np.float32) for i, n in enumerate([40, 3, 150, 60, 9, 33, 128])}
    tokens = {}
    splits = {"train": [], "val": [], "test": []}
    for i, vid in enumerate(videos):
        for k in range(2 + i % 3):
            cid = f"{vid}#enc#{k}"
            tokens[cid] = rng.standard_normal((5 + 7 * k + i, DT)).astype(np.float32)
            splits["train"].append((cid, tokens[cid]))
    splits["val"] = splits["test"] = splits["train"][:4]
    return write_corpus(tmp_path, videos, splits, collection="cont"), videos, tokens


# ----------------------------------------------------------------------------- FeatureStore

def test_feature_store_returns_frames_in_time_order_contiguous_or_not(toy, contiguous):
    cdir, videos, _, _ = toy
    store = FeatureStore(cdir / "FeatureData" / "feat")
    assert len(store) == len(videos) and store.dim == DV
    for vid, x in videos.items():
        np.testing.assert_array_equal(store.get(vid), x)
        assert store.num_frames(vid) == len(x)
    ccdir, cvideos, _ = contiguous
    cstore = FeatureStore(ccdir / "FeatureData" / "feat")
    for vid, x in cvideos.items():
        assert cstore.is_contiguous(vid)
        np.testing.assert_array_equal(cstore.get(vid), x)
    # a permuted file: at least the longer videos are not contiguous and still read right
    assert not store.is_contiguous("v10")


def test_feature_store_pickles_without_its_map(contiguous):
    cdir, videos, _ = contiguous
    store = FeatureStore(cdir / "FeatureData" / "feat")
    store.get("c0")
    assert store._mm is not None
    blob = pickle.dumps(store)
    assert len(blob) < 20_000  # row table only, not the features
    clone = pickle.loads(blob)
    assert clone._mm is None
    np.testing.assert_array_equal(clone.get("c2"), videos["c2"])


def test_feature_store_rejects_inconsistent_files(contiguous):
    cdir, _, _ = contiguous
    fdir = cdir / "FeatureData" / "feat"
    shape = (fdir / "shape.txt").read_text()
    n, d = map(int, shape.split())
    (fdir / "shape.txt").write_text(f"{n + 1} {d}\n")
    with pytest.raises(DataError, match="feature.bin.*bytes"):
        FeatureStore(fdir)
    (fdir / "shape.txt").write_text(shape)
    v2f = (fdir / "video2frames.txt").read_text()
    (fdir / "video2frames.txt").write_text(v2f.replace("'c1_2'", "'nope_7'"))
    with pytest.raises(DataError, match="nope_7.*not in id.txt"):
        FeatureStore(fdir)
    (fdir / "video2frames.txt").write_text(v2f)
    with pytest.raises(DataError, match="no entry for video 'zzz'"):
        FeatureStore(fdir).get("zzz")


# ----------------------------------------------------------------------------- processing

def test_train_items_match_the_slow_reference_for_all_lengths(toy):
    cdir, videos, tokens, _ = toy
    ds = TrainVideoDataset(Corpus(cdir, "feat"))
    assert len(ds) == len(LENGTHS)
    for i in range(len(ds)):
        item = ds[i]
        x = videos[item["video_id"]]
        assert item["clip_feats"].shape == (32, DV) and item["clip_feats"].dtype == np.float32
        np.testing.assert_allclose(item["clip_feats"], ref_clip(x), atol=2e-6, rtol=1e-5)
        assert len(item["frame_feats"]) == min(len(x), 128)
        np.testing.assert_allclose(item["frame_feats"], ref_frames(x), atol=2e-6, rtol=1e-5)
        for q, qf in zip(item["query_ids"], item["query_feats"]):
            np.testing.assert_allclose(qf, ref_query(tokens[q]), atol=2e-6, rtol=1e-5)


def test_bin_rule_edge_cases_by_hand():
    # n = 5 < 32: edges are rint(i * 5 / 32) clamped to 4 -> repeated single frames
    x = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32) + 1
    from prvr.data.datasets import average_bins, bin_edges
    e = bin_edges(5, 32)
    assert e[0] == 0 and e[-1] == 4 and np.all(np.diff(e) >= 0)
    b = average_bins(x, 32)
    # edges 31 and 32 are both clamped to 4: the last bin is the single frame 4 (value 5)
    assert e[31] == e[32] == 4 and b[-1, 0] == 5.0
    np.testing.assert_allclose(b, ref_bins(x, 32), atol=1e-6)
    # n = 64: bins of exactly two frames, except the last which loses the final frame
    y = np.arange(64, dtype=np.float32)[:, None]
    b = average_bins(y, 32)
    np.testing.assert_allclose(b[:31, 0], np.arange(31) * 2 + 0.5)
    assert b[31, 0] == 62.0  # [62, 63) after clamping edge 64 -> 63


def test_collate_train_contract(toy):
    cdir, videos, tokens, _ = toy
    ds = TrainVideoDataset(Corpus(cdir, "feat"))
    items = [ds[i] for i in (0, 8, 2)]  # 1, 129 and 31 frames
    b = collate_train(items)
    assert b["clip_feats"].shape == (3, 32, DV) and b["clip_feats"].dtype == torch.float32
    assert b["frame_feats"].shape == (3, 128, DV)
    assert b["frame_mask"].dtype == torch.bool
    assert b["frame_mask"].sum(1).tolist() == [1, 128, 31]
    assert torch.all(b["frame_feats"][~b["frame_mask"]] == 0)
    nq = sum(len(it["query_ids"]) for it in items)
    assert b["query_feats"].shape[0] == nq and b["query_feats"].shape[1] <= 30
    assert b["query_labels"].dtype == torch.int64
    assert b["query_labels"].tolist() == [j for j, it in enumerate(items) for _ in it["query_ids"]]
    assert b["video_ids"] == [it["video_id"] for it in items]
    assert b["query_ids"] == [q for it in items for q in it["query_ids"]]
    for r, q in enumerate(b["query_ids"]):
        n = min(len(tokens[q]), 30)
        assert b["query_mask"][r].sum() == n
        np.testing.assert_allclose(b["query_feats"][r, :n].numpy(), ref_query(tokens[q]), atol=2e-6)
        assert torch.all(b["query_feats"][r, n:] == 0)


def test_eval_datasets_follow_split_order(toy):
    cdir, videos, tokens, splits = toy
    corpus = Corpus(cdir, "feat")
    vl, ql = make_eval_loaders(corpus, "test", video_batch_size=2, query_batch_size=3)
    vids = [v for b in vl for v in b["video_ids"]]
    assert vids == ["v3", "v10", "v9"]  # distinct, order of first appearance in the file
    qb = list(ql)
    qids = [q for b in qb for q in b["query_ids"]]
    assert qids == [c for c, _ in splits["test"]]
    assert [v for b in qb for v in b["query_video_ids"]] == [q.split("#")[0] for q in qids]
    vb = next(iter(vl))
    np.testing.assert_allclose(vb["clip_feats"][1].numpy(), ref_clip(videos["v10"]), atol=2e-6)
    assert set(vb) == {"clip_feats", "frame_feats", "frame_mask", "video_ids"}
    assert set(qb[0]) == {"query_feats", "query_mask", "query_ids", "query_video_ids"}


def _batches(loader):
    return [{k: (v.clone() if torch.is_tensor(v) else list(v)) for k, v in b.items()} for b in loader]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_train_loader_is_seeded_and_workers_give_the_same_batches(toy):
    cdir, *_ = toy
    corpus = Corpus(cdir, "feat")
    b0 = _batches(make_train_loader(corpus, batch_size=4, num_workers=0, seed=1))
    again = _batches(make_train_loader(corpus, batch_size=4, num_workers=0, seed=1))
    _same(b0, again)
    other = _batches(make_train_loader(corpus, batch_size=4, num_workers=0, seed=2))
    assert [b["video_ids"] for b in other] != [b["video_ids"] for b in b0]
    assert sorted(v for b in b0 for v in b["video_ids"]) == sorted(f"v{i}" for i in range(len(LENGTHS)))
    # the corpus's map and HDF5 file are already open in this process; workers open their own
    b2 = _batches(make_train_loader(corpus, batch_size=4, num_workers=2, seed=1))
    _same(b0, b2)
    vl0, ql0 = make_eval_loaders(corpus, "train", 3, 4, num_workers=0)
    vl2, ql2 = make_eval_loaders(corpus, "train", 3, 4, num_workers=2)
    _same(_batches(vl0), _batches(vl2))
    _same(_batches(ql0), _batches(ql2))


def test_train_loader_takes_a_sampler(toy):
    cdir, *_ = toy
    corpus = Corpus(cdir, "feat")
    sampler = torch.utils.data.distributed.DistributedSampler(
        TrainVideoDataset(corpus), num_replicas=2, rank=1, shuffle=False)
    vids = [v for b in make_train_loader(corpus, 3, 0, seed=0, sampler=sampler) for v in b["video_ids"]]
    assert vids == [f"v{i}" for i in range(1, len(LENGTHS), 2)] + ["v0"]  # padded to even


def test_missing_caption_features_and_videos_are_data_errors(contiguous, tmp_path):
    cdir, _, _ = contiguous
    with h5py.File(cdir / "TextData" / "roberta_cont_query_feat.hdf5", "a") as h5:
        del h5["c1#enc#0"]
    corpus = Corpus(cdir, "feat")
    ds = TrainVideoDataset(corpus)
    with pytest.raises(DataError, match="roberta_cont_query_feat.hdf5: no features for caption 'c1#enc#0'"):
        ds[1]
    cap = cdir / "TextData" / "conttest.caption.txt"
    cap.write_text(cap.read_text() + "ghost#enc#0 a video that is not there\n")
    with pytest.raises(DataError, match="conttest.caption.txt: 1 videos have no frames.*ghost"):
        VideoDataset(Corpus(cdir, "feat"), "test")


def test_from_settings_uses_source_json(contiguous, tmp_path, monkeypatch):
    cdir, videos, _ = contiguous
    data_dir = tmp_path / "data"
    (data_dir / "demo").mkdir(parents=True)
    (data_dir / "demo" / "source.json").write_text(json.dumps(
        {"collection_dir": str(cdir.absolute()), "feature": "feat", "collection": "cont"}))
    settings = {"dataset": "demo", "collection": "cont", "feature": "feat", "data_root": str(tmp_path)}
    corpus = Corpus.from_settings(settings, data_dir=data_dir)
    assert corpus.collection == "cont" and corpus.visual_dim == DV
    assert corpus.split("train").video_ids == list(videos)
    ds = QueryDataset(corpus, "val")
    b = collate_queries([ds[i] for i in range(len(ds))])
    assert b["query_ids"] == corpus.split("val").query_ids
    v = VideoDataset(corpus, "val")
    assert collate_videos([v[0]])["video_ids"] == ["c0"]


# ----------------------------------------------------------------------------- batched fetch

def test_batched_fetch_gives_the_same_batches_as_item_by_item(toy):
    """DataLoader fetches through __getitems__ (items built straight into the padded batch);
    the batch must equal collate over items fetched one by one, exactly."""
    cdir, videos, tokens, _ = toy
    corpus = Corpus(cdir, "feat")
    ds = TrainVideoDataset(corpus)
    for idx in ([0, 8, 2], [10, 9, 7, 3, 1], [4]):
        slow = collate_train([ds[i] for i in idx])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the read-only map view must not leak a warning
            items = ds.__getitems__(idx)
        for i, it in zip(idx, items):  # the items themselves match the one-by-one items
            one = ds[i]
            assert it["video_id"] == one["video_id"] and it["query_ids"] == one["query_ids"]
            np.testing.assert_array_equal(it["clip_feats"], one["clip_feats"])
            np.testing.assert_array_equal(it["frame_feats"], one["frame_feats"])
            for a, b in zip(it["query_feats"], one["query_feats"]):
                np.testing.assert_array_equal(a, b)
        fast = collate_train(items)
        _same([fast], [slow])
    vds = VideoDataset(corpus, "test")
    _same([collate_videos(vds.__getitems__([2, 0]))], [collate_videos([vds[2], vds[0]])])


def test_collate_copies_prebatched_items_that_were_changed(toy):
    cdir, *_ = toy
    ds = TrainVideoDataset(Corpus(cdir, "feat"))
    items = ds.__getitems__([1, 2, 3])
    items[0] = ds[5]  # replaced item: the prebuilt tensors no longer describe the batch
    b = collate_train(items)
    _same([b], [collate_train([ds[5], ds[2], ds[3]])])
    items = ds.__getitems__([1, 2])
    items[1]["frame_feats"] = items[1]["frame_feats"][:3].copy()  # a changed array
    b = collate_train(items)
    assert b["frame_mask"].sum(1).tolist() == [5, 3]


def test_batch_buffers_are_reused_only_once_nothing_refers_to_them(toy):
    import prvr.data.datasets as datasets

    datasets._POOL.clear()  # idle buffers of earlier tests in this process would fill the pool
    cdir, *_ = toy
    loader = make_train_loader(Corpus(cdir, "feat"), batch_size=11, num_workers=0, seed=0)
    first = next(iter(loader))
    keep = first["frame_feats"][2:4]          # a view keeps the whole buffer busy
    ptr, ref = keep.data_ptr(), keep.clone()
    del first
    for _ in range(3):
        b = next(iter(loader))
        assert not (b["frame_feats"].data_ptr() <= ptr
                    < b["frame_feats"].data_ptr() + b["frame_feats"].nbytes)
        del b
    assert torch.equal(keep, ref)
    base = keep.data_ptr() - 2 * keep[0].nbytes
    del keep
    seen = set()
    for _ in range(3):
        b = next(iter(loader))
        seen.add(b["frame_feats"].data_ptr())
        del b
    assert base in seen  # released: its memory serves later batches
