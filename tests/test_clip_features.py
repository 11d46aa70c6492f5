"""CLIP ViT-B/32 features (per-video HDF5, DL-DKD's layout): the HDF5 store gives the BigFile
store's batches bit for bit, every bad input is a one-line error naming the file and the id,
fetch / validate / the demo generator know the layout, and a DVC experiment trains on it."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from prvr.data import demo
from prvr.data import h5index
from prvr.data.datasets import (Corpus, QueryDataset, TextFeatures, TrainVideoDataset, VideoDataset,
                                collate_queries, collate_train, collate_videos, make_eval_loaders,
                                make_train_loader)
from prvr.data.fetch import fetch
from prvr.data.h5features import H5FeatureStore
from prvr.data.layout import CollectionPaths, DataError, default_h5_feature, default_query_feature, locate
from prvr.data.validate import validate, validate_collection
from conftest import assert_same_batches

VIDEO_FILE = default_h5_feature("demo")            # new_clip_vit_32_demo_vid_features.hdf5
QUERY_FILE = default_query_feature("demo", "hdf5")  # clip_ViT_B_32_demo_query_feat.hdf5
VDIM, TDIM = demo.PRESETS["demo"].visual_dim, demo.PRESETS["demo"].text_dim


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> Path:
    """A small demo corpus written both ways in one folder (BigFile + CLIP layout)."""
    root = tmp_path_factory.mktemp("clip_both")
    return demo.generate_corpus(root, "demo", seed=5, scale=0.06, progress=False, layout="both")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _h5_corpus(cdir: Path, index_dir: Path | None = None) -> Corpus:
    return Corpus(cdir, VIDEO_FILE, feature_format="hdf5", query_feature=QUERY_FILE,
                  index_dir=index_dir)


def _h5_paths(cdir: Path) -> CollectionPaths:
    return CollectionPaths(cdir, "demo", VIDEO_FILE, "hdf5", QUERY_FILE)


# ---------------------------------------------------------------------------------- the store

@pytest.mark.parametrize("max_frames", [128, 16])
def test_hdf5_store_gives_the_bigfile_batches_bit_for_bit(both, max_frames):
    big, h5 = Corpus(both, "demo_feats"), _h5_corpus(both)
    kw = {"n_clips": 32, "max_frames": max_frames, "max_query_len": 30}
    assert_same_batches(make_train_loader(big, batch_size=7, seed=3, **kw),
                        make_train_loader(h5, batch_size=7, seed=3, **kw))
    for split in ("val", "test"):
        for lb, lh in zip(make_eval_loaders(big, split, 5, 9, **kw), make_eval_loaders(h5, split, 5, 9, **kw)):
            assert_same_batches(lb, lh)
    store = h5.features
    # every video went through the one-read path, checked once against HDF5's read
    assert len(store._offset) == len(store) and store._checked and store._fast
    assert store.dim == VDIM and max(store.num_frames(v) for v in store.video_ids) > 128
    for vid in big.split("train").video_ids[:5]:
        assert np.array_equal(store.get(vid), big.features.get(vid))


def test_item_path_and_batched_path_agree_on_hdf5(both):
    corpus = _h5_corpus(both)
    ds = TrainVideoDataset(corpus)
    assert_same_batches([collate_train([ds[i] for i in range(6)])], [collate_train(ds.__getitems__(range(6)))])
    vds = VideoDataset(corpus, "test")
    assert_same_batches([collate_videos([vds[i] for i in range(4)])], [collate_videos(vds.__getitems__(range(4)))])


@pytest.mark.parametrize("how", ["chunked", "chunked+gzip", "float64", "big-endian", "float16"])
def test_other_storage_reads_through_hdf5_with_the_same_values(both, tmp_path, how):
    cdir = _copy(both, tmp_path / "demo")
    path = cdir / "FeatureData" / VIDEO_FILE
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
    path.unlink()
    dtype = {"float64": "<f8", "big-endian": ">f4", "float16": "<f2"}.get(how, "<f4")
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            kw = {"chunks": True} if how.startswith("chunked") else {}
            kw.update({"compression": "gzip"} if how == "chunked+gzip" else {})
            f.create_dataset(k, data=v.astype(dtype), **kw)
    store = H5FeatureStore(path)
    assert not store._offset                      # no video is read by offset
    for k in list(data)[:6]:
        assert store.get(k).dtype == np.float32
        assert np.array_equal(store.get(k), data[k].astype(dtype).astype(np.float32))
    corpus = _h5_corpus(cdir)
    seen = [v for b in make_train_loader(corpus, batch_size=16, seed=0) for v in b["video_ids"]]
    assert sorted(seen) == sorted(corpus.split("train").video_ids)


def test_a_wrong_offset_is_caught_by_the_first_read_and_hdf5_reads_instead(both):
    store = H5FeatureStore(both / "FeatureData" / VIDEO_FILE)
    vids = store.video_ids[:3]
    truth = {v: Corpus(both, "demo_feats").features.get(v) for v in vids}
    store._offset[vids[0]] += 4 * VDIM            # one row off: the check must notice
    assert np.array_equal(store.get(vids[0]), truth[vids[0]])
    assert store._fast is False
    assert all(np.array_equal(store.get(v), truth[v]) for v in vids)


def test_the_store_survives_pickling_into_a_worker(both):
    corpus = _h5_corpus(both)
    serial = list(make_train_loader(corpus, batch_size=8, seed=1))
    assert_same_batches(serial, list(make_train_loader(corpus, batch_size=8, seed=1, num_workers=2)))


# ---------------------------------------------------------------------------------- offset index

def _every_storage(path: Path) -> np.ndarray:
    """A file with plain float32 datasets and one of every other storage kind."""
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("plain", data=x)
        f.create_dataset("vector", data=x[0])
        f.create_dataset("timed", data=x, track_times=True)
        f.create_dataset("with_attrs", data=x)
        f["with_attrs"].attrs.update({f"a{i}": np.arange(40) for i in range(6)})  # header grows
        for name, kw in {"chunked": {"chunks": (2, 5)}, "one_chunk": {"chunks": (7, 5)},
                         "gzip": {"compression": "gzip"}, "f64": {"dtype": "<f8"},
                         "big-endian": {"dtype": ">f4"}, "f16": {"dtype": "<f2"},
                         "int": {"dtype": "<i4"}}.items():
            f.create_dataset(name, data=x, **kw)
        f.create_dataset("rank3", data=x[None])
        f.create_dataset("scalar", data=np.float32(1))
        f.create_dataset("empty", shape=(0, 5), dtype="<f4")
        f.create_dataset("unwritten", shape=(3, 5), dtype="<f4")
        f.create_dataset("external", data=x, external=[(str(path) + ".ext", 0, h5py.h5f.UNLIMITED)])
        f["group/inner"] = x
        f["soft"] = h5py.SoftLink("/plain")
    return x


IN_PLACE = {"plain", "vector", "timed", "with_attrs", "soft"}


def _in_place(index) -> dict[str, int]:
    return {n: o for n, o, ok in zip(index.names, index.offset.tolist(), index.in_place()) if ok}


def test_index_offsets_hold_the_bytes_h5py_reads_and_nothing_else_is_in_place(tmp_path):
    path = tmp_path / "every.hdf5"
    x = _every_storage(path)
    index = h5index.build_index(path)
    assert set(index.names) == IN_PLACE | {"chunked", "one_chunk", "gzip", "f64", "big-endian", "f16",
                                           "int", "rank3", "scalar", "empty", "unwritten", "external",
                                           "group"}
    found = _in_place(index)
    assert set(found) == IN_PLACE
    raw = path.read_bytes()
    with h5py.File(path, "r") as f:
        for name, offset in found.items():
            want = f[name][()]
            assert raw[offset:offset + want.nbytes] == want.tobytes(), name
    store = H5FeatureStore(path)            # everything else goes through HDF5 (or is refused)
    assert set(store._offset) == IN_PLACE - {"vector"}
    for name, dtype in (("plain", "<f4"), ("soft", "<f4"), ("chunked", "<f4"), ("one_chunk", "<f4"),
                        ("gzip", "<f4"), ("f64", "<f8"), ("big-endian", ">f4"), ("f16", "<f2"),
                        ("external", "<f4")):
        assert np.array_equal(store.get(name), x.astype(dtype).astype(np.float32)), name
    assert np.array_equal(store.get("unwritten"), np.zeros((3, 5), np.float32))
    assert all(store.problem(k) for k in ("vector", "int", "rank3", "scalar", "empty", "group"))


def test_index_of_a_latest_format_file_reads_in_place(tmp_path):
    path = tmp_path / "latest.hdf5"
    with h5py.File(path, "w", libver="latest") as f:
        for i in range(5):
            f.create_dataset(f"v{i}", data=np.full((3, 4), i, dtype=np.float32))
    assert set(_in_place(h5index.build_index(path))) == {f"v{i}" for i in range(5)}
    store = H5FeatureStore(path)
    assert len(store._offset) == 5
    assert all(np.array_equal(store.get(f"v{i}"), np.full((3, 4), i, np.float32)) for i in range(5))


def _count_builds(monkeypatch) -> list:
    built = []
    real = h5index.build_index
    monkeypatch.setattr(h5index, "build_index", lambda p: built.append(p) or real(p))
    return built


def test_the_cached_index_is_reused_until_the_file_changes(tmp_path, monkeypatch, caplog):
    path = tmp_path / "v.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=np.ones((2, 3), np.float32))
    cache_dir = tmp_path / "data" / "ds" / "h5index"
    built = _count_builds(monkeypatch)
    first = h5index.load_index(path, cache_dir)
    with np.load(h5index.cache_file(path, cache_dir), allow_pickle=False) as z:   # plain data
        assert int(z["size"]) == path.stat().st_size
    again = h5index.load_index(path, cache_dir)
    assert len(built) == 1 and again.names == first.names == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "v.hdf5"]   # none beside it
    with h5py.File(path, "a") as f:                     # size and mtime change
        f.create_dataset("b", data=np.zeros((4, 3), np.float32))
    with caplog.at_level(logging.INFO, logger="prvr.data.h5index"):
        assert h5index.load_index(path, cache_dir).names == ["a", "b"] and len(built) == 2
        st = path.stat()                                # the mtime alone changes
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        h5index.load_index(path, cache_dir)
    lines = [r.getMessage() for r in caplog.records]
    assert len(built) == 3 and len(lines) == 2, lines
    assert "size" in lines[0] and "changed" in lines[0] and str(path) in lines[0]
    assert "file's mtime changed" in lines[1]
    h5index.cache_file(path, cache_dir).write_bytes(b"PK\x03\x04 not a zip")  # a damaged cache
    assert h5index.load_index(path, cache_dir).names == ["a", "b"] and len(built) == 4


def test_a_cache_with_wrong_offsets_is_caught_by_the_first_read(both, tmp_path, monkeypatch):
    """The cache is trusted on the file's path, size and mtime; a cache that is wrong anyway
    (here: every offset one value back) costs speed, never values."""
    truth = list(make_train_loader(_h5_corpus(both), batch_size=16, seed=2))
    cache_dir = tmp_path / "h5index"
    for path in (both / "FeatureData" / VIDEO_FILE, both / "TextData" / QUERY_FILE):
        index = h5index.load_index(path, cache_dir)
        offset = np.where(index.offset >= 0, index.offset - 4, -1)
        offset[3] = index.size                       # one that would run past the file's end
        shifted = h5index.H5Index(index.path, index.size, index.mtime_ns, index.names, index.rank,
                                  index.shape, offset)
        assert index.in_place().all() and shifted.in_place().sum() == len(offset) - 1
        h5index._write_cache(h5index.cache_file(path, cache_dir), shifted)
    built = _count_builds(monkeypatch)
    corpus = _h5_corpus(both, cache_dir)
    assert_same_batches(truth, make_train_loader(corpus, batch_size=16, seed=2))
    assert not built and corpus.features._fast is False and corpus.text._fast is False


def test_a_read_only_collection_folder_works_and_gets_no_file(both, tmp_path, caplog):
    cdir = _copy(both, tmp_path / "demo")
    before = sorted(str(p.relative_to(cdir)) for p in cdir.rglob("*"))
    for d in (cdir / "FeatureData", cdir / "TextData", cdir):
        d.chmod(0o555)
    try:
        cache_dir = tmp_path / "data" / "demo" / "h5index"
        n = sum(len(b["video_ids"]) for b in make_train_loader(_h5_corpus(cdir, cache_dir), batch_size=16))
        assert n == len(_h5_corpus(cdir).split("train").video_ids)
        assert sorted(p.name for p in cache_dir.iterdir()) == [f"{QUERY_FILE}.npz", f"{VIDEO_FILE}.npz"]
        # a cache folder that cannot be written: the index stays in memory, one warning
        unwritable = tmp_path / "a_file"
        unwritable.write_text("")
        with caplog.at_level(logging.WARNING, logger="prvr.data.h5index"):
            store = H5FeatureStore(cdir / "FeatureData" / VIDEO_FILE, unwritable / "h5index")
        assert len(store._offset) == len(store)
        assert [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
        assert sorted(str(p.relative_to(cdir)) for p in cdir.rglob("*")) == before
    finally:
        for d in (cdir, cdir / "FeatureData", cdir / "TextData"):
            d.chmod(0o755)


def test_bad_files_and_missing_datasets_are_one_line_naming_the_file(both, tmp_path):
    cdir = _copy(both, tmp_path / "demo")
    video, cache_dir = cdir / "FeatureData" / VIDEO_FILE, tmp_path / "h5index"
    store = H5FeatureStore(video, cache_dir)
    with pytest.raises(DataError, match=rf"^{re.escape(str(video))}: video 'nope' has no features here$"):
        store.get("nope")
    text = TextFeatures(cdir / "TextData" / QUERY_FILE, cache_dir)
    with pytest.raises(DataError, match=rf"{QUERY_FILE}: no features for caption 'nope'$"):
        text.get("nope")
    video.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 200)   # corrupt, with a cache present
    for build in (lambda: H5FeatureStore(video, cache_dir), lambda: h5index.load_index(video)):
        with pytest.raises(DataError) as exc:
            build()
        msg = str(exc.value)
        assert msg.startswith(f"{video}: not a readable HDF5 file") and "\n" not in msg, msg
    video.unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(video))}: not found$"):
        H5FeatureStore(video, cache_dir)


def test_the_validate_stage_writes_the_indexes_that_training_loads(both, tmp_path, monkeypatch):
    root = tmp_path / "VisualSearch"
    _copy(both, root / "demo")
    settings, data = _settings("x_clip", data_root=str(root)), tmp_path / "data"
    fetch(settings, data, progress=False)
    report, _ = validate(settings, data, progress=False)
    assert report["ok"], report["problems"]
    cache_dir = h5index.index_dir(settings, data)
    assert cache_dir == data / "x_clip" / "h5index"
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"{QUERY_FILE}.npz", f"{VIDEO_FILE}.npz"]
    built = _count_builds(monkeypatch)
    corpus = Corpus.from_settings(settings, data)
    batch = next(iter(make_train_loader(corpus, batch_size=8, seed=0)))
    assert not built and len(batch["video_ids"]) == 8
    assert len(corpus.features._offset) == len(corpus.features) and corpus.text._where


def test_the_loader_finds_captions_and_videos_through_the_index(both, monkeypatch):
    corpus = _h5_corpus(both)
    opened = []
    real_open = type(corpus.text)._open
    monkeypatch.setattr(type(corpus.text), "_open", lambda self, c: opened.append(c) or real_open(self, c))
    n = sum(len(b["query_ids"]) for b in make_train_loader(corpus, batch_size=16, seed=0))
    assert n == len(corpus.split("train").query_ids) and len(opened) == 1   # the first, checked
    with h5py.File(both / "TextData" / QUERY_FILE, "r") as f:
        for cap, (offset, tokens, dim) in list(corpus.text._where.items())[:50]:
            assert (f[cap].id.get_offset(), f[cap].shape) == (offset, (tokens, dim))
    with h5py.File(both / "FeatureData" / VIDEO_FILE, "r") as f:
        store = corpus.features
        assert all(f[v].id.get_offset() == store._offset[v] for v in store.video_ids)


# ---------------------------------------------------------------------------------- queries

def _rekey_queries(cdir: Path, how: str) -> None:
    """Query features as the CLIP files hold them: one vector per caption, (D,) or (1, D),
    under the caption id or DL-DKD's '<video>#<n>' key."""
    path = cdir / "TextData" / QUERY_FILE
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
    path.unlink()
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            vec = v.mean(axis=0)
            key = "#".join(k.split("#enc#")) if "alias" in how else k
            f.create_dataset(key, data=vec[None] if "2d" in how else vec)


