"""The search pipeline: the moment metrics on hand-computed cases, the ground-truth files (the
demo's opt-in rows file, TVR's annotations joined by video and caption text), the `search`
settings section (checked, outside the training fingerprint and the train stage), the dvc.yaml
stages `index` and `search_eval`, and the two stages end to end on the tiny demo with a random
model, bad input included (one-line error, non-zero exit, nothing written)."""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, TINY_SCALE, edit_params, make_workdir, run
from prvr.config import ConfigError, load_params, load_settings, search_settings
from prvr.search.moments import chance_iou, moment_metrics, read_ground_truth, temporal_iou

MOMENTS_FILE = "demotest.moments.jsonl"


# ----------------------------------------------------------------------------- moment metrics

def test_temporal_iou_is_elementwise_and_zero_without_overlap():
    got = temporal_iou(np.array([0, 0, 3, 2]), np.array([4, 4, 5, 2]), np.array([2, 4, 0, 2]), np.array([6, 8, 10, 2]))
    # [0,4) vs [2,6): 2/6; touching spans: 0; [3,5) inside [0,10): 2/10; two empty spans: 0
    np.testing.assert_allclose(got, [2 / 6, 0.0, 0.2, 0.0])


def test_chance_iou_is_the_mean_over_every_start_of_a_same_length_span():
    # one row in a 2-row video, truth [0, 1): starts 0, 1 -> IoU 1, 0;
    # 3 rows in a 5-row video, truth [1, 3): starts 0, 1, 2 -> 2/3, 2/3, 1/4;
    # a span longer than its video is clipped to the video: one start, IoU 3/3 with truth [0, 3)
    got = chance_iou(np.array([1, 3, 9]), np.array([2, 5, 3]), np.array([0, 1, 0]), np.array([1, 3, 3]))
    np.testing.assert_allclose(got, [0.5, (2 / 3 + 2 / 3 + 1 / 4) / 3, 1.0])


def _hit(video: str, start: int, end: int) -> dict:
    return {"video_id": video, "score": 0.0, "moment": {"start_feature": start, "end_feature": end}}


def test_moment_recall_counts_the_right_video_within_k_at_each_iou():
    truth = {"a#enc#0": ("a", 0, 4), "b#enc#0": ("b", 2, 6), "c#enc#0": ("c", 0, 10)}
    others = [_hit(f"x{i}", 0, 4) for i in range(9)]
    results = [
        {"query_id": "a#enc#0", "hits": [_hit("a", 0, 4)] + others},             # rank 1, IoU 1
        {"query_id": "b#enc#0", "hits": others[:6] + [_hit("b", 0, 4)] + others[6:]},  # rank 7, IoU 2/6
        {"query_id": "c#enc#0", "hits": others + [_hit("c", 0, 5)]},              # rank 10, IoU 0.5
        {"query_id": "no-truth#enc#0", "hits": [_hit("a", 0, 4)]},                # not counted
    ]
    own = {"a#enc#0": (0, 4), "b#enc#0": (0, 4), "c#enc#0": (0, 5)}
    m = moment_metrics(results, truth, own, {"a": 8, "b": 8, "c": 10})
    assert m["moment_queries"] == 3
    assert m["r1_iou0.3"] == pytest.approx(100 / 3) and m["r5_iou0.3"] == pytest.approx(100 / 3)
    assert m["r10_iou0.3"] == pytest.approx(100.0)
    assert m["r10_iou0.5"] == pytest.approx(200 / 3)          # IoU 0.5 exactly counts at 0.5
    assert m["r10_iou0.7"] == pytest.approx(100 / 3)
    assert m["iou_right_video"] == pytest.approx((1 + 2 / 6 + 0.5) / 3)
    chance = chance_iou(np.array([4, 4, 5]), np.array([8, 8, 10]), np.array([0, 2, 0]), np.array([4, 6, 10]))
    assert m["iou_chance"] == pytest.approx(chance.mean())


def test_moment_metrics_without_ground_truth_report_no_recall():
    m = moment_metrics([{"query_id": "q", "hits": [_hit("a", 0, 1)]}], {}, {}, {"a": 3})
    assert m == {"moment_queries": 0.0}


# ----------------------------------------------------------------------------- ground-truth files

