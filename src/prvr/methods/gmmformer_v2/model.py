"""GMMFormer v2 (arXiv 2405.13824): the network and its scores.

What it computes is fixed by shared/spec/gmmformer_v2.md (the public release's behaviour):

* queries: input projection, position embedding, one post-norm self-attention layer, attention
  pooling -> one vector per query;
* videos at two scales, 32 clips and up to 128 frames: input projection, position embedding and
  a temporal-consolidation block: eight self-attention branches whose attention logits are
  multiplied by Gaussian windows of widths RELEASE_WIDTHS (None = global), fused per position by
  a learned weight token's cross-attention over the branch outputs;
* scores: max cosine over clips and over frames, 0.7 clip + 0.3 frame.

How it computes it is built for speed; the kernels that are speed only (packing, dropout,
custom autograd nodes) live in prvr.kernels. Design choices that stay here:

* The eight branches run as ONE batched computation: parameters stacked along a leading branch
  dimension (qkv (8, 3H, H), FFN (8, 4H, H) / (8, H, 4H), norms (8, H)).
* Token-wise work runs on packed real tokens; attention runs at the batch's own longest length
  (frame videos in up to three length buckets), using the top-left corner of the 128 x 128
  Gaussian. Exact: padded keys are masked after the Gaussian multiply.
* The weight token's query is the same for every branch and video, so it is folded into the key
  projection, and the value projection is applied after pooling.

Parameter layout differs from the release (stacked branches, fused q/k/v); prvr.methods.
gmmformer_v2.release maps a released state dict onto this one. Every parameter that fuses
several release tensors carries `release_chunks` (how many equal row blocks it is made of) so
the optimiser reproduces the release's per-tensor gradient clipping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels import (Tokens, _ScatterBuckets, add_dropout, as_bool, branch_layer_norm, branch_norm_ffn,
                        dropout, linear, norm_ffn, pool_tokens)
from ..base import ConfigFromDict, TrainOutput, VideoEncoding
from ..layers import InputProjection, PositionEmbedding, attention

RELEASE_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)


@dataclass
class GMMFormerConfig(ConfigFromDict):
    # network
    visual_dim: int = 3072
    text_dim: int = 768
    hidden_size: int = 384
    n_heads: int = 4
    max_query_len: int = 30
    max_frames: int = 128
    n_clips: int = 32
    clip_scale_w: float = 0.7
    frame_scale_w: float = 0.3
    init_std: float = 0.02
    sft_factor: float = 0.09
    input_drop: float = 0.2
    drop: float = 0.2
    widths: tuple = RELEASE_WIDTHS
    # objective (the release's loss_factor / neg_factor, named)
    margin: float = 0.1
    hard_pool_size: int = 20
    clip_nce: float = 0.05
    frame_nce: float = 0.04
    qdl: float = 8.0e-5
    oml: float = 0.09
    qdl_delta: float = 0.15
    qdl_alpha: float = 32.0
    qdl_lambda: float = 1.0

    def __post_init__(self) -> None:
        self.widths = tuple(None if w is None else float(w) for w in self.widths)
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
        if self.n_clips > self.max_frames:
            raise ValueError(f"n_clips {self.n_clips} exceeds max_frames {self.max_frames} "
                             "(the clip stream shares the 128-row position table size)")
        if not self.widths:
            raise ValueError("widths: need at least one branch")
        if int(self.hard_pool_size) < 1:
            raise ValueError(f"hard_pool_size: expected >= 1, got {self.hard_pool_size}")



# ----------------------------------------------------------------------------- helpers

def release_chunks(param: Tensor) -> int:
    """How many release tensors (equal row blocks, in order) a parameter is made of."""
    return int(getattr(param, "release_chunks", 1))


def _mark(param: nn.Parameter, chunks: int) -> nn.Parameter:
    param.release_chunks = chunks
    return param


def gaussian_matrix(length: int, width: float | None) -> Tensor:
    """(length, length) float64 Gaussian attention weights of one branch (ones for None).

    Row i is the normal density over column positions linspace(0, 1, L) around centre
    i / L with sigma = max(width, 0.01) / 9, divided by its row maximum.
    """
    if width is None:
        return torch.ones(length, length, dtype=torch.float64)
    centre = torch.arange(length, dtype=torch.float64).unsqueeze(1) / length
    pos = torch.linspace(0.0, 1.0, length, dtype=torch.float64).unsqueeze(0)
    sigma = max(float(width), 0.01) / 9.0
    # density / row max == exp(-(d^2 - min d^2) / (2 sigma^2)): the same numbers, but a row
    # whose densities all underflow (tiny L, narrow width) stays finite instead of 0 / 0.
    d2 = (pos - centre) ** 2
    return torch.exp(-(d2 - d2.min(dim=1, keepdim=True).values) / (2.0 * sigma ** 2))


# ----------------------------------------------------------------------------- modules

class EncoderLayer(nn.Module):
    """Post-norm self-attention layer without output projection (the query encoder)."""

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads, self.p = n_heads, p
        self.qkv = nn.Linear(hidden, 3 * hidden)
        _mark(self.qkv.weight, 3), _mark(self.qkv.bias, 3)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, tokens: Tokens) -> Tensor:
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = (t.squeeze(0) for t in tokens.qkv_heads(qkv, 1, self.n_heads))
        ctx = attention(q, k, v, None, tokens.key_mask_add(x.dtype), self.p, self.training)
        ctx = tokens.from_heads(ctx)
        y, f = norm_ffn(add_dropout(x, ctx, self.p, self.training), self.norm1, self.ffn_in, self.ffn_out,
                        self.p, self.training)                             # norm1 and the FFN
        return self.norm2(add_dropout(y, f, self.p, self.training))


class GaussianBranches(nn.Module):
    """K post-norm self-attention layers (one per Gaussian width) run as one batch.

    Input packed tokens (N, H); output (K, N, H).
    """

    def __init__(self, hidden: int, n_heads: int, widths: Sequence[float | None], max_len: int, p: float):
        super().__init__()
        K, H = len(widths), hidden
        self.n_heads, self.p, self.widths = n_heads, p, tuple(widths)
        self.qkv_weight = _mark(nn.Parameter(torch.empty(K, 3 * H, H)), 3 * K)
        self.qkv_bias = _mark(nn.Parameter(torch.zeros(K, 3 * H)), 3 * K)
        self.ffn_in_weight = _mark(nn.Parameter(torch.empty(K, 4 * H, H)), K)
        self.ffn_in_bias = _mark(nn.Parameter(torch.zeros(K, 4 * H)), K)
        self.ffn_out_weight = _mark(nn.Parameter(torch.empty(K, H, 4 * H)), K)
        self.ffn_out_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.norm1_weight = _mark(nn.Parameter(torch.ones(K, H)), K)
        self.norm1_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.norm2_weight = _mark(nn.Parameter(torch.ones(K, H)), K)
        self.norm2_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        gauss = torch.stack([gaussian_matrix(max_len, w) for w in widths]).float()
        self.register_buffer("gauss", gauss, persistent=False)  # (K, max_len, max_len)

    def forward(self, x: Tensor, tokens: Tokens) -> Tensor:
        K, H, nh = self.qkv_weight.shape[0], x.shape[-1], self.n_heads
        # Q, K, V of all branches in one matmul on packed tokens, then to (3, K, B, nh, L, dh).
        qkv = linear(x, self.qkv_weight.reshape(K * 3 * H, H), self.qkv_bias.reshape(-1))
        # attention per length bucket (one bucket = the whole batch at its longest length)
        groups = tokens.groups or [(0, tokens.count, tokens)]
        # every bucket's q, k, v in one autograd node whose backward writes one gradient
        heads = _ScatterBuckets.apply(qkv.view(-1, K, 3, nh, H // nh),
                                      [(t0, t1, *sub.scatter_spec()) for t0, t1, sub in groups])
        heads = [heads[i:i + 3] for i in range(0, len(heads), 3)]
        parts = []
        for (q, k, v), (_, _, sub) in zip(heads, groups):                 # each (K, b, nh, l, dh)
            gauss = self.gauss[:, None, None, :sub.length, :sub.length]
            ctx = attention(q, k, v, gauss, sub.key_mask_add(x.dtype), self.p, self.training)
            parts.append(sub.from_heads(ctx))                              # (K, n, H)
        ctx = parts[0] if len(parts) == 1 else torch.cat(parts, 1)         # (K, N, H)
        y, f = branch_norm_ffn(add_dropout(x, ctx, self.p, self.training), self.norm1_weight, self.norm1_bias,
                               self.ffn_in_weight, self.ffn_in_bias, self.ffn_out_weight, self.ffn_out_bias,
                               self.p, self.training)                      # LN1 and the FFN
        return branch_layer_norm(add_dropout(y, f, self.p, self.training), self.norm2_weight, self.norm2_bias)


class WeightTokenAttention(nn.Module):
    """Post-norm cross-attention of one token over each branch output, all branches at once.

    Its FFN is Linear(H, H) -> ReLU -> Dropout -> Linear(H, H).
    """

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads, self.p = n_heads, p
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        _mark(self.key_value.weight, 2), _mark(self.key_value.bias, 2)
        self.ffn_in = nn.Linear(hidden, hidden)
        self.ffn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, token: Tensor, branches: Tensor, tokens: Tokens) -> Tensor:
        """token (H,), branches (K, N, H) packed -> (K, B, H)."""
        K, H, nh = branches.shape[0], branches.shape[-1], self.n_heads
        B, L, dh = tokens.batch, tokens.length, H // nh
        w_k, w_v = self.key_value.weight.view(2, nh, dh, H).unbind(0)
        b_k, b_v = self.key_value.bias.view(2, nh, dh).unbind(0)
        q = self.query(token).view(nh, dh) / math.sqrt(dh)
        # scores[k, n, h] = q_h . (W_k o + b_k)_h, with q folded into the key projection.
        key_q = torch.einsum("hd,hdc->ch", q, w_k)                       # (H, nh)
        scores = torch.matmul(branches, key_q) + (q * b_k).sum(-1)       # (K, N, nh)
        fill = torch.finfo(scores.dtype).min
        scores = tokens.unpack(scores, dim=1, fill=fill).view(K, B, L, nh)
        probs = dropout(torch.softmax(scores, dim=2), self.p, self.training)  # (K, B, L, nh)
        pooled = pool_tokens(probs, branches, tokens)                         # (KB, nh, H)
        # values: W_v applied after pooling; the bias is weighted by the kept probability mass.
        ctx = torch.einsum("nhc,hdc->nhd", pooled, w_v) + probs.sum(2).view(K * B, nh, 1) * b_v
        t = self.norm1(add_dropout(token, ctx.reshape(K, B, H), self.p, self.training))
        f = self.ffn_out(dropout(self.ffn_in(t), self.p, self.training, relu=True))
        return self.norm2(add_dropout(t, f, self.p, self.training))


class TemporalConsolidation(nn.Module):
    """Gaussian branches + weight-token mixing of one stream (clips or frames)."""

    def __init__(self, cfg: GMMFormerConfig, length: int):
        super().__init__()
        H = cfg.hidden_size
        self.branches = GaussianBranches(H, cfg.n_heads, cfg.widths, length, cfg.drop)
        self.token_attention = WeightTokenAttention(H, cfg.n_heads, cfg.drop)
        self.mix_hidden = nn.Linear(H, H)
        self.mix_out = nn.Linear(H, length)  # one logit per position and branch
        self.p, self.sft_factor = cfg.drop, cfg.sft_factor

    def forward(self, x: Tensor, token: Tensor, tokens: Tokens) -> Tensor:
        """packed (N, H) -> packed (N, H)"""
        outs = self.branches(x, tokens)                                   # (K, N, H)
        t = self.token_attention(token, outs, tokens)                     # (K, B, H)
        h = dropout(self.mix_hidden(t), self.p, self.training, relu=True)
        L = tokens.length
        logits = F.linear(h, self.mix_out.weight[:L], self.mix_out.bias[:L])  # (K, B, L)
        mix = torch.softmax(logits / self.sft_factor, dim=0).reshape(len(outs), -1)
        if tokens.index is not None:
            mix = mix.index_select(1, tokens.index)                       # (K, N)
        return (outs * mix.unsqueeze(-1)).sum(0)  # (einsum would run N tiny matmuls here)


class GMMFormer(nn.Module):
    def __init__(self, cfg: GMMFormerConfig | None = None):
        super().__init__()
        cfg = cfg or GMMFormerConfig()
        self.cfg = cfg
        H = cfg.hidden_size
        self.query_proj = InputProjection(cfg.text_dim, H, cfg.input_drop)
        self.query_pos = PositionEmbedding(cfg.max_query_len, H, cfg.input_drop)
        self.query_layer = EncoderLayer(H, cfg.n_heads, cfg.drop)
        self.query_pool = nn.Linear(H, 1, bias=False)

        self.clip_proj = InputProjection(cfg.visual_dim, H, cfg.input_drop)
        self.clip_pos = PositionEmbedding(cfg.max_frames, H, cfg.input_drop)  # the release sizes it 128 too
        self.clip_consolidation = TemporalConsolidation(cfg, cfg.n_clips)

        self.frame_proj = InputProjection(cfg.visual_dim, H, cfg.input_drop)
        self.frame_pos = PositionEmbedding(cfg.max_frames, H, cfg.input_drop)
        self.frame_consolidation = TemporalConsolidation(cfg, cfg.max_frames)

        self.weight_token = nn.Parameter(torch.empty(H))  # shared by both streams
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear/Embedding weights N(0, init_std), biases 0, LayerNorms (1, 0), token N(0, 1)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, GaussianBranches):
                for name, p in module.named_parameters(recurse=False):
                    if name.startswith("norm") and name.endswith("weight"):
                        nn.init.ones_(p)
                    elif name.endswith("bias"):
                        nn.init.zeros_(p)
                    else:
                        nn.init.normal_(p, 0.0, std)
        nn.init.normal_(self.weight_token, 0.0, 1.0)

    # ------------------------------------------------------------------ encoders
    def encode_query_feats(self, query_feats: Tensor, query_mask: Tensor) -> Tensor:
        """(Nq, Lq, Dt), (Nq, Lq) -> (Nq, H)"""
        Nq, Lq = query_mask.shape
        tokens = Tokens(as_bool(query_mask), Nq, Lq, query_feats.device)
        flat = query_feats.reshape(Nq * Lq, -1)
        x = self.query_proj(flat, tokens.index)                           # (N, H) real tokens
        x = self.query_pos(x, tokens.positions)
        x = self.query_layer(x, tokens)                                   # (N, H)
        logits = tokens.unpack(self.query_pool(x).squeeze(1), fill=-1e10).view(Nq, Lq)
        attn = tokens.pack(torch.softmax(logits, dim=1).unsqueeze(-1))   # (N, 1)
        rows = torch.div(tokens.index, Lq, rounding_mode="floor") if tokens.index is not None \
            else torch.arange(Nq, device=x.device).repeat_interleave(Lq)
        return x.new_zeros(Nq, x.shape[1]).index_add(0, rows, attn * x)

    def encode_video_feats(self, clip_feats: Tensor, frame_feats: Tensor, frame_mask: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """-> clips (B, n_clips, H), frames (B, Lf, H) zero at pads, frame_mask (B, Lf) bool."""
        token = self.weight_token
        B, C = clip_feats.shape[:2]
        clip_tokens = Tokens(None, B, C, clip_feats.device)
        c = self.clip_pos(self.clip_proj(clip_tokens.pack(clip_feats)), clip_tokens.positions)
        clips = self.clip_consolidation(c, token, clip_tokens).view(B, C, -1)

        frame_mask = as_bool(frame_mask)
        Lf = frame_mask.shape[1]
        if Lf > self.cfg.max_frames:
            raise ValueError(f"frame_feats has {Lf} frames; the model takes at most {self.cfg.max_frames}")
        # attention runs at the batch's longest real length, not at the padded Lf
        used = frame_mask.any(0).nonzero()
        L = int(used.max()) + 1 if used.numel() else 1
        valid = frame_mask[:, :L]
        # videos sorted by real length (longest first) so attention can run in length buckets;
        # tokens are gathered straight from the inputs in that order and scattered back.
        ends = (valid * torch.arange(1, L + 1, device=valid.device)).amax(1)
        order = torch.argsort(ends, descending=True, stable=True)
        frame_tokens = Tokens(valid.index_select(0, order), B, L, frame_feats.device)
        frame_tokens.bucket()
        rows = frame_tokens.rows if frame_tokens.index is not None \
            else torch.arange(B, device=valid.device).repeat_interleave(L)
        source = order[rows] * Lf + frame_tokens.positions                # slots in (B, Lf)
        f = self.frame_proj(frame_feats.reshape(B * Lf, -1), source)      # (N, H) real tokens
        f = self.frame_pos(f, frame_tokens.positions)
        f = self.frame_consolidation(f, token, frame_tokens)
        frames = f.new_zeros(B * Lf, f.shape[-1]).index_copy(0, source, f).view(B, Lf, -1)
        return clips, frames, frame_mask

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
        clip, _, frame, _ = pair_scores(query, videos.fixed["clips"], videos.seq, videos.seq_mask,
                                        self.cfg.max_frames)
        return {"score": self.cfg.clip_scale_w * clip + self.cfg.frame_scale_w * frame,
                "clip": clip, "frame": frame}

    def train_scores(self, queries: Mapping[str, Tensor], videos: VideoEncoding) -> dict[str, Tensor]:
        """Cosine ("clip", "frame") and dot-product ("clip_raw", "frame_raw") maxima, (Nq, B)."""
        clip, clip_raw, frame, frame_raw = pair_scores(queries["query"], videos.fixed["clips"],
                                                       videos.seq, videos.seq_mask, self.cfg.max_frames)
        return {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw}

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        """Training forward, in the release's order: the videos (clips, then frames), then the
        queries, encoded a second time (own dropout draw) for the query-diverse and matching
        losses: queries["query_aux"]. (The order also lets the queries' small tensors reuse
        the memory the frame stream's large ones leave free.)"""
        videos = self.encode_videos(batch)
        queries = {"query": self.encode_queries(batch)}
        if self.training:
            queries["query_aux"] = self.encode_queries(batch)
        return TrainOutput(queries, videos, self.train_scores(queries, videos))

    # ------------------------------------------------------------------ optimiser
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The release's decay rule: no decay for biases and for the LayerNorms of the
        input projections and position embeddings; decay for everything else (encoder
        norm1/norm2 weights included)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            embed_norm = name.split(".")[0].endswith(("_proj", "_pos")) and ".norm." in name
            (no_decay if name.endswith("bias") or embed_norm else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- scores

def pair_scores(query: Tensor, clips: Tensor, frames: Tensor, frame_mask: Tensor, max_frames: int = 128
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(clip, clip_raw, frame, frame_raw) scores, each (Nq, B).

    Max over clips / frames of cosine (and of the plain dot product). A video with fewer
    than `max_frames` real frames has zero vectors in its remaining slots (as the release
    pads every video to 128), so 0 is among its frame candidates.
    """
    frame_mask = as_bool(frame_mask)
    qn = F.normalize(query, dim=-1)
    clip_raw = torch.einsum("qh,bch->qbc", query, clips).amax(-1)
    clip = torch.einsum("qh,bch->qbc", qn, F.normalize(clips, dim=-1)).amax(-1)
    pad = (~frame_mask)[None]                                  # (1, B, Lf)
    short = (frame_mask.sum(1) < max_frames)[None]             # (1, B): 0 is a candidate
    fr = torch.einsum("qh,bfh->qbf", query, frames)
    fn = torch.einsum("qh,bfh->qbf", qn, F.normalize(frames, dim=-1))
    # the fill is the lowest value of the product's dtype (bf16 under autocast)
    fr = fr.masked_fill(pad, torch.finfo(fr.dtype).min).amax(-1)
    fn = fn.masked_fill(pad, torch.finfo(fn.dtype).min).amax(-1)
    frame_raw = torch.where(short, fr.clamp_min(0.0), fr)
    frame = torch.where(short, fn.clamp_min(0.0), fn)
    return clip, clip_raw, frame, frame_raw
