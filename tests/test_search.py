"""Search (prvr.search, the prvr command, stages/index.py and stages/search_eval.py): every method's
hits carry evaluate's scores and the method's moment, stage 1 keeps exhaustive scoring's top k,
the index folder is atomic and tied to its checkpoint, and the moment metrics are right on hand
cases (docs/search.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_SCALE, make_workdir, run
from prvr.checkpoint import save_checkpoint
from prvr.config import load_params, load_settings, settings_hash
from prvr.methods import build_config, create_model
from prvr.methods.base import clip_rows
from prvr.search import SearchError, build_index, open_index
from prvr.search.index import candidate_videos
from prvr.search.moments import chance_iou, moment_metrics, read_ground_truth, temporal_iou

METHODS = ("gmmformer_v2", "gmmformer_v1", "msssl", "meanpool", "holmes", "ral", "holmes_dq")


@pytest.fixture(scope="module")
def moment_corpus(tmp_path_factory) -> Path:
    from prvr.data.demo import generate_corpus

    root = tmp_path_factory.mktemp("search_corpus")
    generate_corpus(root, preset="demo", seed=7, scale=TINY_SCALE, progress=False, moments=True)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory, moment_corpus) -> Path:
    w = make_workdir(tmp_path_factory.mktemp("search") / "work", moment_corpus)
    from conftest import edit_params

    edit_params(w / "params.yaml", **{"search.datasets.demo.feature_stride_s": 0.5,
                                      "search.datasets.demo.moments_file": "demotest.moments.jsonl"})
    return w


def _ckpt(work: Path, method: str) -> Path:
    path = work / f"{method}.pt"
    if not path.exists():
        s = load_settings(work / "params.yaml", "demo", method)
        torch.manual_seed(0)
        save_checkpoint(path, create_model(method, build_config(s)), method, settings=s)
    return path


def _index(work: Path, method: str, **search) -> Path:
    params = load_params(work / "params.yaml")
    params["search"]["stage1"].update(search)
    out = work / f"index_{method}_{'_'.join(f'{k}{v}' for k, v in search.items())}"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        build_index(_ckpt(work, method), params, "demo", "test", out, progress=False)
    finally:
        os.chdir(cwd)
    return out


def _open(work: Path, folder: Path):
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return open_index(folder)
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", METHODS)
def test_hits_carry_evaluate_s_scores_and_the_top_k_of_exhaustive_scoring(method, work):
    from prvr.evaluation import default_score_fn, encode_videos, score_matrix
    from prvr.training import eval_loaders

    idx = _open(work, _index(work, method))
    split = idx.corpus.split("test")
    qids = split.query_ids[:24]
    hits = idx.search_ids(qids, 5)
    # evaluate's own path: the split's bank and the (Q, V) score matrix
    vl, _ = eval_loaders(idx.corpus, "test", 7, 16, 0, idx.manifest["model_config"])
    bank = encode_videos(idx.model, vl, "cpu", progress=False)
    q = idx.encode(idx.query_features(qids))
    full = score_matrix(q, bank, default_score_fn(idx.model), "cpu", progress=False)
    col = {v: j for j, v in enumerate(bank.video_ids)}
    n_frames = dict(zip(idx.video_ids, idx.n_frames.tolist()))
    for i, r in enumerate(hits):
        assert r["query_id"] == qids[i] and len(r["hits"]) == 5
        for h in r["hits"]:
            assert abs(h["score"] - float(full[i, col[h["video_id"]]])) <= 1e-5
            m = h["moment"]
            assert 0 <= m["start_feature"] < m["end_feature"] <= n_frames[h["video_id"]]
            assert m["start_s"] == pytest.approx(0.5 * m["start_feature"])
        # candidates cover the tiny split: the hits are exhaustive scoring's top 5
        want = set(full[i].topk(5).indices.tolist())
        assert {col[h["video_id"]] for h in r["hits"]} == want


@pytest.mark.parametrize("method", ("gmmformer_v2", "gmmformer_v1"))
def test_the_rerank_block_is_evaluation_s_block_of_the_same_videos(method, work):
    # the rerank gathers its candidates straight from the memory maps; it must lay them out
    # exactly as evaluation's VideoBank.block does (same padding, same mask), or the score moves
    from prvr.evaluation import VideoBank

    idx = _open(work, _index(work, method))
    rows = np.array([0, 3, 4, len(idx.video_ids) - 1])
    got = idx._videos(rows)
    fixed = {k: torch.from_numpy(np.array(a[rows])) for k, a in idx.fixed.items()}
    if idx.seq is None:
        assert got.seq is None
        want = VideoBank([idx.video_ids[i] for i in rows], fixed).block(0, len(rows))
    else:
        lo, hi = idx.offsets[rows], idx.offsets[rows + 1]
        seq = torch.from_numpy(np.concatenate([np.array(idx.seq[a:b]) for a, b in zip(lo, hi)]))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64))
        want = VideoBank([idx.video_ids[i] for i in rows], fixed, seq, offsets).block(0, len(rows))
        assert torch.equal(got.seq_mask, want.seq_mask) and torch.equal(got.seq, want.seq)
        assert not got.seq[~got.seq_mask].any()
    assert got.fixed.keys() == want.fixed.keys()
    assert all(torch.equal(got.fixed[k], want.fixed[k]) for k in got.fixed)


def test_a_clip_method_s_moment_is_its_best_clip_s_rows(work):
    idx = _open(work, _index(work, "gmmformer_v2"))
    qid = idx.corpus.split("test").query_ids[0]
    hit = idx.search_ids([qid], 1)[0]["hits"][0]
    row = idx.video_ids.index(hit["video_id"])
    clips = torch.from_numpy(np.array(idx.fixed["clips"][row]))
    q = torch.nn.functional.normalize(idx.encode(idx.query_features([qid])), dim=-1)
    best = int((torch.nn.functional.normalize(clips, dim=-1) @ q[0]).argmax())
    start, end = clip_rows(torch.tensor(best), torch.tensor(best), torch.tensor(int(idx.n_frames[row])), 32)
    assert (hit["moment"]["start_feature"], hit["moment"]["end_feature"]) == (int(start), int(end))


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_stage_one_kinds_keep_the_exhaustive_top_hit(kind, work):
    idx = _open(work, _index(work, "gmmformer_v2", kind=kind, candidates=6))   # fewer than the videos
    assert idx.manifest["stage1"]["kind"] == kind and idx.candidates < idx.manifest["n_videos"]
    qids = idx.corpus.split("test").query_ids[:20]
    q = idx.encode(idx.query_features(qids))
    _, rows = idx.exhaustive(q, 1)
    got = idx.search_encoded(q, 1)
    agree = np.mean([idx.video_ids.index(h[0]["video_id"]) == int(rows[i, 0]) for i, h in enumerate(got)])
    assert agree >= 0.9


def test_candidate_videos_keep_each_video_s_best_vector_in_rank_order():
    vec_video = np.array([0, 0, 1, 1, 2, 2, 3])
    ids = np.array([[1, 0, 3, 6, 2, -1], [6, 5, 4, 3, -1, -1]])
    got = candidate_videos(np.zeros(ids.shape), ids, vec_video, 3)
    assert got.tolist() == [[0, 1, 3], [3, 2, 1]]
    assert candidate_videos(np.zeros((1, 2)), np.array([[0, -1]]), vec_video, 3).tolist() == [[0, -1, -1]]


# ----------------------------------------------------------------------------- the folder

def test_the_manifest_records_what_built_the_index(work):
    folder = _index(work, "msssl")
    m = json.loads((folder / "manifest.json").read_text())
    assert m["method"] == "msssl" and m["dataset"] == "demo" and m["split"] == "test"
    assert Path(m["checkpoint"]) == (work / "msssl.pt").resolve() and len(m["checkpoint_sha256"]) == 64
    assert m["n_videos"] == len((folder / "video_ids.txt").read_text().split()) and m["bytes_per_video"] > 0
    assert np.load(folder / "stage1.npy").dtype == np.float16
    assert np.load(folder / "exact_clips.npy", mmap_mode="r").dtype == np.float32


def test_a_changed_checkpoint_is_refused_by_its_index(work, tmp_path):
    folder = _index(work, "meanpool")
    ckpt = work / "meanpool.pt"
    original = ckpt.read_bytes()
    try:
        save_checkpoint(ckpt, create_model("meanpool", build_config(load_settings(work / "params.yaml", "demo",
                                                                                  "meanpool"))), "meanpool")
        with pytest.raises(SearchError, match="sha256 differs") as e:
            _open(work, folder)
        assert "\n" not in str(e.value) and str(ckpt) in str(e.value)
    finally:
        ckpt.write_bytes(original)


def test_a_failed_build_leaves_no_folder(work):
    params = load_params(work / "params.yaml")
    out = work / "never"
    with pytest.raises(Exception):
        cwd = os.getcwd()
        os.chdir(work)
        try:
            build_index(_ckpt(work, "meanpool"), params, "demo", "nosuchsplit", out, progress=False)
        finally:
            os.chdir(cwd)
    assert not out.exists() and not list(work.glob(".never.*"))


def test_search_settings_are_not_training_settings(work):
    params = load_params(work / "params.yaml")
    before = settings_hash(load_settings(work / "params.yaml", "demo", "gmmformer_v2"))
    import yaml

    changed = work / "params_search.yaml"
    params["search"]["stage1"]["candidates"] = 7
    params["search"]["datasets"]["demo"]["feature_stride_s"] = 2.0
    changed.write_text(yaml.safe_dump(params))
    assert settings_hash(load_settings(changed, "demo", "gmmformer_v2")) == before
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert "search" not in train["params"]


# ----------------------------------------------------------------------------- the command and stages

def test_the_prvr_command_writes_one_json_line_per_query(work):
    _index(work, "gmmformer_v2")
    folder = work / "index_gmmformer_v2_"
    qids = _open(work, folder).corpus.split("test").query_ids[:3]
    (work / "ids.txt").write_text("\n".join(qids[1:]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-m", "prvr", "search", "--index", str(folder), "--query-id", qids[0],
                          "--query-ids-file", "ids.txt", "--k", "4", "--json"], cwd=work, env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    objs = [json.loads(x) for x in out]
    assert [o["query_id"] for o in objs] == qids
    assert all(len(o["hits"]) == 4 and set(o["hits"][0]) == {"video_id", "score", "n_features", "moment"} for o in objs)
    assert set(objs[0]["hits"][0]["moment"]) == {"start_feature", "end_feature", "start_s", "end_s"}
    bad = subprocess.run([sys.executable, "-m", "prvr", "search", "--index", str(folder), "--query-id",
                          "nope#enc#0", "--k", "4"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert "nope#enc#0" in bad.stderr


def test_index_and_search_eval_stages_write_the_search_metrics(work):
    ckpt = _ckpt(work, "gmmformer_v2")
    run([sys.executable, str(REPO / "stages/index.py"), "--checkpoint", str(ckpt), "--out", "idx_stage",
         "--no-progress"], cwd=work)
    run([sys.executable, str(REPO / "stages/search_eval.py"), "--index", "idx_stage", "--out", "search.json",
         "--no-mlflow"], cwd=work)
    got = json.loads((work / "search.json").read_text())
    assert got["recall_at_10"] == 1.0 and got["top1_agreement"] == 1.0      # candidates cover the split
    assert got["latency_p50_ms"] > 0 and got["latency_p99_ms"] >= got["latency_p50_ms"]
    assert got["moment_matched"] == got["moment_queries"] > 0
    assert 0 <= got["iou_chance"] <= 1 and 0 <= got["r10_iou0.3"] <= 100
    missing = run([sys.executable, str(REPO / "stages/search_eval.py"), "--index", "nowhere", "--no-mlflow"],
                  cwd=work, check=False)
    assert missing.returncode == 1 and "manifest.json" in missing.stderr


# ----------------------------------------------------------------------------- moment metrics

def test_temporal_iou_and_chance_on_hand_cases():
    assert temporal_iou(0, 10, 5, 15) == pytest.approx(5 / 15)
    assert temporal_iou(0, 4, 4, 8) == 0.0 and temporal_iou(2, 6, 2, 6) == 1.0
    # a 2-row span placed at each of the 3 starts of a 4-row video, ground truth rows [0, 2):
    # IoU 1, 1/3, 0 -> mean 4/9
    assert chance_iou(np.array([2]), np.array([4]), np.array([0]), np.array([2]))[0] == pytest.approx(4 / 9)


def test_moment_recall_needs_the_right_video_and_the_overlap():
    truth = {"a#enc#0": ("a", 0, 10), "b#enc#0": ("b", 5, 9)}
    hit = lambda v, s, e: {"video_id": v, "score": 0.0, "moment": {"start_feature": s, "end_feature": e}}
    results = [{"query_id": "a#enc#0", "hits": [hit("x", 0, 10), hit("a", 0, 8)]},
               {"query_id": "b#enc#0", "hits": [hit("b", 0, 2)]}]
    m = moment_metrics(results, truth, {"a#enc#0": (0, 8), "b#enc#0": (0, 2)}, {"a": 20, "b": 10})
    assert m["r1_iou0.3"] == 0.0 and m["r5_iou0.7"] == 50.0 and m["r5_iou0.3"] == 50.0
    assert m["iou_right_video"] == pytest.approx((0.8 + 0.0) / 2)


def test_tvr_annotations_join_caption_ids_by_video_and_text(tmp_path):
    path = tmp_path / "tvr_val_release.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"desc_id": 1, "desc": "Ross opens the door.", "vid_name": "friends_s01e01_seg02_clip_00",
         "ts": [3.0, 6.0], "duration": 12.0},
        {"desc_id": 2, "desc": "Nobody says this.", "vid_name": "friends_s01e01_seg02_clip_00",
         "ts": [0.0, 1.0], "duration": 12.0}]) + "\n")
    texts = {"friends_s01e01_seg02_clip_00#enc#0": "ross opens the door",
             "friends_s01e01_seg02_clip_00#enc#1": "Monica laughs"}
    truth, info = read_ground_truth(path, texts, {"friends_s01e01_seg02_clip_00": 24})
    assert truth == {"friends_s01e01_seg02_clip_00#enc#0": ("friends_s01e01_seg02_clip_00", 6, 12)}
    assert info["annotations"] == 2 and info["matched"] == 1