def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_rows_file_reads_as_is_and_a_bad_line_names_file_and_line(tmp_path):
    good = _jsonl(tmp_path / "m.jsonl", [{"query_id": "v#enc#0", "video_id": "v", "start_feature": 2, "end_feature": 5}])
    truth, info = read_ground_truth(good)
    assert truth == {"v#enc#0": ("v", 2, 5)} and info["matched"] == 1
    cases = [
        ('{"query_id": "v#enc#0", "video_id": "v", "start_feature": 2, "end_feature": 5}\n{not json',
         r"m.jsonl: line 2 is not JSON"),
        ('{"query_id": "v#enc#0", "video_id": "v", "start_feature": 5, "end_feature": 5}',
         r"m.jsonl: line 1: start_feature 5, end_feature 5: expected integers 0 <= start < end"),
        ('{"query_id": "v#enc#0", "start_feature": 0, "end_feature": 5}', r"m.jsonl: line 1 lacks video_id"),
        ('[1, 2]', r"m.jsonl: line 1 is not a JSON object"),
        ('', r"m.jsonl: no annotations"),
    ]
    for text, message in cases:
        (tmp_path / "m.jsonl").write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_ground_truth(tmp_path / "m.jsonl")


VID = "friends_s01e01_seg02_clip_00"


def test_tvr_annotations_join_ms_sl_caption_ids_by_video_and_text(tmp_path):
    # TVR's tvr_val_release.jsonl format (desc_id, desc, type, vid_name, ts, duration)
    path = _jsonl(tmp_path / "tvr_val_release.jsonl", [
        {"desc_id": 1, "desc": "Ross opens the door.", "type": "v", "vid_name": VID, "ts": [3.0, 6.0], "duration": 12.0},
        {"desc_id": 2, "desc": "Monica   laughs at Chandler's joke", "type": "vt", "vid_name": VID,
         "ts": [10.5, 14.0], "duration": 12.0},                                   # ends after the video
        {"desc_id": 3, "desc": "Nobody says this.", "type": "v", "vid_name": VID, "ts": [0.0, 1.0], "duration": 12.0},
        {"desc_id": 4, "desc": "Joey eats.", "type": "v", "vid_name": "not_indexed", "ts": [0, 1], "duration": 5.0},
    ])
    texts = {f"{VID}#enc#0": "ross opens the door", f"{VID}#enc#1": "Monica laughs at Chandler's joke.",
             f"{VID}#enc#2": "Ross opens the door .", f"{VID}#enc#3": "Phoebe sings",
             "other#enc#0": "Joey eats."}
    truth, info = read_ground_truth(path, texts, {VID: 24})
    # 24 rows over 12 s: [3, 6) s -> rows [6, 12); [10.5, 14) s -> [21, 24), clipped to the video;
    # the same text twice in one video: both caption ids get the moment
    assert truth == {f"{VID}#enc#0": (VID, 6, 12), f"{VID}#enc#2": (VID, 6, 12), f"{VID}#enc#1": (VID, 21, 24)}
    assert info == {"annotations": 4, "matched": 3, "unmatched_annotations": 2, "captions": 5, "format": "tvr"}


def test_a_bad_tvr_annotation_names_file_and_line(tmp_path):
    ok = {"desc": "a", "vid_name": VID, "ts": [1.0, 2.0], "duration": 12.0}
    for bad, message in [({**ok, "ts": [3.0, 2.0]}, r"line 2: ts \[3.0, 2.0\], duration 12.0: expected"),
                         ({k: v for k, v in ok.items() if k != "ts"}, r"line 2: expected vid_name, desc, ts"),
                         ({**ok, "duration": 0}, r"line 2: .* expected 0 <= start <= end and duration > 0")]:
        path = _jsonl(tmp_path / "tvr.jsonl", [ok, bad])
        with pytest.raises(ValueError, match=r"tvr.jsonl: " + message):
            read_ground_truth(path, {f"{VID}#enc#0": "a"}, {VID: 24})


# ----------------------------------------------------------------------------- the demo's opt-in file

def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    from prvr.data.demo import generate_corpus

    plain = tmp_path_factory.mktemp("plain")
    with_moments = tmp_path_factory.mktemp("moments")
    generate_corpus(plain, preset="demo", seed=7, scale=TINY_SCALE, progress=False)
    generate_corpus(with_moments, preset="demo", seed=7, scale=TINY_SCALE, progress=False, moments=True)
    return plain, with_moments


