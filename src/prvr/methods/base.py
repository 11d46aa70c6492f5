"""The method contract: what training, evaluation, DDP, checkpoints and the report may ask of a
PRVR method. Nothing outside `prvr.methods` imports a method by name; it asks the registry
(`prvr.methods.get_method(name)`) for a `Method` and talks to it, and to the network it builds,
only through the names below.

A method is one module or package under `src/prvr/methods/` that registers one `Method` object.
It owns its config dataclass, network, loss, optimiser parameter groups, the mapping of its
public release's checkpoints and its paper's numbers. Its recipe (per-dataset settings of its
release) lives in params.yaml under `methods.<name>`.

Data flow of one evaluation (prvr.evaluation):

    videos = model.encode_videos(batch)            # VideoEncoding of B videos
    ... kept for the whole split in a VideoBank (fixed tensors stacked, sequences packed)
    query = model.encode_queries(batch)            # (Nq, D), or a QueryEncoding (token level)
    scores = model.score(query, bank block)        # {"score": (Nq, b), <component>: (Nq, b)}

Data flow of one training step (prvr.training, prvr.distributed):

    phase = method.start_epoch(model, loss, epoch)    # once per epoch, before its first step
    out = model(batch)                             # TrainOutput (queries, videos, scores)
    terms = loss(out, labels, hard_negatives, generator)   # {term: 0-dim, ..., "total": 0-dim}

Under DDP every tensor of `out.queries` and `out.videos` is gathered from all ranks with
gradient; `model.train_scores(queries, videos)` then rebuilds the global batch's scores, and
the loss runs on the global output. Terms that must stay per rank (a Hungarian matching over a
rank's own videos) are the loss's `local_sums`: each returns (sum, count), which the caller
all-reduces and hands back as `local=`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

# Batch keys the data loaders provide (prvr.data.datasets):
#   video batch: clip_feats (B, n_clips, Dv), frame_feats (B, Lf, Dv), frame_mask (B, Lf), video_ids
#   query batch: query_feats (Nq, Lq, Dt), query_mask (Nq, Lq), query_ids, query_video_ids
#   train batch: both, plus query_labels (Nq,) = index of each query's video in the batch
Batch = Mapping[str, Any]


@dataclass
class VideoEncoding:
    """What a method keeps of B encoded videos.

    fixed: per-video tensors of a fixed shape, each (B, ...) (e.g. 32 clip embeddings).
    seq: an optional per-video sequence, (B, L, H) and zero at padded slots, with
    seq_mask (B, L) bool (e.g. the frame embeddings). The bank stores only its real rows.
    """

    fixed: dict[str, Tensor]
    seq: Tensor | None = None
    seq_mask: Tensor | None = None

    def __len__(self) -> int:
        for t in self.fixed.values():
            return int(t.shape[0])
        return 0 if self.seq is None else int(self.seq.shape[0])


@dataclass
class QueryEncoding:
    """A token-level query encoding (RAL, Holmes-DQ): what `encode_queries` returns when a
    method's score reads each query token, not one vector.

    pooled (Nq, D): the query vector (the clip-scale score's).
    tokens (Nq, L, H): per-token encodings, zero at padded tokens; mask (Nq, L) bool, True at
    real tokens; weights (Nq, L): each real token's weight in the score (0 at pads).
    Slicing keeps the rows and trims the token axis to the longest real query of the slice, so
    a block's score (which masks pads) never depends on how the queries were padded.
    """

    pooled: Tensor
    tokens: Tensor
    mask: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        n, L = self.mask.shape
        if self.pooled.shape[0] != n or tuple(self.tokens.shape[:2]) != (n, L) \
                or tuple(self.weights.shape) != (n, L):
            raise ValueError(f"QueryEncoding: pooled {tuple(self.pooled.shape)}, tokens "
                             f"{tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)}, weights "
                             f"{tuple(self.weights.shape)} disagree on (Nq, L)")

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The pooled vectors' shape (Nq, D), as a plain (Nq, D) encoding has."""
        return self.pooled.shape

    def __getitem__(self, rows: slice) -> "QueryEncoding":
        mask = self.mask[rows]
        L = int(mask.sum(1).max()) if mask.numel() else 0
        return QueryEncoding(self.pooled[rows], self.tokens[rows, :L], mask[:, :L], self.weights[rows, :L])

    def to(self, device: Any, non_blocking: bool = False) -> "QueryEncoding":
        return QueryEncoding(*(t.to(device, non_blocking=non_blocking)
                               for t in (self.pooled, self.tokens, self.mask, self.weights)))

    def float(self) -> "QueryEncoding":
        return QueryEncoding(self.pooled.float(), self.tokens.float(), self.mask, self.weights.float())

    @property
    def device(self) -> torch.device:
        return self.pooled.device

    @property
    def token_len(self) -> int:
        return int(self.mask.shape[1])

    @staticmethod
    def cat(parts: Sequence["QueryEncoding"]) -> "QueryEncoding":
        """Concatenate along the queries, padding the token axis to the longest part."""
        L = max(p.token_len for p in parts)

        def pad(t: Tensor, value=0) -> Tensor:
            extra = L - t.shape[1]
            if not extra:
                return t
            return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), value)], 1)

        return QueryEncoding(torch.cat([p.pooled for p in parts]), torch.cat([pad(p.tokens) for p in parts]),
                             torch.cat([pad(p.mask, False) for p in parts]),
                             torch.cat([pad(p.weights) for p in parts]))


