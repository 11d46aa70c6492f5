"""The validate stage: every bad input gives a one-line error naming the file and exit 1."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import prvr.data.validate as validate_mod
from msssl_factory import TEXT_DIM, VISUAL_DIM, write_collection, write_params
from prvr.data.layout import CollectionPaths
from prvr.data.validate import validate_collection

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "validate.py"


def run_stage(tmp_path: Path, params: Path):
    proc = subprocess.run([sys.executable, str(STAGE), "--params", str(params), "--data-dir",
                           str(tmp_path / "data"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc


def _rewrite_h5(paths: CollectionPaths, cap_id: str, data) -> None:
    with h5py.File(paths.query_feat_file, "a") as h5:
        del h5[cap_id]
        h5.create_dataset(cap_id, data=np.asarray(data, dtype=np.float32))


def _drop_first_caption_line(paths, split):
    f = paths.caption_file(split)
    f.write_text("".join(f.read_text().splitlines(keepends=True)[1:]))


# Each case: (mutation of a valid collection, params overrides, file named, words in the message)
def _truncate_bin(p):
    p.feature_file.write_bytes(p.feature_file.read_bytes()[:-4])


def _drop_id(p):
    p.id_file.write_text(" ".join(p.id_file.read_text().split()[:-1]))


def _dup_id(p):
    ids = p.id_file.read_text().split()
    ids[1] = ids[0]
    p.id_file.write_text(" ".join(ids))


def _nan_frame(p):
    arr = np.fromfile(p.feature_file, dtype="<f4")
    arr[3 * VISUAL_DIM + 1] = np.nan
    arr.tofile(p.feature_file)


def _inf_frame(p):
    arr = np.fromfile(p.feature_file, dtype="<f4")
    arr[-1] = np.inf
    arr.tofile(p.feature_file)


def _v2f_edit(p, fn):
    v2f = ast.literal_eval(p.video2frames_file.read_text())
    fn(v2f)
    p.video2frames_file.write_text(repr(v2f))


def _v2f_missing_video(p):
    _v2f_edit(p, lambda d: d.pop("val_video_001"))


def _v2f_empty_video(p):
    _v2f_edit(p, lambda d: d.__setitem__("test_video_000", []))


def _v2f_unknown_frame(p):
    _v2f_edit(p, lambda d: d["train_video_002"].append("no_such_frame"))


def _v2f_dup_video(p):
    text = p.video2frames_file.read_text()
    p.video2frames_file.write_text(text[:-1] + ", 'train_video_000': ['train_video_000_0']}")


def _v2f_code(p):
    marker = p.collection_dir.parent / "pwned"
    p.video2frames_file.write_text("{'train_video_000': __import__('os').system('touch %s')}" % marker)


def _cap_missing_feature(p):
    with h5py.File(p.query_feat_file, "a") as h5:
        del h5["val_video_000#enc#1"]


def _cap_empty_tokens(p):
    _rewrite_h5(p, "train_video_001#enc#0", np.zeros((0, TEXT_DIM)))


def _cap_inf(p):
    data = np.ones((3, TEXT_DIM))
    data[1, 2] = np.inf
    _rewrite_h5(p, "test_video_001#enc#0", data)


def _cap_other_dim(p):
    _rewrite_h5(p, "train_video_000#enc#0", np.ones((3, TEXT_DIM + 1)))


def _cap_group(p):
    with h5py.File(p.query_feat_file, "a") as h5:
        del h5["val_video_001#enc#0"]
        h5.create_group("val_video_001#enc#0")


def _cap_int_1d(p):
    with h5py.File(p.query_feat_file, "a") as h5:
        del h5["train_video_003#enc#1"]
        h5.create_dataset("train_video_003#enc#1", data=np.arange(4))


def _cap_bad_line(p):
    with open(p.caption_file("train"), "a") as fh:
        fh.write("train_video_000#enc#9\n")


def _cap_dup_id(p):
    with open(p.caption_file("test"), "a") as fh:
        fh.write("test_video_000#enc#0 the same id again\n")


def _empty_split(p):
    p.caption_file("val").write_text("\n")


def _no_split_file(p):
    p.caption_file("test").unlink()


def _bad_shape(p):
    p.shape_file.write_text("many 8\n")


CASES = {
    "feature.bin size": (_truncate_bin, {}, "feature.bin", "bytes, but shape.txt"),
    "id count": (_drop_id, {}, "id.txt", "but shape.txt says"),
    "duplicate frame ids": (_dup_id, {}, "id.txt", "appear more than once"),
    "visual dim": (lambda p: None, {"visual_dim": VISUAL_DIM * 2}, "shape.txt", "differs from visual_dim"),
    "text dim": (lambda p: None, {"text_dim": TEXT_DIM + 2}, "roberta_toy_query_feat.hdf5",
                 "differs from text_dim"),
    "inconsistent text dims": (_cap_other_dim, {}, "roberta_toy_query_feat.hdf5", "different dimensions"),
    "NaN frame": (_nan_frame, {}, "feature.bin", "NaN or Inf"),
    "Inf frame": (_inf_frame, {}, "feature.bin", "NaN or Inf"),
    "video without entry": (_v2f_missing_video, {}, "video2frames.txt", "have no entry"),
    "video with 0 frames": (_v2f_empty_video, {}, "video2frames.txt", "have 0 frames"),
    "frame not in id.txt": (_v2f_unknown_frame, {}, "video2frames.txt", "not in id.txt"),
    "duplicate video ids": (_v2f_dup_video, {}, "video2frames.txt", "appear more than once"),
    "planted code": (_v2f_code, {}, "video2frames.txt", "never evaluated"),
    "caption without text feature": (_cap_missing_feature, {}, "roberta_toy_query_feat.hdf5",
                                     "have no text feature"),
    "caption with 0 tokens": (_cap_empty_tokens, {}, "roberta_toy_query_feat.hdf5", "0 tokens"),
    "Inf caption feature": (_cap_inf, {}, "roberta_toy_query_feat.hdf5", "NaN or Inf"),
    "caption feature is a group": (_cap_group, {}, "roberta_toy_query_feat.hdf5", "not 2-d float arrays"),
    "caption feature is 1-d int": (_cap_int_1d, {}, "roberta_toy_query_feat.hdf5", "not 2-d float arrays"),
    "caption line without text": (_cap_bad_line, {}, "toytrain.caption.txt:9", "has no text"),
    "duplicate caption ids": (_cap_dup_id, {}, "toytest.caption.txt", "appear more than once"),
    "empty split": (_empty_split, {}, "toyval.caption.txt", "has no captions"),
    "missing split file": (_no_split_file, {}, "toytest.caption.txt", "not found"),
    "malformed shape.txt": (_bad_shape, {}, "shape.txt", "expected 'N D'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_line_naming_the_file(tmp_path, case):
    mutate, overrides, fname, words = CASES[case]
    paths = write_collection(tmp_path / "root")
    mutate(paths)
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", **overrides)
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    problem_lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("  ")]
    hits = [ln for ln in problem_lines if fname in ln and words in ln]
    assert hits, proc.stderr
    assert "validate: error:" in proc.stderr
    # The report is complete JSON, says not ok, and holds the same problem; no temp files remain.
    report_file = tmp_path / "data" / "toy" / "validation.json"
    report = json.loads(report_file.read_text())
    assert report["ok"] is False
    assert any(fname in e["message"] and words in e["message"] for e in report["problems"]["errors"])
    assert sorted(x.name for x in report_file.parent.iterdir()) == ["validation.json"]
    assert not (tmp_path / "root" / "pwned").exists()


def test_valid_collection_passes_with_counts(tmp_path):
    write_collection(tmp_path / "root", videos={"train": 5, "val": 2, "test": 3}, captions_per_video=3,
                     frames=(4, 4), tokens=(3, 3))
    params = write_params(tmp_path / "params.yaml", tmp_path / "root")
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "validation.json" in proc.stderr
    report = json.loads((tmp_path / "data" / "toy" / "validation.json").read_text())
    assert report["ok"] is True and report["problems"] == {"errors": [], "warnings": []}
    assert report["dims"] == {"visual": VISUAL_DIM, "text": TEXT_DIM, "expected_visual": VISUAL_DIM,
                              "expected_text": TEXT_DIM}
    assert report["frames"] == {"rows": 40, "ids": 40}
    assert {s: (v["videos"], v["captions"]) for s, v in report["splits"].items()} == \
        {"train": (5, 15), "val": (2, 6), "test": (3, 9)}
    assert report["splits"]["train"]["frames_per_video"] == {"min": 4, "median": 4.0, "max": 4}
    assert report["splits"]["test"]["tokens_per_caption"] == {"min": 3, "median": 3.0, "max": 3}


def test_warnings_do_not_fail(tmp_path):
    paths = write_collection(tmp_path / "root")
    with open(paths.caption_file("val"), "a") as fh:  # a train video reused in val: leakage warning
        fh.write("train_video_000#enc#7 reused video\n")
    with h5py.File(paths.query_feat_file, "a") as h5:
        h5.create_dataset("train_video_000#enc#7", data=np.ones((2, TEXT_DIM), np.float32))
    report = validate_collection(paths, VISUAL_DIM, TEXT_DIM, progress=False)
    assert report["ok"] is True
    assert len(report["problems"]["warnings"]) == 1
    assert "also in train" in report["problems"]["warnings"][0]["message"]


def test_nan_scan_streams_in_chunks(tmp_path, monkeypatch):
    paths = write_collection(tmp_path / "root", videos={"train": 30, "val": 2, "test": 2})
    n, _ = (int(x) for x in paths.shape_file.read_text().split())
    arr = np.fromfile(paths.feature_file, dtype="<f4").reshape(n, VISUAL_DIM)
    arr[n - 2, 0] = -np.inf  # in the last chunk
    arr.tofile(paths.feature_file)
    monkeypatch.setattr(validate_mod, "_SCAN_BYTES", 4 * VISUAL_DIM * 7)  # 7 rows a chunk
    report = validate_collection(paths, VISUAL_DIM, TEXT_DIM, progress=False)
    ids = paths.id_file.read_text().split()
    errors = [e["message"] for e in report["problems"]["errors"]]
    assert errors == [f"FeatureData/toyfeat/feature.bin: 1 frame vectors hold NaN or Inf ('{ids[n - 2]}')"]


def test_missing_collection_is_one_line_and_writes_nothing(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "root")
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and str(tmp_path / "root" / "toy") in errors[0]
    assert not (tmp_path / "data" / "toy" / "validation.json").exists()