def test_the_moments_file_is_opt_in_and_changes_no_other_byte(corpora):
    plain, with_moments = (_digests(c / "demo") for c in corpora)
    assert MOMENTS_FILE not in plain
    assert {k: v for k, v in with_moments.items() if k != MOMENTS_FILE} == plain


def test_the_demo_moments_cover_every_test_caption_inside_its_video(corpora):
    from prvr.data.datasets import Corpus

    folder = corpora[1] / "demo"
    truth, info = read_ground_truth(folder / MOMENTS_FILE)
    corpus = Corpus(folder, "demo_feats")
    split = corpus.split("test")
    assert sorted(truth) == sorted(split.query_ids) and info["format"] == "rows"
    for qid, (vid, start, end) in truth.items():
        assert qid.split("#", 1)[0] == vid and 0 <= start < end <= corpus.features.num_frames(vid)


def test_the_fetch_stage_passes_the_moments_option_to_the_generator_only_when_set(tmp_path):
    from prvr.data.fetch import fetch

    calls = []

    def generate(out_dir, **kwargs):
        calls.append(kwargs)
        (Path(out_dir) / "demo").mkdir(parents=True, exist_ok=True)
        return Path(out_dir) / "demo"

    base = load_settings(REPO / "params.yaml", "demo", "gmmformer_v2")
    for generator in ({"preset": "demo", "seed": 7}, {"preset": "demo", "seed": 7, "moments": True}):
        fetch({**base, "generator": generator}, tmp_path / "data", progress=False, generate=generate)
    assert "moments" not in calls[0] and calls[1]["moments"] is True
    assert search_settings(load_params(REPO / "params.yaml"))["datasets"]["demo"]["moments_file"] == MOMENTS_FILE


# ----------------------------------------------------------------------------- settings and dvc.yaml

def test_search_settings_stay_out_of_the_training_fingerprint_and_the_train_stage(tmp_path):
    from prvr.training import fingerprint

    params = load_params(REPO / "params.yaml")
    changed = copy.deepcopy(params)
    changed["search"].update({"split": "val", "k": 3, "block_videos": 7})
    changed["search"]["stage1"].update({"kind": "hnsw", "candidates": 11})
    changed["search"]["datasets"]["demo"] = {"feature_stride_s": 1.5, "moments_file": "x.jsonl"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(changed), encoding="utf-8")
    source = {"origin": "generated", "collection_dir": "/x"}
    for method in ("gmmformer_v2", "msssl", "meanpool"):
        a = load_settings(REPO / "params.yaml", "demo", method)
        b = load_settings(path, "demo", method)
        assert a == b and fingerprint(a, source) == fingerprint(b, source)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name in ("fetch", "validate", "train", "evaluate"):
        assert not any(str(p).split(".")[0] == "search" for p in stages[name].get("params", [])), name
        assert not any("search" in str(d) or "stages/index.py" in str(d) for d in stages[name]["deps"]), name


def test_the_index_and_search_eval_stages_run_after_train_and_feed_the_report():
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    stages = doc["stages"]
    index, ev = stages["index"], stages["search_eval"]
    assert "runs/${dataset}/${model.name}/checkpoints/best.pt" in index["deps"]
    assert set(index["params"]) == {"dataset", "model", "search", "datasets.${dataset}"}
    assert [next(iter(o)) for o in index["outs"]] == ["runs/${dataset}/${model.name}/index"]
    assert "runs/${dataset}/${model.name}/index" in ev["deps"]
    assert set(ev["params"]) == {"dataset", "data_root", "model", "search"}
    assert [next(iter(o)) for o in ev["outs"]] == ["metrics/${dataset}/${model.name}/search.json"]
    assert "metrics/${dataset}/${model.name}/search.json" in doc["metrics"]
    assert "metrics/${dataset}/${model.name}/search.json" in stages["report"]["deps"]


@pytest.mark.parametrize("dotted, value, message", [
    ("k", 0, r"params.yaml: search.k 0: out of range"),
    ("spilt", "test", r"params.yaml: search.spilt: unknown key"),
    ("stage1.knd", "flat", r"params.yaml: search.stage1.knd: unknown key"),
    ("datasets.demo.stride", 1.0, r"params.yaml: search.datasets.demo.stride: unknown key"),
    ("datasets.demo.feature_stride_s", "1.5", r"params.yaml: search.datasets.demo.feature_stride_s '1.5': expected float"),
])
def test_a_bad_search_setting_is_a_one_line_error_naming_the_key(dotted, value, message):
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    node = params["search"]
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError, match=message) as err:
        search_settings(params)
    assert "\n" not in str(err.value)


