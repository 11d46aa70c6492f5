"""Model selection that never sees the test split: the seeded holdout in training (same split on
every setup and resume, disjoint from training), and the sentence a report and an MLflow run
start with when the model was selected on the test split."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import edit_params
from prvr.config import load_settings
from prvr.data.splits import SELECTION_TAG
from prvr.distributed import DistContext
from prvr.report import MethodResult, render_markdown
from prvr.training import fingerprint, setup

SENTENCE = "Warning: this model was selected on the test split"


def _setup(work: Path, ckpt: Path):
    settings = load_settings(work / "params.yaml", "demo", "meanpool")
    return settings, setup(settings, ckpt, DistContext.from_env("cpu"), None)


def _split_videos(run) -> tuple[list[str], list[str]]:
    train = run.loader.dataset.split
    val = run.val_loaders[0].dataset.split
    return list(train.video_ids), list(val.video_ids)


def test_holdout_training_is_seeded_disjoint_and_resumable(tiny_workdir: Path, monkeypatch):
    monkeypatch.chdir(tiny_workdir)
    edit_params(tiny_workdir / "params.yaml", **{"train.val_split": "holdout", "train.holdout_fraction": 0.2,
                                                 "train.holdout_seed": 3})
    settings, a = _setup(tiny_workdir, tiny_workdir / "a")
    _, b = _setup(tiny_workdir, tiny_workdir / "b")
    train_a, val_a = _split_videos(a)
    train_b, val_b = _split_videos(b)
    assert val_a == val_b and train_a == train_b                 # the same draw on every setup
    assert set(val_a).isdisjoint(train_a)                        # validation never trains
    val_caps = set(a.val_loaders[1].dataset.split.query_ids)
    assert val_caps.isdisjoint(a.loader.dataset.split.query_ids)
    from prvr.data.datasets import Corpus

    corpus = Corpus.from_settings(settings)
    all_train = corpus.split("train")
    assert sorted(train_a + val_a) == sorted(all_train.video_ids)  # every training video, once
    assert len(val_a) == round(0.2 * len(all_train.video_ids))
    held = {v for v in val_a}                                    # all captions of a held-out video
    assert val_caps == {q for q, v in zip(all_train.query_ids, all_train.query_video_ids) if v in held}
    assert not set(val_a) & set(corpus.split("test").video_ids)  # test is never touched
    assert a.selection_warning is None
    # the holdout keys are training settings: another seed is another fingerprint (no resume)
    other = load_settings(tiny_workdir / "params.yaml", "demo", "meanpool")
    other["train"]["holdout_seed"] = 4
    assert fingerprint(other, None)["settings_hash"] != a.fp["settings_hash"]
    edit_params(tiny_workdir / "params.yaml", **{"train.holdout_seed": 4})
    _, c = _setup(tiny_workdir, tiny_workdir / "c")
    assert _split_videos(c)[1] != val_a


def test_validation_on_the_test_split_is_said_in_the_run(tmp_path: Path, monkeypatch):
    """The demo corpus with val = test: training carries the sentence (an MLflow tag and the
    run's description), and holdout validation carries none."""
    from prvr.data.demo import generate_corpus
    from prvr.tracking import Tracker
    from prvr.training import _start_tracking

    work = tmp_path / "work"
    (work / "data" / "demo").mkdir(parents=True)
    generate_corpus(work / "data" / "demo" / "corpus", preset="demo", seed=7, scale=0.1, progress=False,
                    val_is_test=True)
    from conftest import REPO, TINY_DEMO

    (work / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    edit_params(work / "params.yaml", **TINY_DEMO)
    monkeypatch.chdir(work)
    _, run = _setup(work, work / "ckpt")
    assert run.selection_warning and run.selection_warning.startswith(SENTENCE)
    tracker = Tracker("demo", tracking_uri=f"sqlite:///{(work / 'mlflow.db').as_posix()}", root=work)
    _start_tracking(run, tracker)
    tags = tracker.client().get_run(tracker.run_id).data.tags
    tracker.end()
    assert tags[SELECTION_TAG] == run.selection_warning == tags["mlflow.note.content"]
    edit_params(work / "params.yaml", **{"train.val_split": "holdout"})
    assert _setup(work, work / "ckpt2")[1].selection_warning is None


def _result(method: str, val_split: str | None) -> MethodResult:
    test = {"r1": 1.0, "r5": 5.0, "r10": 10.0, "r100": 90.0, "sumr": 106.0, "n_queries": 30, "n_videos": 15,
            "split": "test", "denseval_r1": 2.0, "denseval_r5": 6.0, "denseval_r10": 11.0,
            "denseval_r100": 91.0, "denseval_sumr": 110.0}
    train = {"best_epoch": 1, **({"val_split": val_split} if val_split else {})}
    return MethodResult(method, method.title(), test, train)


VAL_IS_TEST = {"collection": "demo", "ok": True, "splits": {},
               "overlap": {"val_captions": 30, "test_captions": 30, "shared_captions": 30,
                           "val_videos": 15, "test_videos": 15, "shared_videos": 15, "identical": True}}
FIGURES = {"curves": "c.png", "recall": "r.png"}


def test_the_report_says_first_that_the_model_was_selected_on_the_test_split():
    text = render_markdown("demo", [_result("meanpool", None)], VAL_IS_TEST, FIGURES)
    lines = text.splitlines()
    assert lines[0].startswith("# ") and lines[2].startswith(SENTENCE)   # right under the title
    assert "30 of the 30 test captions" in lines[2]
    # selected on the holdout: no sentence; apart from the test split: no sentence
    assert SENTENCE not in render_markdown("demo", [_result("meanpool", "holdout")], VAL_IS_TEST, FIGURES)
    apart = {**VAL_IS_TEST, "overlap": {**VAL_IS_TEST["overlap"], "shared_captions": 0, "shared_videos": 0,
                                        "identical": False}}
    assert "selected on" not in render_markdown("demo", [_result("meanpool", None)], apart, FIGURES)
    # one of two methods selected on test: the sentence names it
    mixed = render_markdown("demo", [_result("meanpool", None), _result("msssl", "holdout")], VAL_IS_TEST,
                            FIGURES).splitlines()[2]
    assert mixed.startswith("Warning: Meanpool was selected on the test split") and "Msssl" not in mixed


def test_the_report_shows_the_dense_protocol_beside_the_standard_one():
    text = render_markdown("demo", [_result("meanpool", "holdout")], None, FIGURES)
    assert "`denseval`" in text
    row = next(line for line in text.splitlines() if line.startswith("| Meanpool | 2.0"))
    assert row.startswith("| Meanpool | 2.0 | 6.0 | 11.0 | 91.0 | 110.0")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


def test_evaluate_scores_a_dense_split_with_all_its_videos(tmp_path: Path):
    """evaluate.extra_splits: every query of the .gt.jsonl, scored against the split's videos;
    a hit when ANY of its videos ranks within k, so never below one-video-per-query."""
    import sys

    import torch

    from conftest import REPO
    from prvr.data.datasets import Corpus
    from prvr.data.demo import generate_corpus
    from prvr.data.splits import read_dense_split
    from prvr.metrics import retrieval_metrics
    from prvr.methods import get_method

    sys.path.insert(0, str(REPO / "stages"))
    import evaluate as stage

    root = generate_corpus(tmp_path / "c", preset="demo", seed=7, scale=0.1, progress=False, dense_gt=True)
    corpus = Corpus(root, "demo_feats")
    settings = load_settings(REPO / "params.yaml", "demo", "meanpool")
    method = get_method("meanpool")
    torch.manual_seed(0)
    model = method.build_model(method.config_from_dict(settings["model"]))
    out = stage._extra_metrics(model, corpus, ["denseval"], settings["evaluate"],
                               {"model_config": settings["model"]}, torch.device("cpu"), False)
    dense = read_dense_split(corpus.paths, "denseval")
    assert out["denseval_n_queries"] == len(dense.query_ids) and dense.multi > 0
    assert out["denseval_n_videos"] == len(dense.video_ids)
    from prvr.evaluation import evaluate

    from prvr.training import eval_loaders

    vl, ql = eval_loaders(corpus, "denseval", 100, 50, 0, settings["model"])   # registered by the stage
    _, result = evaluate(model, vl, ql, "cpu", progress=False)
    single = retrieval_metrics(result.scores, [g[0] for g in dense.gt_video_ids], result.video_ids)
    multi = retrieval_metrics(result.scores, list(dense.gt_video_ids), result.video_ids)
    for k in ("r1", "r5", "r10", "r100", "sumr"):
        assert out[f"denseval_{k}"] == pytest.approx(multi[k]) and multi[k] >= single[k]
    assert multi["sumr"] > single["sumr"]
