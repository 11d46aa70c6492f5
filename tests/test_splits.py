"""Val/test identity and overlap, the warning sentence, and the seeded holdout validation split."""
from __future__ import annotations

import json
import random
import shutil

import pytest

from msssl_factory import TEXT_DIM, VISUAL_DIM, write_collection
from prvr.config import load_settings, settings_hash
from prvr.data.layout import read_captions
from prvr.data.splits import holdout_captions, holdout_videos, selection_warning, split_overlap

TVR_LIKE = {"val_captions": 10895, "test_captions": 10895, "shared_captions": 10895,
            "val_videos": 2179, "test_videos": 2179, "shared_videos": 2179, "identical": True}


def _caps(videos, per=2, prefix="v"):
    return [(f"{prefix}{v}#enc#{c}", f"{prefix}{v}", f"text {v} {c}") for v in videos for c in range(per)]


def test_overlap_counts_identity_by_caption_ids_and_video_ids():
    test = _caps(range(5))
    assert split_overlap(list(test), test) == {
        "val_captions": 10, "test_captions": 10, "shared_captions": 10,
        "val_videos": 5, "test_videos": 5, "shared_videos": 5, "identical": True}
    # other captions of two test videos: no shared caption id, but shared videos
    val = [(f"v{v}#other#{c}", f"v{v}", "x") for v in (1, 3) for c in range(3)] + _caps([7, 8])
    o = split_overlap(val, test)
    assert (o["shared_captions"], o["shared_videos"], o["identical"]) == (0, 2, False)
    assert (o["val_captions"], o["val_videos"]) == (10, 4)
    assert split_overlap(_caps([10, 11]), test)["shared_videos"] == 0


def test_the_warning_sentence_says_the_model_was_selected_on_the_test_split():
    s = selection_warning(TVR_LIKE)
    assert s.startswith("Warning: this model was selected on the test split")
    assert "10,895 of the 10,895 test captions" in s and "2,179 of the 2,179 test videos" in s
    assert s.count(". ") == 0 and s.endswith(".")  # one sentence
    partly = selection_warning({**TVR_LIKE, "identical": False, "shared_captions": 0,
                                "shared_videos": 3})
    assert "partly on the test split" in partly and "3 of the 2,179 test videos" in partly
    assert selection_warning(TVR_LIKE, val_split="holdout") is None
    assert selection_warning({**TVR_LIKE, "shared_captions": 0, "shared_videos": 0,
                              "identical": False}) is None
    assert selection_warning(None) is None


def test_validate_writes_the_overlap_counts_and_a_warning(tmp_path):
    from prvr.data.validate import validate_collection

    paths = write_collection(tmp_path, videos={"train": 4, "val": 2, "test": 3})
    report = validate_collection(paths, VISUAL_DIM, TEXT_DIM, progress=False)
    assert report["ok"] and report["overlap"]["shared_videos"] == 0
    assert not any("validation split" in w["message"] for w in report["problems"]["warnings"])

    shutil.copyfile(paths.caption_file("test"), paths.caption_file("val"))
    report = validate_collection(paths, VISUAL_DIM, TEXT_DIM, progress=False)
    assert report["ok"]  # a warning, not an error: the release does exactly this
    assert report["overlap"] == {"val_captions": 6, "test_captions": 6, "shared_captions": 6,
                                 "val_videos": 3, "test_videos": 3, "shared_videos": 3,
                                 "identical": True}
    msgs = [w["message"] for w in report["problems"]["warnings"] if "validation split" in w["message"]]
    assert msgs == ["TextData/toyval.caption.txt: the validation split is the test split: 6 of 6 "
                    "test captions and 3 of 3 test videos; model selection on it sees the test "
                    "split (train.val_split: holdout avoids this)"]
    json.dumps(report)  # what validation.json holds


