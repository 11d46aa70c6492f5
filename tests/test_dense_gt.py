"""Dense multi-ground-truth evaluation: metrics by hand, the file readers, their one-line errors,
validate's checks and the demo generator's dense split."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from msssl_factory import TEXT_DIM, VISUAL_DIM, write_collection
from prvr.data.layout import CollectionPaths, DataError, read_captions
from prvr.data.splits import dense_split_files, read_dense_split
from prvr.metrics import retrieval_metrics

VIDEOS = ["a", "b", "c", "d"]
SCORES = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # q0: c ranks 2nd
                       [0.2, 0.8, 0.6, 0.7],    # q1: a 4th, c 3rd -> 3
                       [0.1, 0.4, 0.3, 0.2],    # q2: b 1st, d 3rd -> 1
                       [0.5, 0.6, 0.7, 0.8]])   # q3: none of its videos is in the split
KS = (1, 2, 3, 100)


def test_dense_metrics_by_hand_with_several_videos_and_none_in_the_split():
    gts = [["c"], ["a", "c", "not-here"], ["d", "b"], ["x", "y"]]
    m, ranks = retrieval_metrics(SCORES, gts, VIDEOS, ks=KS, absent="miss", return_ranks=True)
    assert ranks.tolist() == [2, 3, 1, 5]           # q3: after every video
    # q3 is a miss at every k, even k = 100 > 4 videos: R@100 is 3 of 4 queries, not 4 of 4
    assert m == pytest.approx({"r1": 25.0, "r2": 50.0, "r3": 75.0, "r100": 75.0, "sumr": 225.0,
                               "medr": 2.5, "meanr": 2.75, "n_absent": 1})
    with pytest.raises(ValueError, match="'x' of query 'q3' is not in the video list"):
        retrieval_metrics(SCORES, gts, VIDEOS, ks=KS, query_ids=["q0", "q1", "q2", "q3"])


def test_dense_ground_truth_can_only_raise_recall_over_the_standard_protocol():
    own = ["c", "a", "d", "b"]                      # one video per query: the standard protocol
    std = retrieval_metrics(SCORES, own, VIDEOS, ks=KS)
    dense = retrieval_metrics(SCORES, [["c"], ["a", "c"], ["d", "b"], ["b", "d"]], VIDEOS, ks=KS)
    # ranks standard: 2, 4, 3, 3; dense: 2, 3, 1, 1
    assert [std[f"r{k}"] for k in KS] == [0.0, 25.0, 75.0, 100.0]
    assert [dense[f"r{k}"] for k in KS] == [50.0, 75.0, 100.0, 100.0]
    # the one-id fast path: a missing id is a miss too
    m = retrieval_metrics(SCORES, ["c", "a", "d", "zz"], VIDEOS, ks=KS, absent="miss")
    assert (m["r3"], m["r100"], m["n_absent"]) == (50.0, 75.0, 1)
    with pytest.raises(ValueError, match="absent must be"):
        retrieval_metrics(SCORES, own, VIDEOS, absent="skip")


# ---- the files --------------------------------------------------------------------------------

def _write_dense(paths: CollectionPaths, rows: list[dict] | None = None, raw: list[str] | None = None,
                 folder: Path | None = None, name: str = "denseval") -> tuple[Path, Path]:
    """The test captions as a dense split; by default each query's gt = its video + the next."""
    folder = folder or paths.collection_dir
    caps = read_captions(paths.caption_file("test"))
    cap_file = folder / f"{paths.collection}{name}.caption.txt"
    cap_file.write_text("".join(f"{c} {t}\n" for c, _, t in caps), encoding="utf-8")
    videos = list(dict.fromkeys(v for _, v, _ in caps))
    if rows is None:
        rows = [{"query_id": c, "caption": t,
                 "gt_video_ids": [v, videos[(videos.index(v) + 1) % len(videos)]] if i % 2 else [v]}
                for i, (c, v, t) in enumerate(caps)]
    lines = raw if raw is not None else [json.dumps(r) for r in rows]
    gt_file = folder / f"{paths.collection}{name}.gt.jsonl"
    gt_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cap_file, gt_file


@pytest.fixture()
def toy(tmp_path) -> CollectionPaths:
    return write_collection(tmp_path, videos={"train": 3, "val": 2, "test": 3})


def test_read_a_dense_split(toy):
    _write_dense(toy)
    assert list(dense_split_files(toy)) == ["denseval"]
    split = read_dense_split(toy, "denseval")
    assert split.query_ids == [c for c, _, _ in read_captions(toy.caption_file("test"))]
    assert split.video_ids == ["test_video_000", "test_video_001", "test_video_002"]
    assert split.gt_video_ids[0] == ("test_video_000",)
    assert split.gt_video_ids[1] == ("test_video_000", "test_video_001")
    assert split.multi == 3


def test_a_dense_split_in_textdata_is_found_and_an_unknown_name_is_a_clear_error(toy):
    _write_dense(toy, folder=toy.text_dir, name="denseval_v")
    assert read_dense_split(toy, "denseval_v").video_ids[0] == "test_video_000"
    with pytest.raises(DataError, match=r"no dense split 'denseval' \(expected toydenseval.caption.txt "
                                        r"and toydenseval.gt.jsonl here or in TextData/; found: denseval_v\)"):
        read_dense_split(toy, "denseval")


def _row(q, gts, caption="text"):
    return json.dumps({"query_id": q, "caption": caption, "gt_video_ids": gts})


