"""An index exported to Qdrant, for a collection past one machine (docs/search.md, "Beyond one
machine").

Each video is one Qdrant point: id = its row in the index folder, a named multivector
`clips` holding its stage-1 vectors (the method's `index_vectors`, unit norm), and the payload
`{"video_id", "n_features"}`. The collection compares with MAX_SIM over DOT. For one query
vector, that is the max over the video's vectors of `index_queries(q) . v`, which is stage 1's
own candidate score. Qdrant then shards and replicates stage 1. Stage 2, the method's exact
score and the moment, still runs where the index folder's exact encodings are, through
`SearchIndex.use_stage1(QdrantStage1(...))`. Qdrant cannot run a method's network.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from .index import SearchError

VECTOR = "clips"


def _models():
    try:
        from qdrant_client import models
    except ImportError:
        raise SearchError("the Qdrant export needs qdrant-client: pip install -e \".[export]\"") from None
    return models


def connect(url: str | None = None, path: str | None = None):
    """A Qdrant client: a server (`url`, e.g. http://host:6333) or local mode on disk (`path`)."""
    _models()
    from qdrant_client import QdrantClient

    if (url is None) == (path is None):
        raise SearchError("give exactly one of --qdrant-url and --qdrant-path")
    return QdrantClient(url=url) if url else QdrantClient(path=path)


def export_qdrant(index, client, collection: str, batch: int = 256, progress: bool = True,
                  recreate: bool = False) -> int:
    """Write every video of `index` (a SearchIndex) to `collection`; returns the points written."""
    models = _models()
    if client.collection_exists(collection):
        if not recreate:
            raise SearchError(f"Qdrant collection {collection!r} exists (pass --recreate to replace it)")
        client.delete_collection(collection)
    dim = int(index.manifest["stage1"].get("dim") or _stage1(index).shape[1])
    client.create_collection(collection, vectors_config={VECTOR: models.VectorParams(
        size=dim, distance=models.Distance.DOT,
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))})
    vecs, owner = _stage1(index), index.vec_video
    if owner.size and (np.diff(owner) < 0).any():
        raise SearchError(f"{index.folder / 'stage1_video.npy'}: vectors not grouped by video")
    V = len(index.video_ids)
    bounds = np.searchsorted(owner, np.arange(V + 1))
    for lo in tqdm(range(0, V, batch), desc="export to qdrant", unit="block", disable=not progress,
                   dynamic_ncols=True):
        points = []
        for v in range(lo, min(lo + batch, V)):
            rows = np.asarray(vecs[bounds[v]:bounds[v + 1]], dtype=np.float32)
            if rows.shape[0] == 0:
                continue
            points.append(models.PointStruct(id=v, vector={VECTOR: rows.tolist()},
                                             payload={"video_id": index.video_ids[v],
                                                      "n_features": int(index.n_frames[v])}))
        client.upsert(collection, points=points, wait=True)
    n = client.count(collection, exact=True).count
    if n != V:
        raise SearchError(f"Qdrant collection {collection!r}: {n} points after the export, expected {V}")
    return n


def _stage1(index) -> np.ndarray:
    from .index import _load

    return _load(index.folder / "stage1.npy", (int(index.manifest["n_vectors"]),), mmap=True)


class QdrantStage1:
    """Stage 1 answered by a Qdrant collection written by `export_qdrant`: the (Nq, n) video
    rows of the top n videos by MAX_SIM (-1 where fewer are found)."""

    def __init__(self, client, collection: str):
        self.client, self.collection = client, collection
        if not client.collection_exists(collection):
            raise SearchError(f"Qdrant collection {collection!r}: not found (export the index first)")

    def __call__(self, q: np.ndarray, n: int) -> np.ndarray:
        models = _models()
        reqs = [models.QueryRequest(query=[row.tolist()], using=VECTOR, limit=n, with_payload=False)
                for row in np.asarray(q, dtype=np.float32)]
        out = np.full((len(reqs), n), -1, dtype=np.int64)
        for i, res in enumerate(self.client.query_batch_points(self.collection, requests=reqs)):
            ids = [int(p.id) for p in res.points]
            out[i, :len(ids)] = ids
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": "qdrant", "collection": self.collection}