def test_demo_generator_emits_an_identical_val_test_pair(tmp_path):
    from prvr.data.demo import generate_corpus
    from prvr.data.validate import validate_collection
    from prvr.data.layout import CollectionPaths

    folder = generate_corpus(tmp_path, "demo", seed=7, scale=0.03, progress=False, val_is_test=True)
    paths = CollectionPaths(folder, "demo", "demo_feats")
    assert paths.caption_file("val").read_bytes() == paths.caption_file("test").read_bytes()
    report = validate_collection(paths, 256, 128, progress=False)
    assert report["ok"] and report["overlap"]["identical"]
    assert selection_warning(report["overlap"]).startswith("Warning: this model was selected on the test split")


# ---- holdout -----------------------------------------------------------------------------------

def test_holdout_is_deterministic_disjoint_and_moves_whole_videos():
    train = _caps(range(50), per=3)
    kept, held = holdout_captions(train, 0.2, seed=3)
    assert holdout_captions(train, 0.2, seed=3) == (kept, held)
    kept_v, held_v = {v for _, v, _ in kept}, {v for _, v, _ in held}
    assert len(held_v) == 10 and len(kept_v) == 40 and not kept_v & held_v
    assert len(held) == 30 and sorted(kept + held) == sorted(train)  # every caption of a video moves
    assert kept == [c for c in train if c[1] in kept_v]            # file order kept
    assert holdout_captions(train, 0.2, seed=4)[1] != held          # the seed matters


def test_holdout_does_not_depend_on_the_caption_file_order():
    vids = [f"video{i}" for i in range(40)]
    shuffled = list(vids)
    random.Random(0).shuffle(shuffled)
    assert set(holdout_videos(vids, 0.25, 11)) == set(holdout_videos(shuffled, 0.25, 11))
    assert holdout_videos(shuffled, 0.25, 11) == [v for v in shuffled if v in set(holdout_videos(vids, 0.25, 11))]


def test_holdout_sizes_and_bad_settings():
    assert len(holdout_videos(["a", "b"], 0.01, 0)) == 1      # at least one
    assert len(holdout_videos(["a", "b", "c"], 0.99, 0)) == 2  # at least one stays in training
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="holdout_fraction must be in"):
            holdout_videos(["a", "b"], bad, 0)
    with pytest.raises(ValueError, match="at least 2 training videos"):
        holdout_videos(["a", "a"], 0.5, 0)


def test_holdout_on_a_collection_file_and_in_the_settings_fingerprint(tmp_path):
    """The same file and settings give the same split; the holdout keys are part of the settings
    (and so of the fingerprint a resume checks)."""
    paths = write_collection(tmp_path, videos={"train": 20, "val": 2, "test": 2}, captions_per_video=3)
    caps = read_captions(paths.caption_file("train"))
    assert holdout_captions(caps, 0.1, 0) == holdout_captions(read_captions(paths.caption_file("train")), 0.1, 0)
    s = load_settings()
    assert {"val_split", "holdout_fraction", "holdout_seed"} <= set(s["train"])
    other = json.loads(json.dumps(s))
    other["train"]["holdout_seed"] = int(s["train"]["holdout_seed"]) + 1
    assert settings_hash(other) != settings_hash(s)


def test_holdout_split_data_of_a_corpus_train_split(tmp_path):
    from prvr.data.datasets import Corpus
    from prvr.data.splits import holdout_split_data

    paths = write_collection(tmp_path, videos={"train": 10, "val": 2, "test": 2}, captions_per_video=2)
    train = Corpus(paths.collection_dir, paths.feature).split("train")
    tr, val = holdout_split_data(train, 0.3, 5)
    assert (len(tr.video_ids), len(val.video_ids), val.name) == (7, 3, "val")
    assert set(val.video_ids) == set(holdout_videos(train.video_ids, 0.3, 5))
    assert not set(tr.video_ids) & set(val.video_ids)
    for s in (tr, val):  # indices of each video's captions point at that video's captions
        assert all(s.query_video_ids[i] == v for v, idx in s.video_queries.items() for i in idx)
        assert sum(len(i) for i in s.video_queries.values()) == len(s.query_ids)
    again = holdout_split_data(Corpus(paths.collection_dir, paths.feature).split("train"), 0.3, 5)
    assert again == (tr, val)  # a fresh process (a resume) gets the same split