def test_no_stride_is_guessed():
    # seconds only where a dataset documents its feature stride (none of the MS-SL releases does)
    facts = search_settings(load_params(REPO / "params.yaml"))["datasets"]
    assert set(facts) >= {"demo", "tvr", "act", "cha"}
    assert {ds: f.get("feature_stride_s") for ds, f in facts.items()} == {ds: None for ds in facts}


def test_search_eval_spreads_its_queries_over_the_split():
    sys.path.insert(0, str(REPO / "stages"))
    try:
        from search_eval import spread
    finally:
        sys.path.remove(str(REPO / "stages"))
    ids = [f"v{i // 3}#enc#{i % 3}" for i in range(12)]
    assert spread(ids, 4) == ["v0#enc#0", "v1#enc#0", "v2#enc#0", "v3#enc#0"]
    assert spread(ids, 0) == ids == spread(ids, 99)
    assert spread(ids, 5) == [ids[0], ids[2], ids[4], ids[7], ids[9]]


# ----------------------------------------------------------------------------- the stages end to end

@pytest.fixture(scope="module")
def work(tmp_path_factory, corpora) -> Path:
    """A work folder on the tiny demo (with its moments file) holding a random GMMFormer v2 as
    the best checkpoint of demo / gmmformer_v2."""
    from prvr.checkpoint import save_checkpoint
    from prvr.methods import build_config, create_model

    w = make_workdir(tmp_path_factory.mktemp("stages") / "work", corpora[1])
    edit_params(w / "params.yaml", **{"search.datasets.demo.moments_file": MOMENTS_FILE, "search.k": 5})
    s = load_settings(w / "params.yaml", "demo", "gmmformer_v2")
    torch.manual_seed(0)
    best = w / "runs" / "demo" / "gmmformer_v2" / "checkpoints" / "best.pt"
    best.parent.mkdir(parents=True)
    save_checkpoint(best, create_model("gmmformer_v2", build_config(s)), "gmmformer_v2", settings=s)
    return w


def _stage(name: str, *args: str, cwd: Path, check: bool = True):
    return run([sys.executable, str(REPO / "stages" / f"{name}.py"), "--no-progress", *args], cwd=cwd, check=check)


def test_the_stages_index_the_best_checkpoint_and_write_the_search_metrics(work):
    proc = _stage("index", cwd=work)
    folder = work / "runs" / "demo" / "gmmformer_v2" / "index"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["split"] == "test" and manifest["method"] == "gmmformer_v2"
    assert Path(manifest["checkpoint"]) == (folder.parent / "checkpoints" / "best.pt").resolve()
    assert f"wrote {Path('runs/demo/gmmformer_v2/index')}" in proc.stderr and "read params.yaml" in proc.stderr

    proc = _stage("search_eval", "--no-mlflow", cwd=work)
    got = json.loads((work / "metrics" / "demo" / "gmmformer_v2" / "search.json").read_text())
    n_queries = len(read_ground_truth(work / "data/demo/corpus/demo" / MOMENTS_FILE)[0])
    assert got["k"] == 5 and got["queries"] == n_queries == got["moment_queries"] == got["moment_matched"]
    assert 0.8 <= got["recall_at_5"] <= 1 and 0.8 <= got["top1_agreement"] <= 1
    assert got["top1_score_max_abs_diff"] < 1e-5
    assert 0 < got["latency_p50_ms"] <= got["latency_p99_ms"]
    assert got["n_videos"] == manifest["n_videos"] and got["bytes_per_video"] == manifest["bytes_per_video"] > 0
    assert got["build_s"] == manifest["build_s"] > 0 and got["threads"] >= 1
    assert got["moment_file"] == MOMENTS_FILE
    for t in ("0.3", "0.5", "0.7"):       # recall grows with k
        assert 0 <= got[f"r1_iou{t}"] <= got[f"r5_iou{t}"] <= got[f"r10_iou{t}"] <= 100
    for k in (1, 5, 10):                  # and shrinks with the IoU threshold
        assert got[f"r{k}_iou0.3"] >= got[f"r{k}_iou0.5"] >= got[f"r{k}_iou0.7"]
    assert 0 <= got["iou_right_video"] <= 1 and 0 < got["iou_chance"] < 1
    assert "wrote metrics/demo/gmmformer_v2/search.json" in proc.stderr


