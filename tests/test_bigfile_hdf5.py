"""feature_format bigfile_hdf5 (FeatureData/<feature>/feature.hdf5 + video2frames.txt, the
layout of recent releases): the converter writes it from a BigFile folder, the reader gives
the BigFile's frames byte for byte, fetch / validate / the demo generator know it, and every
bad input is a one-line error naming the file and what is wrong."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from prvr.data import demo
from prvr.data.convert_bigfile import convert_bigfile, main as convert_main
from prvr.data.datasets import Corpus, TrainVideoDataset, make_train_loader
from prvr.data.features import FeatureStore, open_store
from prvr.data.fetch import fetch
from prvr.data.h5features import FramesH5Store
from prvr.data.layout import FRAMES_H5, CollectionPaths, DataError
from prvr.data.validate import validate, validate_collection
from conftest import assert_same_batches

FEAT = demo.PRESETS["demo"].feature
VDIM, TDIM = demo.PRESETS["demo"].visual_dim, demo.PRESETS["demo"].text_dim


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A small BigFile demo corpus with feature.hdf5 converted next to its BigFile files."""
    cdir = demo.generate_corpus(tmp_path_factory.mktemp("bfh5"), "demo", seed=5, scale=0.06,
                                progress=False)
    assert convert_main([str(cdir / "FeatureData" / FEAT), "--no-progress"]) == 0
    return cdir


def _paths(cdir: Path) -> CollectionPaths:
    return CollectionPaths(cdir, "demo", FEAT, "bigfile_hdf5")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_converted_frames_are_the_bigfiles_byte_for_byte(converted):
    big = FeatureStore(converted / "FeatureData" / FEAT)
    h5 = open_store(_paths(converted))
    assert isinstance(h5, FramesH5Store) and sorted(h5.video_ids) == sorted(big.video_ids)
    for vid in big.video_ids:
        a, b = big.get(vid), h5.get(vid)
        assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes(), vid
        assert h5.apply(vid, lambda x: x.tobytes()) == a.tobytes()
    report = validate_collection(_paths(converted), VDIM, TDIM, progress=False)
    assert report["ok"], report["problems"]


def test_batches_equal_the_bigfile_batches(converted):
    big, h5 = Corpus(converted, FEAT), Corpus(converted, FEAT, feature_format="bigfile_hdf5")
    assert_same_batches(make_train_loader(big, batch_size=8, seed=0),
                        make_train_loader(h5, batch_size=8, seed=0))


def test_the_converter_refuses_to_overwrite_and_leaves_no_partial_file(converted, tmp_path):
    fdir = _copy(converted / "FeatureData" / FEAT, tmp_path / FEAT)
    with pytest.raises(DataError, match="already exists"):
        convert_bigfile(fdir, progress=False)
    (fdir / "feature.bin").write_bytes((fdir / "feature.bin").read_bytes()[:-4])
    before = (fdir / FRAMES_H5).read_bytes()
    assert convert_main([str(fdir), "--force", "--no-progress"]) == 1      # bad BigFile: nothing written
    assert (fdir / FRAMES_H5).read_bytes() == before
    assert sorted(p.name for p in fdir.iterdir()) == sorted(p.name for p in (converted / "FeatureData" / FEAT).iterdir())


def test_fetch_generates_the_demo_in_this_layout_and_it_validates(tmp_path):
    settings = {"dataset": "demo_h5", "collection": "demo", "feature": FEAT,
                "feature_format": "bigfile_hdf5", "query_feature": None, "visual_dim": VDIM,
                "text_dim": TDIM, "archive": None, "sha256": None,
                "generator": {"preset": "demo", "seed": 7, "scale": 0.03}}
    record = fetch(settings, tmp_path / "data", progress=False)
    cdir = Path(record["collection_dir"])
    assert record["feature_format"] == "bigfile_hdf5"
    assert sorted(p.name for p in (cdir / "FeatureData" / FEAT).iterdir()) == [FRAMES_H5, "video2frames.txt"]
    report, _ = validate(settings, tmp_path / "data", progress=False)
    assert report["ok"], report["problems"]
    assert sorted(p.name for p in (tmp_path / "data" / "demo_h5" / "h5index").iterdir()) == \
        [f"{FRAMES_H5}.npz", "roberta_demo_query_feat.hdf5.npz"]
    corpus = Corpus.from_settings(settings, tmp_path / "data")
    assert isinstance(corpus.features, FramesH5Store) and corpus.visual_dim == VDIM
    batch = next(iter(make_train_loader(corpus, batch_size=4, seed=0)))
    assert batch["clip_feats"].shape[-1] == VDIM