def cat_queries(parts: Sequence[Any]) -> Any:
    """Concatenate query encodings of one kind: (Nq, D) tensors or QueryEncodings."""
    if parts and isinstance(parts[0], QueryEncoding):
        return QueryEncoding.cat(parts)
    return torch.cat(list(parts))


# Keys of TrainOutput.queries whose dimension 1 is the query-token axis (padded per batch): the
# DDP gather pads them to the longest over the ranks, as it pads dimension 0.
TOKEN_QUERY_KEYS = ("tokens", "token_mask", "token_weight", "token_weight_raw")


@dataclass
class TrainOutput:
    """A training forward of one batch.

    queries: per-query tensors, each (Nq, ...): "query" (the scoring encoding) and any other the
    loss needs (e.g. a second, independently dropped-out encoding).
    videos: the batch's VideoEncoding.
    scores: the training score matrices, as `model.train_scores(queries, videos)` computes them;
    usually (Nq, B), but a method may use its own shapes (MS-SL's frame scale is (Nq, Nq)).
    """

    queries: dict[str, Tensor]
    videos: VideoEncoding
    scores: dict[str, Tensor] = field(default_factory=dict)


class ConfigFromDict:
    """Mixin of a method's config dataclass: `from_dict` builds it from field values (a
    recipe, or the asdict() a checkpoint stores); an unknown key, or a value of another kind
    than its field's default (true/false, an integer, a number), is a ValueError naming it."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        from dataclasses import fields

        defaults = {f.name: f.default for f in fields(cls)}
        extra = sorted(set(d) - set(defaults))
        if extra:
            raise ValueError(f"unknown keys {extra}")
        return cls(**{k: _of_kind(k, v, defaults[k]) for k, v in d.items()})


_KINDS = {bool: "true or false", int: "an integer", float: "a number"}


def _of_kind(key: str, value: Any, default: Any) -> Any:
    """`value`, checked against the kind of its field's default where that is a bool, an int or
    a float (a number may be a numeric string: YAML 1.1 reads `1e-3` as one)."""
    kind = type(default)
    if kind not in _KINDS:
        return value
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float) if kind is float else kind) \
        and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{key} {value!r}: expected {_KINDS[kind]}")
    return value


@runtime_checkable
class MethodModel(Protocol):
    """The network a Method builds (an nn.Module). `cfg` is its config dataclass."""

    cfg: Any

    def encode_videos(self, batch: Batch) -> VideoEncoding:
        """Encode a video batch (clip_feats, frame_feats, frame_mask)."""

    def encode_queries(self, batch: Batch) -> Tensor:
        """Encode a query batch (query_feats, query_mask) -> (Nq, D)."""

    def score(self, query: Tensor, videos: VideoEncoding) -> dict[str, Tensor]:
        """Retrieval scores of queries (Nq, D) against a block of videos: {"score": (Nq, b),
        and each named component (e.g. "clip", "frame"), (Nq, b)}. Must not depend on how much
        padding the block's sequences carry."""

    def train_scores(self, queries: Mapping[str, Tensor], videos: VideoEncoding) -> dict[str, Tensor]:
        """The score matrices the loss reads, from (possibly gathered) encodings."""

    def forward(self, batch: Batch) -> TrainOutput:
        """A training forward: encode queries and videos and compute `train_scores`."""


