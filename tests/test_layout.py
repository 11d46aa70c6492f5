"""MS-SL layout readers: captions, shape, ids, video2frames (data only), locate()."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from msssl_factory import write_collection
from prvr.data.layout import (CollectionPaths, DataError, locate, parse_video2frames_text,
                              read_captions, read_ids, read_shape, read_video2frames,
                              split_video_ids)


def _settings(tmp_path: Path, dataset: str = "toy", collection: str = "toy", feature: str = "toyfeat"):
    return {"dataset": dataset, "collection": collection, "feature": feature,
            "data_root": str(tmp_path / "root")}


def test_collection_paths_follow_the_msssl_layout(tmp_path):
    p = CollectionPaths(tmp_path / "tvr", "tvr", "i3d_resnet")
    assert p.caption_file("train") == tmp_path / "tvr/TextData/tvrtrain.caption.txt"
    assert p.caption_files["test"] == tmp_path / "tvr/TextData/tvrtest.caption.txt"
    assert p.query_feat_file == tmp_path / "tvr/TextData/roberta_tvr_query_feat.hdf5"
    assert p.feature_file == tmp_path / "tvr/FeatureData/i3d_resnet/feature.bin"
    assert p.video2frames_file == tmp_path / "tvr/FeatureData/i3d_resnet/video2frames.txt"
    assert p.shape_file.name == "shape.txt" and p.id_file.name == "id.txt"


def test_read_captions_video_ids_and_order(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("castle_s01e02_seg02_clip_09#enc#0 Beckett walks in.\n"
                 "\n"
                 "vidB#1\tText with\ttabs  \n"
                 "castle_s01e02_seg02_clip_09#enc#1 another one\n", encoding="utf-8")
    caps = read_captions(f)
    assert caps == [("castle_s01e02_seg02_clip_09#enc#0", "castle_s01e02_seg02_clip_09", "Beckett walks in."),
                    ("vidB#1", "vidB", "Text with\ttabs"),
                    ("castle_s01e02_seg02_clip_09#enc#1", "castle_s01e02_seg02_clip_09", "another one")]
    assert split_video_ids(caps) == ["castle_s01e02_seg02_clip_09", "vidB"]
    # only \n, \r\n and \r end lines; U+0085 / U+2028 inside a caption do not
    f.write_text("v#0 caf\u00e9 \u2028 text\u0085 more\r\nv#1 two\rw#0 three", encoding="utf-8")
    assert [c[0] for c in read_captions(f)] == ["v#0", "v#1", "w#0"]


@pytest.mark.parametrize("line, what", [("lonely_id_without_text", "has no text"),
                                        ("#enc#0 text", "empty video id")])
def test_read_captions_bad_line_names_file_and_line(tmp_path, line, what):
    f = tmp_path / "c.txt"
    f.write_text(f"v#0 fine\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_captions(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:2:") and what in msg and "\n" not in msg


def test_read_shape_and_ids(tmp_path):
    s = tmp_path / "shape.txt"
    s.write_text("3 4\n")
    assert read_shape(s) == (3, 4)
    for bad in ("3\n", "3 x\n", "-1 4\n", "", "3 0\n"):
        s.write_text(bad)
        with pytest.raises(DataError, match=str(s)):
            read_shape(s)
    i = tmp_path / "id.txt"
    i.write_bytes(b"a_1 a_2\nb\xe91\r\n\tc ")
    assert read_ids(i) == ["a_1", "a_2", "b\u00e91", "c"]
    with pytest.raises(DataError, match="not found"):
        read_ids(tmp_path / "nope.txt")


def test_video2frames_accepts_python_dict_literals(tmp_path):
    text = ("{'v1': ['v1_1', 'v1_2'], \"v'2\": [\"x'y\", 'a\\\\b'],\n 'v3': [],\n"
            " 'v4': ['f', ],}\n")
    mapping, dups = parse_video2frames_text(text)
    assert mapping == {"v1": ["v1_1", "v1_2"], "v'2": ["x'y", "a\\b"], "v3": [], "v4": ["f"]}
    assert dups == []
    assert parse_video2frames_text("  {}  ")[0] == {}
    mapping, dups = parse_video2frames_text("{'a': ['1'], 'a': ['2']}")
    assert mapping == {"a": ["2"]} and dups == ["a"]
    f = tmp_path / "video2frames.txt"
    f.write_text(repr({"x": ["x_0", "x_1"]}), encoding="iso-8859-1")
    assert read_video2frames(f) == {"x": ["x_0", "x_1"]}


@pytest.mark.parametrize("text", [
    "{'a': __import__('os').system('touch {marker}')}",
    "{'a': [__import__('os').system('touch {marker}')]}",
    "{'a': ['x'] + [open('{marker}', 'w').write('x')]}",
    "__import__('os').system('touch {marker}')",
    "{'a': [str(open('{marker}', 'w'))]}",
    "{'a': os.path}", "{'a': ['x'].pop()}", "{k: [] for k in 'ab'}", "{'a': ('x',)}", "{'a': [1]}",
    "{1: ['x']}", "{'a': [b'x']}", "{'a': [f'{{x}}']}", "{'a': ['x' 'y']}", "{'a': [['x']]}",
    "{'a': ['x']} # trailing", "{'a': ['x']", "['x']", "",
])
def test_video2frames_rejects_code_and_runs_nothing(tmp_path, text):
    marker = tmp_path / "pwned"
    f = tmp_path / "video2frames.txt"
    f.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_video2frames(f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_video2frames_is_fast_on_a_tvr_sized_file(tmp_path):
    # ~20k videos and ~1.5M frame ids, as TVR; the strict scanner must stay well under the
    # release's eval (about 3x faster than ast.literal_eval here).
    mapping = {f"show_s01e02_seg02_clip_{v:05d}": [f"show_s01e02_seg02_clip_{v:05d}_{i}" for i in range(75)]
               for v in range(20000)}
    f = tmp_path / "video2frames.txt"
    f.write_text(repr(mapping), encoding="iso-8859-1")
    t0 = time.perf_counter()
    got = read_video2frames(f)
    elapsed = time.perf_counter() - t0
    assert got == mapping
    assert elapsed < 15.0


def test_locate_default_source_json_and_stale_source(tmp_path):
    s = _settings(tmp_path)
    with pytest.raises(DataError, match="run the fetch stage") as err:
        locate(s, tmp_path / "data")
    assert str(tmp_path / "root" / "toy") in str(err.value)
    paths = write_collection(tmp_path / "root")
    assert locate(s, tmp_path / "data").collection_dir == paths.collection_dir

    elsewhere = write_collection(tmp_path / "elsewhere")
    src = tmp_path / "data" / "toy" / "source.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps({"dataset": "toy", "collection": "toy", "feature": "toyfeat",
                               "collection_dir": str(elsewhere.collection_dir)}))
    assert locate(s, tmp_path / "data").collection_dir == elsewhere.collection_dir

    src.write_text(json.dumps({"dataset": "toy", "collection": "toy", "feature": "other",
                               "collection_dir": str(elsewhere.collection_dir)}))
    with pytest.raises(DataError, match="run the fetch stage again"):
        locate(s, tmp_path / "data")
    src.write_text("{not json")
    with pytest.raises(DataError, match="source.json: not valid JSON"):
        locate(s, tmp_path / "data")

    src.unlink()
    elsewhere.video2frames_file.unlink()
    paths.video2frames_file.unlink()
    with pytest.raises(DataError, match="missing FeatureData/toyfeat/video2frames.txt"):
        locate(s, tmp_path / "data")


def test_locate_demo_defaults_to_the_generated_corpus(tmp_path):
    s = _settings(tmp_path, dataset="demo", collection="demo", feature="demo_feats")
    paths = locate(s, tmp_path / "data", must_exist=False)
    assert paths.collection_dir == (tmp_path / "data" / "demo" / "corpus" / "demo").absolute()


def test_locate_finds_a_generated_corpus_next_to_its_source_json(tmp_path):
    # A workspace copied elsewhere (dvc exp run --temp) keeps the absolute path of the workspace
    # that generated it in source.json; locate must use its own copy.
    s = _settings(tmp_path, dataset="mini", collection="toy")
    s["generator"] = {"preset": "demo", "seed": 1}
    data = tmp_path / "moved" / "data"
    local = write_collection(data / "mini" / "corpus")
    (data / "mini" / "source.json").write_text(json.dumps({
        "dataset": "mini", "collection": "toy", "feature": "toyfeat", "origin": "generated",
        "collection_dir": str(tmp_path / "gone" / "data" / "mini" / "corpus" / "toy")}))
    assert locate(s, data).collection_dir == local.collection_dir.absolute()