def test_fetch_references_a_folder_and_names_the_missing_file(converted, tmp_path):
    root = tmp_path / "VisualSearch"
    cdir = _copy(converted, root / "demo")
    settings = {"dataset": "x_h5", "collection": "demo", "feature": FEAT,
                "feature_format": "bigfile_hdf5", "data_root": str(root), "archive": None,
                "sha256": None, "generator": None}
    record = fetch(settings, tmp_path / "data", progress=False)
    assert f"FeatureData/{FEAT}/{FRAMES_H5}" in record["files"]
    (cdir / "FeatureData" / FEAT / FRAMES_H5).unlink()
    with pytest.raises(DataError, match=f"missing FeatureData/{FEAT}/{FRAMES_H5}"):
        fetch(settings, tmp_path / "data", progress=False)


# ---------------------------------------------------------------------------------- hostile input

def _h5(cdir: Path) -> Path:
    return cdir / "FeatureData" / FEAT / FRAMES_H5


def _edit(fn):
    def mutate(cdir: Path) -> str:
        with h5py.File(_h5(cdir), "a") as f:
            vid = sorted(k for k in f if "_train_" in k)[2]
            data = f[vid][()]
            del f[vid]
            new = fn(data, f)
            if new is not None:
                f.create_dataset(vid, data=new)
        return vid
    return mutate


def _missing_file(cdir: Path) -> str:
    _h5(cdir).unlink()
    return FRAMES_H5


def _truncate(cdir: Path) -> str:
    p = _h5(cdir)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return FRAMES_H5


def _references(data, f):
    dt = h5py.special_dtype(ref=h5py.Reference)
    return np.array([[f.ref] * data.shape[1]] * data.shape[0], dtype=dt)


def _objects(data, f):
    return np.array([["__import__('os').system('false')"] * 3] * data.shape[0],
                    dtype=h5py.string_dtype())


def _external_link(cdir: Path) -> str:
    elsewhere = cdir.parent / "elsewhere.h5"
    with h5py.File(_h5(cdir), "a") as f:
        vid = sorted(k for k in f if "_train_" in k)[2]
        with h5py.File(elsewhere, "w") as g:
            g["x"] = f[vid][()]
        del f[vid]
        f[vid] = h5py.ExternalLink(str(elsewhere), "x")
    return vid


CASES = {  # case: (mutation returning the id or file named, words in the error)
    "missing feature.hdf5": (_missing_file, "not found"),
    "video missing": (_edit(lambda x, f: None), "have no features"),
    "1-d video": (_edit(lambda x, f: x[0]), "expected (frames, D)"),
    "3-d video": (_edit(lambda x, f: x[None]), "expected (frames, D)"),
    "wrong width": (_edit(lambda x, f: x[:, :-6]), f"width {VDIM - 6}"),
    "fewer frames": (_edit(lambda x, f: x[:-1]), "video2frames.txt lists"),
    "int dtype": (_edit(lambda x, f: (x * 100).astype(np.int32)), "dtype int32"),
    "NaN": (_edit(lambda x, f: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x)),
            "NaN or Inf"),
    "references": (_edit(_references), "dtype object"),
    "objects": (_edit(_objects), "dtype object"),
    "truncated": (_truncate, "not a readable HDF5 file"),
    "external link": (_external_link, "external link"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_file_and_what_is_wrong(converted, tmp_path, case, capsys):
    mutate, words = CASES[case]
    cdir = _copy(converted, tmp_path / "demo")
    who = mutate(cdir)
    report = validate_collection(_paths(cdir), VDIM, TDIM, progress=False)
    assert report["ok"] is False
    hits = [e["message"] for e in report["problems"]["errors"]
            if FRAMES_H5 in e["message"] and words in e["message"] and who in e["message"]]
    assert hits and all("\n" not in h for h in hits), report["problems"]["errors"]
    json.dumps(report)
    if case != "NaN":                             # training refuses it too, before any batch
        with pytest.raises(DataError) as exc:
            TrainVideoDataset(Corpus(cdir, FEAT, feature_format="bigfile_hdf5")).corpus.check_videos("train")
        msg = str(exc.value)
        assert FRAMES_H5 in msg and who in msg and "\n" not in msg, msg


def test_the_validate_stage_exits_non_zero_on_a_bad_file(converted, tmp_path):
    import subprocess

    from conftest import edit_params

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "VisualSearch"
    cdir = _copy(converted, root / "demo")
    who = _edit(lambda x, f: x[:-1])(cdir)
    params = tmp_path / "params.yaml"
    shutil.copy(repo / "params.yaml", params)
    edit_params(params, data_root=str(root), **{"datasets.demo_h5.generator": None})
    args = ["--params", str(params), "--dataset", "demo_h5", "--data-dir", str(tmp_path / "data"),
            "--no-progress"]
    for stage, rc in (("fetch", 0), ("validate", 1)):
        done = subprocess.run([sys.executable, str(repo / "stages" / f"{stage}.py"), *args],
                              cwd=repo, capture_output=True, text=True, timeout=300)
        assert done.returncode == rc, done.stderr
    assert f"FeatureData/{FEAT}/{FRAMES_H5}: 1 videos of split 'train'" in done.stderr
    assert who in done.stderr
