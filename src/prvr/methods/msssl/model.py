"""MS-SL (Dong et al., ACM MM 2022, github HuiGuanLab/ms-sl): the reference network and its scores.

What it computes (the public release's behaviour):

* queries, 32 clips and up to 128 frames: input projection (LayerNorm, dropout, Linear, ReLU),
  learned position embedding, ONE post-norm self-attention layer (attention, output Linear,
  dropout, residual, LayerNorm; no FFN); queries are then attention-pooled to one vector;
* clip scale: proposals are the averages of the encoded clips over every window of 1..32
  consecutive clips (528 for 32 clips, ordered by window length, then start); the score is the
  max cosine between the query and a video's proposals, and the best proposal is the key clip;
* frame scale (key-clip guided attention): the key clip attends over the video's frames
  (keys/values are two bias-free Linears of the frames, no 1/sqrt(d) scaling) and the result's
  cosine with the query is the score;
* retrieval score clip_scale_w * clip + frame_scale_w * frame.

Training scores (`train_scores`) follow the release's training forward: clip scale (Nq, B) as
above (cosine and plain dot-product maxima), but the frame scale is query x query (Nq, Nq):
column j is query j's own video attended by query j's key clip, so other queries of the same
video are negatives of query i. That attended feature is computed where the labels are known
(`forward`) and travels with the queries (queries["frame_att"]), so a distributed caller can
gather it like any per-query tensor.

How the scores are computed (exact algebra, batched, on every backend):

* the proposals are one (528, 32) averaging matrix A: query-proposal dot products are
  (query . clips) @ A^T, proposal norms come from the clips' Gram matrices, and only the
  winning proposal of each (query, video) pair is rebuilt with gradient;
* the key-clip attention folds the key projection into the key clip (k . p = f . (p W_k)) and
  applies the value projection after pooling, so frames are never projected per query.

The encoders here are plain PyTorch on padded batches with masks; the CPU fast path of the same
network (packed real tokens, fused dropout) is prvr.backends.cpu.msssl. Parameter layout differs
from the release (fused q/k/v); prvr.methods.msssl.release maps it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ClipSearch, ConfigFromDict, TrainOutput, VideoEncoding, clip_rows
from ..layers import InputProjection, PositionEmbedding, key_mask_add

_EPS = 1e-12  # F.normalize's norm floor


@dataclass
class MSSLConfig(ConfigFromDict):
    # network
    visual_dim: int = 3072
    text_dim: int = 768
    hidden_size: int = 384
    n_heads: int = 4
    max_query_len: int = 30
    max_frames: int = 128
    n_clips: int = 32          # the release's map_size: clips per video, windows of 1..n_clips
    clip_scale_w: float = 0.7
    frame_scale_w: float = 0.3
    init_std: float = 0.02
    input_drop: float = 0.1
    drop: float = 0.1
    # objective
    margin: float = 0.2
    hard_pool_size: int = 20
    clip_nce: float = 0.02
    frame_nce: float = 0.04

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
        if not 1 <= self.n_clips <= self.max_frames:
            raise ValueError(f"n_clips {self.n_clips} must be in 1..max_frames ({self.max_frames}): "
                             "the clip stream uses a max_frames-row position table")
        if int(self.hard_pool_size) < 1:
            raise ValueError(f"hard_pool_size: expected >= 1, got {self.hard_pool_size}")



def proposal_matrix(n_clips: int) -> Tensor:
    """(P, n_clips) averaging matrix, P = n_clips (n_clips + 1) / 2: row r averages the clips of
    window r, windows ordered by length 1..n_clips, then by start (the release's order)."""
    cpu = torch.device("cpu")  # also when a model is built under torch.device("meta")
    lengths = torch.arange(1, n_clips + 1, device=cpu)
    count = n_clips + 1 - lengths                                    # windows of each length
    length = torch.repeat_interleave(lengths, count)                 # (P,)
    first_row = torch.cumsum(count, 0) - count                       # row of each length's first window
    start = torch.arange(len(length), device=cpu) - torch.repeat_interleave(first_row, count)
    col = torch.arange(n_clips, device=cpu)[None]
    inside = (col >= start[:, None]) & (col < (start + length)[:, None])
    return inside.float() / length[:, None].float()


def as_bool(mask: Tensor) -> Tensor:
    """A 0/1 float mask or a bool mask -> bool (True at real tokens)."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def _mark(param: nn.Parameter, chunks: int) -> nn.Parameter:
    param.release_chunks = chunks  # equal row blocks = release tensors (per-tensor clipping)
    return param


# ----------------------------------------------------------------------------- modules

class AttentionLayer(nn.Module):
    """The release's BertAttention: multi-head self-attention (additive -10000 key mask,
    dropout on the probabilities), output Linear, dropout, residual, LayerNorm."""

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        _mark(self.qkv.weight, 3), _mark(self.qkv.bias, 3)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, L, H), mask (B, L) bool or None (all real) -> (B, L, H)"""
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, L, dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + key_mask_add(mask, scores.dtype)
        probs = self.drop(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, L, H)
        return self.norm(x + self.drop(self.out(ctx)))