@pytest.mark.parametrize("how", ["1d", "2d", "1d-alias"])
def test_one_vector_per_caption_is_one_token(both, tmp_path, how):
    cdir = _copy(both, tmp_path / "demo")
    with h5py.File(cdir / "TextData" / QUERY_FILE) as f:
        means = {k: f[k][()].mean(axis=0) for k in f}
    _rekey_queries(cdir, how)
    corpus = _h5_corpus(cdir)
    q = collate_queries([QueryDataset(corpus, "test")[i] for i in range(5)])
    assert q["query_feats"].shape == (5, 1, TDIM) and q["query_mask"].all()
    want = means[q["query_ids"][0]]
    assert np.allclose(q["query_feats"][0, 0].numpy(), want / (np.linalg.norm(want) + 1e-5), atol=1e-6)
    batch = next(iter(make_train_loader(corpus, batch_size=4, seed=0)))
    assert batch["query_feats"].shape[1:] == (1, TDIM)
    report = validate_collection(_h5_paths(cdir), VDIM, TDIM, progress=False)
    assert report["ok"], report["problems"]
    assert report["splits"]["train"]["tokens_per_caption"]["max"] == 1


# ---------------------------------------------------------------------------------- hostile input

def _edit_video(cdir: Path, fn) -> str:
    with h5py.File(cdir / "FeatureData" / VIDEO_FILE, "a") as f:
        vid = sorted(k for k in f if "_train_" in k)[2]
        fn(f, vid)
    return vid