BAD = [
    ("malformed", lambda q: [_row(q[0], ["test_video_000"]), "{not json", "[1, 2]"],
     r"toydenseval.gt.jsonl:2: not valid JSON .* \(and 1 more malformed lines\)$"),
    ("not a list", lambda q: [json.dumps({"query_id": q[0], "gt_video_ids": "test_video_000"})],
     r"toydenseval.gt.jsonl:1: query '.*': 'gt_video_ids' must be a list of non-empty strings$"),
    ("empty", lambda q: [_row(q[0], [])],
     r"toydenseval.gt.jsonl: 1 queries have an empty gt_video_ids list \('test_video_000#enc#0'\)"),
    ("unknown video", lambda q: [_row(q[0], ["test_video_000", "nope"])],
     r"toydenseval.gt.jsonl: 1 ground-truth video ids are not videos of toydenseval.caption.txt \('nope'\)"),
    ("unknown query", lambda q: [_row("ghost#enc#0", ["test_video_000"])],
     r"toydenseval.gt.jsonl: 1 query ids are not captions of toydenseval.caption.txt \('ghost#enc#0'\)"),
    ("duplicate", lambda q: [_row(q[0], ["test_video_000"]), _row(q[0], ["test_video_001"])],
     r"toydenseval.gt.jsonl: 1 query ids appear on more than one line"),
]


@pytest.mark.parametrize("case,lines,message", BAD, ids=[b[0] for b in BAD])
def test_bad_dense_files_give_one_line_errors_naming_the_file(toy, case, lines, message):
    queries = [c for c, _, _ in read_captions(toy.caption_file("test"))]
    _write_dense(toy, raw=lines(queries))
    with pytest.raises(DataError) as err:
        read_dense_split(toy, "denseval")
    text = str(err.value)
    assert "\n" not in text and str(toy.collection_dir) in text
    assert re.search(message, text), text


def test_a_missing_gt_file_is_a_clear_error(toy):
    _, gt = _write_dense(toy)
    gt.unlink()
    with pytest.raises(DataError, match=r"toydenseval.gt.jsonl: file of dense split 'denseval' not found"):
        read_dense_split(toy, "denseval")


def test_validate_checks_dense_files_features_and_named_splits(toy):
    from prvr.data.validate import validate_collection

    cap_file, gt_file = _write_dense(toy)
    report = validate_collection(toy, VISUAL_DIM, TEXT_DIM, progress=False, dense_splits=["denseval"])
    assert report["ok"], report["problems"]
    assert report["dense"] == {"denseval": {"queries": 6, "videos": 3, "multi_video_queries": 3,
                                            "max_videos_per_query": 2}}
    # a caption whose query has no text feature, of a video without frames
    with open(cap_file, "a", encoding="utf-8") as fh:
        fh.write("lost_video#enc#0 no features at all\n")
    with open(gt_file, "a", encoding="utf-8") as fh:
        fh.write(_row("lost_video#enc#0", ["lost_video"]) + "\n")
    report = validate_collection(toy, VISUAL_DIM, TEXT_DIM, progress=False, dense_splits=["denseval", "other"])
    msgs = [e["message"] for e in report["problems"]["errors"]]
    assert not report["ok"]
    assert sorted(msgs) == [
        "TextData/toyother.gt.jsonl: dense split 'other' (evaluate.extra_splits) not found here "
        "nor in the collection folder",
        "toydenseval.caption.txt: 1 videos have no frames in video2frames.txt ('lost_video')",
        "toydenseval.gt.jsonl: 1 queries have no text feature ('lost_video#enc#0')",
    ]


def test_demo_generator_emits_a_dense_split_only_when_asked(tmp_path):
    from prvr.data.demo import generate_corpus
    from prvr.data.validate import validate_collection

    plain = CollectionPaths(generate_corpus(tmp_path / "plain", "demo", seed=7, scale=0.05,
                                            progress=False), "demo", "demo_feats")
    assert dense_split_files(plain) == {}
    dense = CollectionPaths(generate_corpus(tmp_path / "dense", "demo", seed=7, scale=0.05,
                                            progress=False, dense_gt=True), "demo", "demo_feats")
    for f in ("FeatureData/demo_feats/feature.bin", "TextData/demotest.caption.txt",
              "TextData/roberta_demo_query_feat.hdf5"):  # the corpus itself is unchanged
        assert (plain.collection_dir / f).read_bytes() == (dense.collection_dir / f).read_bytes()
    split = read_dense_split(dense, "denseval")
    test = read_captions(dense.caption_file("test"))
    assert split.query_ids == [c for c, _, _ in test]
    assert all(g[0] == v for g, (_, v, _) in zip(split.gt_video_ids, test))  # own video first
    assert split.multi > 0 and max(len(g) for g in split.gt_video_ids) > 1
    report = validate_collection(dense, 256, 128, progress=False, dense_splits=["denseval"])
    assert report["ok"] and report["dense"]["denseval"]["queries"] == len(test)


def test_the_fetch_stage_passes_the_demo_options_through(tmp_path):
    from prvr.config import load_settings
    from prvr.data.fetch import fetch
    from prvr.data.layout import locate

    s = load_settings()
    s["generator"] = {**s["generator"], "scale": 0.03, "dense_gt": True, "val_is_test": True}
    fetch(s, tmp_path / "data", progress=False)
    paths = locate(s, tmp_path / "data")
    assert list(dense_split_files(paths)) == ["denseval"]
    assert paths.caption_file("val").read_bytes() == paths.caption_file("test").read_bytes()