class Stream(nn.Module):
    """Input projection -> position embedding -> attention layer of one input stream."""

    def __init__(self, in_dim: int, n_positions: int, cfg: MSSLConfig):
        super().__init__()
        H = cfg.hidden_size
        self.proj = InputProjection(in_dim, H, cfg.input_drop)
        self.pos = PositionEmbedding(n_positions, H, cfg.input_drop)
        self.encoder = AttentionLayer(H, cfg.n_heads, cfg.drop)

    def forward(self, feats: Tensor, mask: Tensor | None) -> Tensor:
        """(B, L, D_in), mask (B, L) bool or None -> (B, L, H)"""
        return self.encoder(self.pos(self.proj(feats)), mask)


# ----------------------------------------------------------------------------- scores

def clip_scale(query: Tensor, clips: Tensor, A: Tensor, raw: bool = False) -> dict[str, Tensor]:
    """Clip-scale scores of queries (Nq, H) against videos' encoded clips (b, C, H), each (Nq, b):
    "clip" (max cosine over the proposals A @ clips), "key" (its proposal index) and, with
    raw=True, "clip_raw" (max plain dot product, its own argmax)."""
    qc = torch.einsum("qh,bch->qbc", query, clips)                    # (Nq, b, C)
    gram = torch.matmul(clips, clips.transpose(1, 2))                  # (b, C, C)
    pnorm = (torch.matmul(A, gram) * A).sum(-1).clamp_min(0.0).sqrt()  # (b, P) proposal norms
    with torch.no_grad():  # which proposal wins; the winners are rebuilt below with gradient
        dots = torch.matmul(qc, A.t())                                 # (Nq, b, P)
        key = (dots / pnorm.clamp_min(_EPS)).argmax(-1)                # |q| does not change it
        raw_key = dots.argmax(-1) if raw else None
        del dots
    cols = torch.arange(clips.shape[0], device=clips.device)
    qnorm = query.norm(dim=-1).clamp_min(_EPS)[:, None]
    out = {"clip": (qc * A[key]).sum(-1) / (qnorm * pnorm[cols, key].clamp_min(_EPS)), "key": key}
    if raw:
        out["clip_raw"] = (qc * A[raw_key]).sum(-1)
    return out


def clip_scale_own(query: Tensor, own_clips: Tensor, A: Tensor) -> Tensor:
    """(Nq,) index of each query's max-cosine proposal in its own video's clips (Nq, C, H)."""
    qc = torch.einsum("qh,qch->qc", query, own_clips)                  # (Nq, C)
    gram = torch.matmul(own_clips, own_clips.transpose(1, 2))           # (Nq, C, C)
    pnorm = (torch.matmul(A, gram) * A).sum(-1).clamp_min(0.0).sqrt()   # (Nq, P)
    return (torch.matmul(qc, A.t()) / pnorm.clamp_min(_EPS)).argmax(-1)