def _replace(data_fn):
    def edit(f, vid):
        data = f[vid][()]
        del f[vid]
        f.create_dataset(vid, data=data_fn(data))
    return edit


def _set_value(value):
    def fn(x):
        x[1, 3] = value
        return x
    return fn


def _truncate(cdir: Path) -> str:
    p = cdir / "FeatureData" / VIDEO_FILE
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return VIDEO_FILE


def _not_hdf5(cdir: Path) -> str:
    (cdir / "FeatureData" / VIDEO_FILE).write_text("{'not': 'hdf5'}\n")
    return VIDEO_FILE


def _drop_caption(cdir: Path) -> str:
    with h5py.File(cdir / "TextData" / QUERY_FILE, "a") as f:
        cap = sorted(k for k in f if "_val_" in k)[1]
        del f[cap]
    return cap


# case: (mutation returning the id (or file) to be named, file named, words, store raises too)
CASES = {
    "missing video": (lambda c: _edit_video(c, lambda f, v: f.__delitem__(v)), VIDEO_FILE,
                      "have no features", True),
    "0 frames": (lambda c: _edit_video(c, _replace(lambda x: x[:0])), VIDEO_FILE, "0 frames", True),
    "wrong width": (lambda c: _edit_video(c, _replace(lambda x: x[:, :-6])), VIDEO_FILE,
                    f"width {VDIM - 6}", True),
    "NaN": (lambda c: _edit_video(c, _replace(_set_value(np.nan))), VIDEO_FILE, "NaN or Inf", False),
    "Inf": (lambda c: _edit_video(c, _replace(_set_value(np.inf))), VIDEO_FILE, "NaN or Inf", False),
    "int dtype": (lambda c: _edit_video(c, _replace(lambda x: (x * 100).astype(np.int32))), VIDEO_FILE,
                  "dtype int32", True),
    "1-d video": (lambda c: _edit_video(c, _replace(lambda x: x[0])), VIDEO_FILE, "expected (frames, D)",
                  True),
    "truncated file": (_truncate, VIDEO_FILE, "not a readable HDF5 file", True),
    "not HDF5": (_not_hdf5, VIDEO_FILE, "not a readable HDF5 file", True),
    "caption without feature": (_drop_caption, QUERY_FILE, "have no text feature", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_file_and_the_id(both, tmp_path, case):
    mutate, fname, words, store_raises = CASES[case]
    cdir = _copy(both, tmp_path / "demo")
    who = mutate(cdir)
    report = validate_collection(_h5_paths(cdir), VDIM, TDIM, progress=False)
    assert report["ok"] is False
    hits = [e["message"] for e in report["problems"]["errors"]
            if fname in e["message"] and words in e["message"] and who in e["message"]]
    assert hits and all("\n" not in h for h in hits), report["problems"]["errors"]
    json.dumps(report)                            # the report stays JSON
    if store_raises:                              # training refuses it too, before any batch
        with pytest.raises(DataError) as exc:
            TrainVideoDataset(_h5_corpus(cdir))
        msg = str(exc.value)
        assert fname in msg and (who in msg or who == fname) and "\n" not in msg, msg


def test_caption_without_feature_stops_the_loader_naming_the_caption(both, tmp_path):
    cdir = _copy(both, tmp_path / "demo")
    cap = _drop_caption(cdir)
    with pytest.raises(DataError, match=f"{QUERY_FILE}: no features for caption '{cap}'"):
        list(make_eval_loaders(_h5_corpus(cdir), "val", 50, 50)[1])


def test_a_clean_clip_corpus_validates_with_its_counts(both):
    report = validate_collection(_h5_paths(both), VDIM, TDIM, progress=False)
    assert report["ok"], report["problems"]
    train = Corpus(both, "demo_feats").split("train")
    assert report["splits"]["train"]["videos"] == len(train.video_ids)
    assert report["dims"]["visual"] == VDIM and report["dims"]["text"] == TDIM
    assert report["frames"]["videos"] == sum(report["splits"][s]["videos"] for s in ("train", "val", "test"))
    wrong = validate_collection(_h5_paths(both), 512, 512, progress=False)
    assert any("visual_dim" in e["message"] and "_train_" in e["message"] for e in wrong["problems"]["errors"])


# ---------------------------------------------------------------------------------- fetch, settings

def _settings(ds: str, **kw) -> dict:
    base = {"dataset": ds, "collection": "demo", "feature": VIDEO_FILE, "feature_format": "hdf5",
            "query_feature": QUERY_FILE, "visual_dim": VDIM, "text_dim": TDIM, "archive": None,
            "sha256": None, "generator": None}
    return {**base, **kw}


def test_fetch_generates_the_demo_in_the_clip_layout_only(tmp_path):
    settings = _settings("demo_clip", generator={"preset": "demo", "seed": 7, "scale": 0.03})
    record = fetch(settings, tmp_path / "data", progress=False)
    cdir = Path(record["collection_dir"])
    assert record["origin"] == "generated" and record["feature_format"] == "hdf5"
    assert sorted(p.name for p in (cdir / "FeatureData").iterdir()) == [VIDEO_FILE]
    assert not (cdir / "TextData" / default_query_feature("demo")).exists()
    corpus = Corpus.from_settings(settings, tmp_path / "data")
    assert corpus.paths.is_hdf5 and corpus.visual_dim == VDIM
    report, _ = validate(settings, tmp_path / "data", progress=False)
    assert report["ok"], report["problems"]


def test_fetch_references_a_clip_folder_and_names_what_is_missing(both, tmp_path):
    root = tmp_path / "VisualSearch"
    cdir = _copy(both, root / "demo")
    settings = _settings("x_clip", data_root=str(root))
    record = fetch(settings, tmp_path / "data", progress=False)
    assert record["origin"] == "folder"
    assert set(record["files"]) >= {f"FeatureData/{VIDEO_FILE}", f"TextData/{QUERY_FILE}"}
    assert locate(settings, tmp_path / "data").video_feat_file == cdir / "FeatureData" / VIDEO_FILE
    (cdir / "FeatureData" / VIDEO_FILE).unlink()
    with pytest.raises(DataError, match=f"missing FeatureData/{VIDEO_FILE}"):
        fetch(settings, tmp_path / "data", progress=False)
    with pytest.raises(DataError, match="feature_format 'zarr'"):
        fetch({**settings, "feature_format": "zarr"}, tmp_path / "data", progress=False)


def test_clip_presets_write_512_d_files_keyed_as_dl_dkd(tmp_path):
    cdir = demo.generate_corpus(tmp_path, "tvr-clip", seed=1, scale=0.001, progress=False)
    assert sorted(p.name for p in (cdir / "FeatureData").iterdir()) == [default_h5_feature("tvr")]
    with h5py.File(cdir / "TextData" / default_query_feature("tvr", "hdf5")) as f:
        assert all("#enc#" not in k for k in f)    # '<video>#<n>', read via caption_key_alias
    corpus = Corpus(cdir, default_h5_feature("tvr"), feature_format="hdf5")
    batch = next(iter(make_train_loader(corpus, batch_size=4, seed=0)))
    assert batch["clip_feats"].shape[-1] == 512 and batch["query_feats"].shape[-1] == 512


def test_params_have_the_clip_datasets_with_their_recipes():
    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for ds, collection, recipe in (("tvr_clip", "tvr", "tvr"), ("act_clip", "activitynet", "act"),
                                   ("cha_clip", "charades", "cha"), ("demo_clip", "demo", "demo")):
        sec = params["datasets"][ds]
        assert (sec["collection"], sec["recipe"], sec["feature_format"]) == (collection, recipe, "hdf5")
        assert sec["feature"] == default_h5_feature(collection)
        assert sec["query_feature"] == default_query_feature(collection, "hdf5")
        if ds != "demo_clip":
            assert (sec["visual_dim"], sec["text_dim"]) == (512, 512)


# ---------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_dvc_experiment_on_cha_clip_keeps_the_cha_outputs(tmp_path):
    """One Charades folder holding both feature formats (as the MS-SL bundle does): an
    experiment on cha, then one on cha_clip; the second leaves the first's outputs as they are."""
    import hashlib

    from conftest import copy_repo, git_commit, run

    root = tmp_path / "VisualSearch"
    cha = demo.generate_corpus(root, "cha-shaped", seed=3, scale=0.01, progress=False)
    clip = demo.generate_corpus(tmp_path / "clip", "cha-clip", seed=3, scale=0.01, progress=False)
    shutil.move(clip / "FeatureData" / default_h5_feature("charades"), cha / "FeatureData")
    shutil.move(clip / "TextData" / default_query_feature("charades", "hdf5"), cha / "TextData")
    repo = copy_repo(tmp_path / "repo")
    small = ["-S", f"data_root={root}", "-S", "methods.gmmformer_v2.cha.epochs=1",
             "-S", "methods.gmmformer_v2.cha.batch_size=32", "-S", "methods.gmmformer_v2.cha.hidden_size=32"]
    run(["dvc", "exp", "run", "-S", "dataset=cha", *small], cwd=repo, timeout=900)
    # every output of the cha experiment, wherever the pipeline puts it under the dataset's name
    digest = {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest()
              for top in ("data", "metrics", "reports", "runs") for f in (repo / top / "cha").rglob("*")
              if f.is_file()}
    assert any(k.endswith("test.json") for k in digest), sorted(digest)
    git_commit(repo, "cha results")
    exp = run(["dvc", "exp", "run", "-S", "dataset=cha_clip", *small], cwd=repo, timeout=900)
    assert "Running stage 'train'" in exp.stdout, exp.stdout[-3000:]
    for rel, d in digest.items():
        assert hashlib.sha256((repo / rel).read_bytes()).hexdigest() == d, f"{rel} changed"
    validation = json.loads((repo / "data/cha_clip/validation.json").read_text())
    assert validation["ok"] and validation["dims"] == {"visual": 512, "text": 512,
                                                       "expected_visual": 512, "expected_text": 512}
    test = json.loads(next((repo / "metrics" / "cha_clip").rglob("test.json")).read_text())
    assert test["n_videos"] == validation["splits"]["test"]["videos"] and 0 <= test["sumr"] <= 400