@pytest.fixture(scope="module")
def meanpool_index(work, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, index folder): a random meanpool checkpoint indexed by the index stage with
    --checkpoint and no --out, while model.name stays gmmformer_v2."""
    from prvr.checkpoint import save_checkpoint
    from prvr.methods import build_config, create_model

    s = load_settings(work / "params.yaml", "demo", "meanpool")
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("meanpool") / "meanpool.pt"
    save_checkpoint(ckpt, create_model("meanpool", build_config(s)), "meanpool", settings=s)
    _stage("index", "--checkpoint", str(ckpt), cwd=work)
    return ckpt, work / "runs" / "demo" / "meanpool" / "index"


def test_a_checkpoint_of_another_method_is_indexed_under_its_own_method(meanpool_index):
    ckpt, folder = meanpool_index
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["method"] == "meanpool" and manifest["checkpoint"] == str(ckpt.resolve())


def test_search_eval_writes_under_the_method_the_index_holds(work, meanpool_index):
    folder = meanpool_index[1]
    _stage("search_eval", "--no-mlflow", "--index", str(folder), cwd=work)     # model.name stays gmmformer_v2
    got = json.loads((work / "metrics" / "demo" / "meanpool" / "search.json").read_text())
    assert got["n_videos"] == json.loads((folder / "manifest.json").read_text())["n_videos"]


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_bad_input_to_the_index_stage_is_one_line_and_writes_nothing(work):
    proc = _stage("index", "--checkpoint", "missing.pt", "--out", "idx_missing", cwd=work, check=False)
    assert proc.returncode == 1 and _last_line(proc).startswith("index: error:") and "missing.pt" in _last_line(proc)
    proc = _stage("index", "--split", "nope", "--out", "idx_nope", cwd=work, check=False)
    assert proc.returncode == 1 and _last_line(proc).startswith("index: error:") and "nope" in _last_line(proc)
    assert not (work / "idx_missing").exists() and not (work / "idx_nope").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".idx_")]


def test_bad_input_to_search_eval_is_one_line_and_keeps_the_old_metrics(work, tmp_path):
    folder = work / "runs" / "demo" / "gmmformer_v2" / "index"
    if not (folder / "manifest.json").is_file():
        _stage("index", cwd=work)
    out = tmp_path / "search.json"
    out.write_text('{"old": 1}')
    # a corrupt moments file: named with its line, and the old metrics stay
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bad = _jsonl(tmp_path / "bad.jsonl", ['{"query_id": "x#enc#0", "video_id": "x", "start_feature": 3, '
                                         '"end_feature": 1}'])
    params = tmp_path / "params.yaml"
    params.write_text((work / "params.yaml").read_text())
    edit_params(params, **{"search.datasets.demo.moments_file": str(bad)})
    proc = _stage("search_eval", "--no-mlflow", "--params", str(params), "--out", str(out), cwd=work, check=False)
    assert proc.returncode == 1 and _last_line(proc).startswith("search_eval: error:")
    assert f"{bad}: line 1" in _last_line(proc)
    # an index folder that is not one
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "manifest.json").write_text("{trunc")
    proc = _stage("search_eval", "--no-mlflow", "--index", str(tmp_path / "idx"), "--out", str(out), cwd=work,
                  check=False)
    assert proc.returncode == 1 and _last_line(proc).startswith("search_eval: error:")
    assert "manifest.json" in _last_line(proc)
    assert out.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl", "corpus", "idx", "params.yaml", "search.json"]


def test_search_eval_joins_tvr_format_annotations_to_the_same_moment_metrics(work, tmp_path):
    """The demo's moments rewritten as TVR annotations (seconds at 0.5 s a row, captions by
    text, one annotation for a video outside the index) give the rows file's metrics."""
    from prvr.data.datasets import Corpus

    a = _search_json(work)                   # the rows file's metrics
    tvr_out = tmp_path / "tvr.json"
    collection = work / "data/demo/corpus/demo"
    truth, _ = read_ground_truth(collection / MOMENTS_FILE)
    corpus = Corpus(collection, "demo_feats")
    split = corpus.split("test")
    annotations = [{"desc_id": i, "desc": text.upper() + ".", "type": "v", "vid_name": truth[qid][0],
                    "ts": [truth[qid][1] * 0.5, truth[qid][2] * 0.5],
                    "duration": corpus.features.num_frames(truth[qid][0]) * 0.5}
                   for i, (qid, text) in enumerate(zip(split.query_ids, split.texts))]
    annotations.append({"desc_id": -1, "desc": "x", "type": "v", "vid_name": "elsewhere", "ts": [0, 1], "duration": 2})
    tvr = _jsonl(tmp_path / "tvr_val_release.jsonl", annotations)
    params = tmp_path / "params.yaml"
    params.write_text((work / "params.yaml").read_text())
    edit_params(params, **{"search.datasets.demo.moments_file": str(tvr)})
    _stage("search_eval", "--no-mlflow", "--params", str(params), "--out", str(tvr_out), cwd=work)
    b = json.loads(tvr_out.read_text())
    assert b["moment_annotations"] == len(annotations) and b["moment_unmatched_annotations"] == 1
    # every (video, text) pair is unique in this corpus, so each caption gets its own moment back
    texts = [(q.split("#", 1)[0], t.lower()) for q, t in zip(split.query_ids, split.texts)]
    assert len(set(texts)) == len(texts)
    assert b["moment_matched"] == a["moment_matched"] == len(split.query_ids)
    for key in [k for k in a if k.startswith("r") and "_iou" in k] + ["iou_right_video", "iou_chance"]:
        assert b[key] == pytest.approx(a[key]), key