def key_clip_attention(key_clips: Tensor, frames: Tensor, frame_mask: Tensor, w_key: Tensor,
                       w_value: Tensor) -> Tensor:
    """Key-clip guided attention: key clips (b, n, H) attend over their video's frames
    (b, L, H), frame_mask (b, L) -> (b, n, H) = softmax_l(p . W_k f_l) W_v f_l.
    W_k is folded into the key clip, W_v applied after pooling (same numbers, less work)."""
    logits = torch.matmul(torch.matmul(key_clips, w_key), frames.transpose(1, 2))  # (b, n, L)
    logits = logits.masked_fill(~frame_mask[:, None, :], torch.finfo(logits.dtype).min)
    pooled = torch.matmul(torch.softmax(logits, dim=-1), frames)                    # (b, n, H)
    return F.linear(pooled, w_value)


def _video_slots(labels: Tensor, n_videos: int) -> tuple[Tensor, int]:
    """(slot of each query among its video's queries (Nq,), most queries of one video)."""
    counts = torch.bincount(labels, minlength=n_videos)
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(labels)
    slot[order] = torch.arange(labels.numel(), device=labels.device) - starts[labels[order]]
    return slot, int(counts.max()) if labels.numel() else 0


# ----------------------------------------------------------------------------- the network

class MSSL(ClipSearch, nn.Module):
    def __init__(self, cfg: MSSLConfig | None = None):
        super().__init__()
        cfg = cfg or MSSLConfig()
        self.cfg = cfg
        H = cfg.hidden_size
        self.query = Stream(cfg.text_dim, cfg.max_query_len, cfg)
        self.query_pool = nn.Linear(H, 1, bias=False)
        self.clip = Stream(cfg.visual_dim, cfg.max_frames, cfg)   # the release sizes it max_ctx_l
        self.frame = Stream(cfg.visual_dim, cfg.max_frames, cfg)
        self.key_proj = nn.Linear(H, H, bias=False)               # key-clip attention keys
        self.value_proj = nn.Linear(H, H, bias=False)             # and values
        self.register_buffer("proposals", proposal_matrix(cfg.n_clips), persistent=False)  # (P, C)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear/Embedding weights N(0, init_std), biases 0, LayerNorms (1, 0) (the release's)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ encoders
    def encode_query_feats(self, query_feats: Tensor, query_mask: Tensor) -> Tensor:
        """(Nq, Lq, Dt), (Nq, Lq) -> (Nq, H): attention pooling over the real tokens."""
        if query_mask.shape[1] > self.cfg.max_query_len:
            raise ValueError(f"query_feats has {query_mask.shape[1]} tokens; the model takes at most "
                             f"{self.cfg.max_query_len}")
        mask = as_bool(query_mask)
        x = self.query(query_feats, mask)                                        # (Nq, Lq, H)
        logits = self.query_pool(x).squeeze(-1).masked_fill(~mask, -1e10)       # (Nq, Lq)
        return torch.einsum("nl,nlh->nh", torch.softmax(logits, dim=1), x)

    def encode_video_feats(self, clip_feats: Tensor, frame_feats: Tensor, frame_mask: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """-> clips (B, n_clips, H), frames (B, Lf, H) zero at pads, frame_mask (B, Lf) bool."""
        self._check_video_shapes(clip_feats, frame_mask)
        clips = self.clip(clip_feats, None)                                      # every clip is real
        frame_mask = as_bool(frame_mask)
        frames = self.frame(frame_feats, frame_mask) * frame_mask.unsqueeze(-1)
        return clips, frames, frame_mask

    def _check_video_shapes(self, clip_feats: Tensor, frame_mask: Tensor) -> None:
        if clip_feats.shape[1] != self.cfg.n_clips:
            raise ValueError(f"clip_feats has {clip_feats.shape[1]} clips; the model is configured for "
                             f"{self.cfg.n_clips}")
        if frame_mask.shape[1] > self.cfg.max_frames:
            raise ValueError(f"frame_feats has {frame_mask.shape[1]} frames; the model takes at most "
                             f"{self.cfg.max_frames}")

    # ------------------------------------------------------------------ the method contract
    def encode_queries(self, batch: Mapping[str, Any]) -> Tensor:
        """query batch -> (Nq, H)"""
        return self.encode_query_feats(batch["query_feats"], batch["query_mask"])

    def encode_videos(self, batch: Mapping[str, Any]) -> VideoEncoding:
        """video batch -> clips (B, n_clips, H) and frames (B, Lf, H) zero at pads."""
        clips, frames, mask = self.encode_video_feats(batch["clip_feats"], batch["frame_feats"],
                                                      batch["frame_mask"])
        return VideoEncoding({"clips": clips}, frames, mask)

    def score(self, query: Tensor, videos: VideoEncoding) -> dict[str, Tensor]:
        """{"score": clip_scale_w * clip + frame_scale_w * frame, "clip", "frame"}, each (Nq, b)."""
        clips, A = videos.fixed["clips"], self.proposals
        s = clip_scale(query, clips, A)
        key_clips = torch.matmul(A[s["key"]].transpose(0, 1), clips)          # (b, Nq, H)
        att = key_clip_attention(key_clips, videos.seq, as_bool(videos.seq_mask),
                                 self.key_proj.weight, self.value_proj.weight)
        frame = (F.normalize(att, dim=-1) * F.normalize(query, dim=-1)[None]).sum(-1).t()
        return {"score": self.cfg.clip_scale_w * s["clip"] + self.cfg.frame_scale_w * frame,
                "clip": s["clip"], "frame": frame}

    def localize(self, query: Tensor, videos: VideoEncoding, n_frames: Tensor) -> tuple[Tensor, Tensor]:
        """The moment is the key clip: the best proposal's window of clips, as feature rows."""
        key = clip_scale(query, videos.fixed["clips"], self.proposals)["key"]    # (Nq, b)
        window = self.proposals[key] > 0                                       # (Nq, b, C)
        C = window.shape[-1]
        pos = torch.arange(C, device=key.device)
        first = torch.where(window, pos, C).amin(-1)
        last = torch.where(window, pos, -1).amax(-1)
        return clip_rows(first, last, n_frames.to(key.device)[None, :], int(self.cfg.n_clips))

    def own_frame_features(self, query: Tensor, videos: VideoEncoding, labels: Tensor) -> Tensor:
        """(Nq, H): each query's own video (labels) attended by that query's key clip."""
        clips, A = videos.fixed["clips"], self.proposals
        own = clips.index_select(0, labels)                                   # (Nq, C, H)
        with torch.no_grad():
            key = clip_scale_own(query, own, A)
        slot, max_q = _video_slots(labels, clips.shape[0])
        key_clips = torch.matmul(A[key].unsqueeze(1), own).squeeze(1)         # (Nq, H)
        per_video = key_clips.new_zeros(clips.shape[0], max_q, key_clips.shape[1])
        per_video = per_video.index_put((labels, slot), key_clips)            # (B, max_q, H)
        att = key_clip_attention(per_video, videos.seq, as_bool(videos.seq_mask),
                                 self.key_proj.weight, self.value_proj.weight)
        return att[labels, slot]

    def train_scores(self, queries: Mapping[str, Tensor], videos: VideoEncoding) -> dict[str, Tensor]:
        """"clip", "clip_raw" (Nq, B): max cosine / dot product over proposals; "frame",
        "frame_raw" (Nq, Nq): cosine / dot product of query i with query j's frame_att."""
        q, att = queries["query"], queries["frame_att"]
        s = clip_scale(q, videos.fixed["clips"], self.proposals, raw=True)
        return {"clip": s["clip"], "clip_raw": s["clip_raw"],
                "frame": F.normalize(q, dim=-1) @ F.normalize(att, dim=-1).t(), "frame_raw": q @ att.t()}

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        """Training forward: queries {"query", "frame_att"}, videos, train_scores."""
        q = self.encode_queries(batch)
        videos = self.encode_videos(batch)
        labels = batch["query_labels"].to(q.device).long()
        queries = {"query": q, "frame_att": self.own_frame_features(q, videos, labels)}
        return TrainOutput(queries, videos, self.train_scores(queries, videos))

    # ------------------------------------------------------------------ optimiser
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The release's decay rule: no decay for biases and LayerNorm weights; decay for the
        rest (Linear and Embedding weights)."""
        norms = {id(p) for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith("bias") or id(p) in norms else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

