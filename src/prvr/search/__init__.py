"""Search over a collection with a trained model: an index of its encodings, two-stage search
(faiss over the method's index vectors, then the method's own score), and the moment of each
hit (prvr.search.index; docs/search.md)."""
from __future__ import annotations

from .index import SearchError, SearchIndex, build_index, open_index

__all__ = ["SearchError", "SearchIndex", "build_index", "open_index"]
