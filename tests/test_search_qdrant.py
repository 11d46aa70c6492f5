"""The index exported to Qdrant (local mode, no server): one point per video whose MAX_SIM
score is stage 1's own candidate score, and two-stage search with Qdrant as stage 1 gives the
hits that the folder's faiss stage 1 gives (docs/search.md, "Beyond one machine")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prvr import main as cli
from prvr.search import SearchError, open_index

pytest.importorskip("qdrant_client")
from prvr.search.qdrant import QdrantStage1, connect, export_qdrant  # noqa: E402


@pytest.fixture(scope="module")
def exported(text_search_work, tmp_path_factory):
    idx = open_index(text_search_work / "index")
    client = connect(path=str(tmp_path_factory.mktemp("qdrant") / "db"))
    assert export_qdrant(idx, client, "demo", progress=False) == len(idx.video_ids)
    return idx, client


def _queries(idx, n=12):
    ids = idx.corpus.split("test").query_ids[:n]
    return idx.encode(idx.query_features(ids))


def test_points_carry_the_video_and_its_stage1_vectors(exported):
    idx, client = exported
    p = client.retrieve("demo", ids=[3], with_vectors=True, with_payload=True)[0]
    assert p.payload == {"video_id": idx.video_ids[3], "n_features": int(idx.n_frames[3])}
    stage1 = np.load(idx.folder / "stage1.npy")[idx.vec_video == 3].astype(np.float32)
    np.testing.assert_allclose(np.array(p.vector["clips"]), stage1, atol=1e-6)


def test_qdrant_candidates_are_the_max_over_vectors_ranking(exported):
    idx, client = exported
    q = idx.model.index_queries(_queries(idx)).numpy()
    stage1 = np.load(idx.folder / "stage1.npy").astype(np.float32)
    per_vec = q @ stage1.T                                                     # (Nq, N)
    V = len(idx.video_ids)
    best = np.full((q.shape[0], V), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, idx.vec_video, per_vec.T)                            # max over each video's vectors
    got = QdrantStage1(client, "demo")(q, 5)
    want = np.argsort(-best, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(np.take_along_axis(best, got, 1), np.take_along_axis(best, want, 1), atol=1e-5)


def test_two_stage_search_through_qdrant_equals_the_faiss_path(exported):
    idx, client = exported
    q = _queries(idx)
    faiss_hits = idx.search_encoded(q, 5, candidates=8)
    idx.use_stage1(QdrantStage1(client, "demo"))
    try:
        qdrant_hits = idx.search_encoded(q, 5, candidates=8)
    finally:
        idx.use_stage1(None)
    assert [[h["video_id"] for h in hs] for hs in qdrant_hits] == [[h["video_id"] for h in hs] for hs in faiss_hits]
    for a, b in zip(qdrant_hits, faiss_hits):
        assert [h["moment"] for h in a] == [h["moment"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-6)


def test_an_existing_collection_is_refused_unless_recreated(exported):
    idx, client = exported
    with pytest.raises(SearchError, match="exists"):
        export_qdrant(idx, client, "demo", progress=False)


def test_export_command_and_a_missing_collection(text_search_work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(text_search_work)
    db = str(tmp_path / "db")
    assert cli.main(["export-qdrant", "--index", "index", "--qdrant-path", db, "--collection", "c"]) == 0
    assert "wrote" in capsys.readouterr().err
    rc = cli.main(["export-qdrant", "--index", "index", "--collection", "c"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and len(err) == 1 and "exactly one of --qdrant-url and --qdrant-path" in err[0]
    with pytest.raises(SearchError, match="not found"):
        QdrantStage1(connect(path=str(tmp_path / "other")), "nothing")