def _search_json(work: Path) -> dict:
    out = work / "metrics" / "demo" / "gmmformer_v2" / "search.json"
    if not out.is_file():
        _stage("index", cwd=work)
        _stage("search_eval", "--no-mlflow", cwd=work)
    return json.loads(out.read_text())


def test_the_report_shows_the_search_and_moment_figures_of_search_json(work):
    from prvr.report import MethodResult, render_markdown

    s = _search_json(work)
    test = {"r1": 1.0, "r5": 5.0, "r10": 10.0, "r100": 90.0, "sumr": 106.0, "n_queries": 59, "n_videos": 15,
            "split": "test"}
    text = render_markdown("demo", [MethodResult("gmmformer_v2", "GMMFormer v2", test, {"best_epoch": 1}, search=s)],
                           None, {"curves": "c.png", "recall": "r.png"})
    lines = text.splitlines()
    row = next(ln for ln in lines[lines.index("## Search"):] if ln.startswith("| GMMFormer v2 |"))
    assert f"{s['recall_at_5']:.3f} (k=5)" in row and f"{s['top1_agreement']:.3f}" in row
    moments = [ln for ln in lines if ln.startswith("| GMMFormer v2 |")][-1]
    assert moments != row and f"{s['iou_chance']:.3f}" in moments and f"{s['iou_right_video']:.3f}" in moments
    assert "Search" not in render_markdown("demo", [MethodResult("gmmformer_v2", "GMMFormer v2", test, {})], None,
                                           {"curves": "c.png", "recall": "r.png"})


def test_search_eval_logs_its_figures_on_the_training_s_mlflow_run(work, tmp_path):
    from prvr.tracking import Tracker

    _search_json(work)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    tracker = Tracker("demo", tracking_uri=uri, root=tmp_path)
    run_id = tracker.start(run_name="gmmformer_v2-demo")
    assert run_id
    run_json = work / "runs" / "demo" / "gmmformer_v2" / "run.json"
    run_json.write_text(json.dumps({"mlflow_run_id": run_id}))
    try:
        out = tmp_path / "search.json"
        run([sys.executable, str(REPO / "stages" / "search_eval.py"), "--no-progress", "--out", str(out)], cwd=work,
            MLFLOW_TRACKING_URI=uri)
        got = json.loads(out.read_text())
        metrics = tracker.client().get_run(run_id).data.metrics
    finally:
        run_json.unlink()
    assert metrics["search_recall_at_5"] == pytest.approx(got["recall_at_5"])
    assert metrics["search_latency_p50_ms"] == pytest.approx(got["latency_p50_ms"])
    assert metrics["search_r10_iou0.5"] == pytest.approx(got["r10_iou0.5"])

