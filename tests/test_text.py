"""Free-text query encoders (docs/text.md): tiny random RoBERTa and CLIP text models, saved and
loaded through the same code as a user's weights, with tokenizers trained here. No test reaches a
hub (HF_HUB_OFFLINE is set for every test in this file)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prvr import main as cli
from prvr.search import open_index
from prvr.text import EncoderError, EncoderSpec, encoder_spec, load_encoder
from prvr.text.tiny import make_tiny_encoder

TEXTS = ["a man opens the door and walks into the kitchen", "she puts the cup on the table",
         "the dog runs across the park after a ball", "two people talk on a sofa"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_encoders")
    return {"roberta": make_tiny_encoder(root / "roberta", "roberta", 48, TEXTS),
            "clip": make_tiny_encoder(root / "clip", "clip", 32, TEXTS)}


def test_roberta_gives_token_rows_without_specials_at_most_max_tokens(tiny):
    enc = load_encoder(tiny["roberta"], EncoderSpec("roberta", 48, dataset="t"))
    long = " ".join(["kitchen door"] * 40)
    out = enc.encode([TEXTS[0], "dog", long])
    n_real = [len(enc.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (TEXTS[0], "dog")]
    assert [o.shape for o in out[:2]] == [(n_real[0], 48), (n_real[1], 48)]   # <s> and </s> gone
    assert out[2].shape == (30, 48)                                           # at most 30 tokens
    assert all(o.dtype == np.float32 for o in out)
    # the rows are layer -2's, raw: the same as the model's own hidden state at those positions
    ids = enc.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        hs = enc.model(**ids, output_hidden_states=True).hidden_states[-2][0, 1:-1]
    np.testing.assert_allclose(out[0], hs.numpy(), atol=1e-5)
    assert not np.allclose(np.linalg.norm(out[0], axis=1), 1.0)   # not normalised: stored files are raw


def test_roberta_rows_do_not_depend_on_the_batch_padding(tiny):
    enc = load_encoder(tiny["roberta"], EncoderSpec("roberta", 48, dataset="t"))
    alone = enc.encode(["dog"])[0]
    batched = enc.encode(["dog", TEXTS[2]])[0]    # padded to the longer sentence
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_clip_gives_one_projected_embedding_per_caption_independent_of_padding(tiny):
    enc = load_encoder(tiny["clip"], EncoderSpec("clip", 32, max_tokens=77, dataset="t"))
    out = enc.encode(["dog", TEXTS[0]])
    assert [o.shape for o in out] == [(1, 32), (1, 32)]
    np.testing.assert_allclose(enc.encode(["dog"])[0], out[0], atol=1e-5)
    ids = enc.tokenizer(["dog"], return_tensors="pt")
    with torch.no_grad():
        want = enc.model(**ids).text_embeds
    np.testing.assert_allclose(out[0], want.numpy(), atol=1e-5)


def test_the_saved_folder_is_the_layout_real_weights_come_in(tiny):
    names = {p.name for p in tiny["roberta"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    cfg = json.loads((tiny["clip"] / "config.json").read_text())
    assert cfg["projection_dim"] == 32


@pytest.mark.parametrize("case, spec, names", [
    ("missing", EncoderSpec("roberta", 768, hub="roberta-base", dataset="tvr"), "huggingface-cli download roberta-base"),
    ("width", EncoderSpec("roberta", 1024, hub="roberta-large", dataset="act"), "gives 48-d features, dataset act stores 1024-d"),
    ("kind", EncoderSpec("clip", 48, hub="openai/clip-vit-base-patch32", dataset="tvr_clip"), "a roberta model"),
])
def test_a_missing_or_mismatched_encoder_is_one_line_naming_what_to_download(tiny, tmp_path, case, spec, names):
    source = tmp_path / "nothing-here" if case == "missing" else tiny["roberta"]
    with pytest.raises(EncoderError) as err:
        load_encoder(source, spec)
    msg = str(err.value)
    assert "\n" not in msg and names in msg and str(source) in msg
    assert spec.hub in msg   # what to download


def test_a_hub_name_with_no_hub_reachable_is_one_line(tiny):
    with pytest.raises(EncoderError) as err:
        load_encoder("roberta-base", EncoderSpec("roberta", 768, hub="roberta-base", dataset="tvr"))
    assert "\n" not in str(err.value) and "download roberta-base" in str(err.value)


def test_a_folder_without_a_model_is_one_line(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{not json")
    with pytest.raises(EncoderError) as err:
        load_encoder(tmp_path / "enc", EncoderSpec("roberta", 768, hub="roberta-base", dataset="tvr"))
    assert "\n" not in str(err.value) and "no model config" in str(err.value)


def test_each_dataset_names_its_encoder_in_the_search_settings():
    from conftest import REPO
    from prvr.config import load_params, resolve, search_settings

    params = load_params(REPO / "params.yaml")
    facts = search_settings(params)["datasets"]
    for ds in params["datasets"]:
        spec = encoder_spec(resolve(params, ds, "gmmformer_v2"), facts.get(ds), ds)
        assert spec.dim == params["datasets"][ds]["text_dim"]
        assert spec.kind == ("clip" if params["datasets"][ds].get("feature_format") == "hdf5" else "roberta"), ds
    assert facts["tvr"]["encoder"]["hub"] == "roberta-base" and facts["tvr"]["encoder"]["layer"] == -2
    assert facts["tvr_clip"]["encoder"]["hub"] == "openai/clip-vit-base-patch32"


def test_the_encoder_facts_are_outside_the_training_fingerprint():
    """Changing an encoder fact must not invalidate training: train reads no `search` key."""
    import yaml
    from conftest import REPO

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    train_params = json.dumps(dvc["stages"]["train"].get("params", []))
    assert "search" not in train_params


# ------------------------------------------------------------------------ on an index

def test_search_by_text_gives_the_search_json_with_a_null_query_id(text_search_work, capsys, monkeypatch):
    w = text_search_work
    monkeypatch.chdir(w)
    rc = cli.main(["search", "--index", "index", "--text", "a person opens a door", "--encoder", "encoder",
                   "--k", "3", "--json"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 1
    obj = json.loads(out[0])
    assert obj["query_id"] is None and obj["text"] == "a person opens a door" and len(obj["hits"]) == 3
    hits = obj["hits"]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    for h in hits:
        assert 0 <= h["moment"]["start_feature"] < h["moment"]["end_feature"] <= h["n_features"]


def test_text_hits_equal_the_exhaustive_ranking_of_the_same_encoded_text(text_search_work):
    idx = open_index(text_search_work / "index")
    enc = idx.load_encoder(text_search_work / "encoder")
    texts = ["a person opens a door", "a dog in the park"]
    q = idx.encode(idx.text_features(texts, enc))
    scores, rows = idx.exhaustive(q, len(idx.video_ids))
    for i, obj in enumerate(idx.search_texts(texts, len(idx.video_ids), enc)):
        assert [h["video_id"] for h in obj["hits"]] == [idx.video_ids[r] for r in rows[i].tolist()]
        np.testing.assert_allclose([h["score"] for h in obj["hits"]], scores[i].numpy(), atol=1e-5)


def test_typed_queries_are_read_as_stored_ones_are_unit_rows(text_search_work):
    idx = open_index(text_search_work / "index")
    enc = idx.load_encoder(text_search_work / "encoder")
    batch = idx.text_features(["a person opens a door"], enc)
    rows = batch["query_feats"][0][batch["query_mask"][0].bool()]
    np.testing.assert_allclose(rows.norm(dim=-1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("argv, names", [
    (["--text", "a door"], "--text needs --encoder"),
    (["--text", "  ", "--encoder", "encoder"], "empty sentence"),
    (["--text", "a door", "--encoder", "no-such-folder/"], "no-such-folder"),
])
def test_bad_text_searches_are_one_line(text_search_work, capsys, monkeypatch, argv, names):
    monkeypatch.chdir(text_search_work)
    rc = cli.main(["search", "--index", "index", *argv, "--k", "3"])
    got = capsys.readouterr()
    err = got.err.splitlines()
    assert rc == 1 and got.out == "" and len(err) == 1 and names in err[0], err


# ------------------------------------------------------------------------ check-encoder

def test_check_encoder_reports_per_token_and_per_caption_cosine(text_search_work, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(text_search_work)
    out_file = tmp_path / "report.json"
    rc = cli.main(["check-encoder", "--dataset", "demo", "--encoder", "encoder", "--n", "20", "--json",
                   "--out", str(out_file)])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == json.loads(out_file.read_text()) | {"seconds": rep["seconds"]}
    assert rep["captions"] == 20 and rep["dim"] == 128 and rep["kind"] == "roberta"
    for key in ("per_token_cosine", "per_caption_cosine"):
        assert -1.0 <= rep[key]["min"] <= rep[key]["p10"] <= rep[key]["max"] <= 1.0
    assert rep["per_token_cosine"]["rows"] > 0 and 0.0 <= rep["token_counts_equal"] <= 1.0
    assert len(rep["worst_captions"]) == 5


def test_check_encoder_of_the_stored_features_own_source_is_cosine_one(text_search_work, tmp_path):
    """Rewrite a copy of the demo's test queries with the encoder's own output: the report must
    then read 1.0 everywhere with equal token counts (the comparison is aligned row by row)."""
    import shutil

    import h5py

    from prvr.config import load_settings
    from prvr.data.datasets import Corpus
    from prvr.data.layout import read_captions
    from prvr.text.check import check_encoder

    shutil.copytree(text_search_work / "data" / "demo" / "corpus" / "demo", tmp_path / "demo")
    settings = load_settings(text_search_work / "params.yaml", "demo", "gmmformer_v2")
    enc = load_encoder(text_search_work / "encoder", encoder_spec(settings, None, "demo"))
    corpus = Corpus(tmp_path / "demo", settings["feature"], collection="demo")
    before = check_encoder(corpus, enc, "test", n=0, progress=False)
    assert before["per_caption_cosine"]["mean"] < 0.9   # the demo's features came from no encoder
    caps = read_captions(corpus.paths.caption_file("test"))
    qfile = corpus.paths.query_feat_file
    del corpus   # closes its read-only handle on the query file
    import gc

    gc.collect()
    with h5py.File(qfile, "a") as f:
        for (cid, _, _), feats in zip(caps, enc.encode([c[2] for c in caps])):
            del f[cid]
            f.create_dataset(cid, data=feats)
    rep = check_encoder(Corpus(tmp_path / "demo", settings["feature"], collection="demo"), enc, "test", n=0,
                        progress=False)
    assert rep["captions"] == len(caps) and rep["token_counts_equal"] == 1.0
    assert rep["per_token_cosine"]["min"] > 0.9999 and rep["per_caption_cosine"]["min"] > 0.9999


def test_tiny_encoder_command_writes_a_stand_in_of_the_dataset_width(text_search_work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(text_search_work)
    rc = cli.main(["tiny-encoder", "--dataset", "demo", "--out", str(tmp_path / "enc")])
    assert rc == 0 and "stand-in" in capsys.readouterr().err
    idx = open_index(text_search_work / "index")
    assert idx.load_encoder(tmp_path / "enc").encode(["a door"])[0].shape[1] == 128