@runtime_checkable
class MethodLoss(Protocol):
    """A method's objective (an nn.Module)."""

    terms: Sequence[str]           # names of the unweighted terms, in logging order

    def forward(self, out: TrainOutput, labels: Tensor, hard_negatives: bool,
                generator: torch.Generator | None = None,
                local: Mapping[str, tuple[Tensor, int]] | None = None) -> dict[str, Tensor]:
        """{term: 0-dim tensor for every name in `terms`, "total": their weighted sum}.
        `local`, when given, holds the all-reduced `local_sums` (distributed caller)."""

    def local_sums(self, out: TrainOutput, labels: Tensor) -> dict[str, tuple[Tensor, int]]:
        """Terms that are a sum over a rank's own videos: {name: (sum with gradient, count)}.
        Empty for most methods."""


class Method:
    """One PRVR method: subclass it in the method's module and `register` an instance.

    name: registry key (`model.name` in params.yaml); title: for reports; paper: the paper's
    test numbers {dataset: {"r1", "r5", "r10", "r100", "sumr"}} as its authors report them
    (MS-SL features); release: where its public code is.
    """

    name: str = ""
    title: str = ""
    release: str = ""
    paper: Mapping[str, Mapping[str, float]] = {}
    # How the paper's numbers were picked: "test" (a test result, as papers report them) or
    # "best_validation" (the best validation epoch of the release's logs; the report then says
    # what that validation split shares with the test split on the dataset).
    paper_selection: str = "test"
    # Extra classes a release checkpoint pickles, for the weights_only unpickler's allow-list:
    # (plain replacement type, "module.Name" as stored). Never a class whose code would run.
    release_globals: Sequence[tuple[type, str]] = ()

    # The method's config dataclass (a ConfigFromDict), network and loss classes; the defaults
    # below build them. A method overrides a builder only where it needs more.
    config_class: type = None
    model_class: type = None
    loss_class: type = None

    def config(self, recipe: Mapping[str, Any], data: Mapping[str, Any]) -> Any:
        """The config dataclass from the method's recipe keys (params.yaml `methods.<name>`,
        minus the loop keys of prvr.config.LoopSettings) and the data facts (visual_dim,
        text_dim). Unknown keys, and data facts set in the recipe, are a ValueError naming
        them. The config must have the fields n_clips, max_frames and max_query_len (the
        data streams)."""
        clash = sorted(set(recipe) & set(data))
        if clash:
            raise ValueError(f"keys {clash} are data facts, not recipe keys")
        return self.config_class.from_dict({**recipe, **data})

    def config_from_dict(self, d: Mapping[str, Any]) -> Any:
        """Rebuild the config dataclass from its asdict() form (as a checkpoint stores it)."""
        return self.config_class.from_dict(d)

    def build_model(self, cfg: Any, backend: str = "reference") -> nn.Module:
        """The method's network: the reference (plain PyTorch) one, or with backend 'cpu' the
        CPU fast path of prvr.backends.cpu.<name> where the method has one (the same
        parameters and state dict; the reference network otherwise)."""
        if backend == "cpu":
            import importlib
            import importlib.util

            module = f"prvr.backends.cpu.{self.name}"
            if importlib.util.find_spec(module) is not None:
                return importlib.import_module(module).build_model(cfg)
        elif backend != "reference":
            raise ValueError(f"backend {backend!r}: expected 'reference' or 'cpu'")
        return self.model_class(cfg)

    def build_loss(self, cfg: Any) -> nn.Module:
        return self.loss_class(cfg)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups (the release's decay rule); default: the network's own
        `param_groups(weight_decay)`."""
        return model.param_groups(weight_decay)

    def grad_clip_chunks(self, param: Tensor) -> int:
        """How many release tensors a parameter fuses (for per-tensor gradient clipping)."""
        return int(getattr(param, "release_chunks", 1))

    def start_epoch(self, model: nn.Module, loss: nn.Module, epoch: int) -> dict[str, float]:
        """The epoch hook: the training loop calls it for every method before each epoch
        (epochs count from 0; after a resume too, so a schedule must be a function of `epoch`).
        A method with phases switches them here; it returns what to log of them ({} here)."""
        return {}

    def is_release_checkpoint(self, ckpt: Mapping[str, Any]) -> bool:
        """True when `ckpt` (a weights_only-loaded dict) is in this method's release format."""
        return False

    def load_release(self, ckpt: Mapping[str, Any], base: Any) -> tuple[Any, dict[str, Tensor], dict]:
        """(config, our state dict, info {epoch, metrics, extra}) from a release checkpoint;
        `base` supplies what the release does not store. Raises KeyError/ValueError naming the
        first missing or mis-shaped tensor."""
        raise ValueError(f"{self.name}: no release checkpoint format is known")


# ---------------------------------------------------------------------------------------------
# The search part of the contract (prvr.search): optional. A network that has it can be indexed
# and searched; prvr.search asks for these names only and never names a method, and a network
# without them gets a one-line error from the index build.
#
#     vectors, mask = model.index_vectors(videos)     # stage 1: (B, n, D), (B, n) bool
#     q = model.index_queries(query)                  # (Nq, D)
#     stage-1 score of (query, video) = max over the video's real vectors of q . vector, an
#     approximation (or the exact value) of the method's score that ranks candidate videos
#     start, end = model.localize(query, videos, n_frames)   # (Nq, b) int64 each
#     the moment of each (query, video): rows [start, end) of the video's own features
#     (video2frames order, n_frames[j] rows; end exclusive)
#
# The rerank of the candidates is the method's own `score` (so a hit's score is evaluate's).


@runtime_checkable
class SearchableModel(Protocol):
    """The optional search part of a MethodModel."""

    def index_vectors(self, videos: VideoEncoding) -> tuple[Tensor, Tensor]:
        """Stage-1 vectors of B encoded videos: (B, n, D) and a (B, n) bool mask of the real
        ones. The candidate score of a video is the max of `index_queries(q) . v` over them."""

    def index_queries(self, query: Tensor | QueryEncoding) -> Tensor:
        """encode_queries' output for Nq queries -> (Nq, D) stage-1 query vectors."""

    def localize(self, query: Tensor, videos: VideoEncoding, n_frames: Tensor) -> tuple[Tensor, Tensor]:
        """The moment each query finds in each video: (start, end), each (Nq, b) int64 rows of
        the video's own features, end exclusive; n_frames (b,) int64 is each video's row count."""


SEARCH_PARTS = ("index_vectors", "index_queries", "localize")


def missing_search_parts(model: Any) -> list[str]:
    """The names of the search contract that `model` lacks (empty: it can be searched)."""
    return [name for name in SEARCH_PARTS if not callable(getattr(model, name, None))]


def clip_rows(first: Tensor, last: Tensor, n_frames: Tensor, n_clips: int) -> tuple[Tensor, Tensor]:
    """Feature rows [start, end) covered by clips first..last (inclusive) of the clip stream.

    The data side (prvr.data.datasets) builds clip i of a video with n rows from the bin edges
    e = min(rint(linspace(0, n, n_clips + 1)), n - 1): the mean of rows [e_i, e_i+1) when that
    is not empty, else the single row e_i. first, last: int64 (...,); n_frames broadcasts with
    them. Rounding is half to even, as numpy's rint (i * n / n_clips is exact in float64)."""
    n = n_frames.to(torch.float64)

    def edge(i: Tensor) -> Tensor:
        e = torch.round(i.to(torch.float64) * n / n_clips)
        return torch.minimum(e, n - 1).to(torch.int64)

    start = edge(first)
    lo, hi = edge(last), edge(last + 1)
    end = torch.where(hi > lo, hi, lo + 1)
    return start, torch.maximum(end, start + 1)


class ClipSearch:
    """The search contract for a network whose VideoEncoding holds its clip stream as
    fixed["clips"] (B, n_clips, H) and whose score's clip scale is the max cosine over those
    clips (GMMFormer v1 / v2, Holmes, RAL, Holmes-DQ): stage 1 indexes the normalised clips,
    and the moment is the best clip's rows."""

    def index_vectors(self, videos: VideoEncoding) -> tuple[Tensor, Tensor]:
        clips = torch.nn.functional.normalize(videos.fixed["clips"].float(), dim=-1)
        return clips, torch.ones(clips.shape[:2], dtype=torch.bool, device=clips.device)

    def index_queries(self, query: Tensor | QueryEncoding) -> Tensor:
        q = query.pooled if isinstance(query, QueryEncoding) else query
        return torch.nn.functional.normalize(q.float(), dim=-1)

    def localize(self, query: Tensor | QueryEncoding, videos: VideoEncoding, n_frames: Tensor
                 ) -> tuple[Tensor, Tensor]:
        vectors, _ = self.index_vectors(videos)
        best = torch.einsum("qh,bch->qbc", self.index_queries(query), vectors).argmax(-1)   # (Nq, b)
        return clip_rows(best, best, n_frames.to(best.device)[None, :], int(self.cfg.n_clips))
