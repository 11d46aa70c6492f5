"""GMMFormer v2 (arXiv 2405.13824): the reference network and its scores.

What it computes is docs/gmmformer_v2.md (the public release's behaviour):

* queries: input projection, position embedding, one post-norm self-attention layer (no output
  projection), attention pooling -> one vector per query;
* videos at two scales, 32 clips and up to 128 frames: input projection, position embedding and
  a temporal-consolidation block: K = 8 self-attention branches whose attention logits are
  multiplied by Gaussian windows of widths RELEASE_WIDTHS (None = global), fused per position by
  a learned weight token's cross-attention over the branch outputs;
* scores: max cosine over clips and over frames, clip_scale_w * clip + frame_scale_w * frame.

This is plain PyTorch on padded batches with masks. The K branches are one batched computation:
their parameters are stacked along a leading branch dimension (qkv (K, 3H, H), FFN (K, 4H, H) /
(K, H, 4H), norms (K, H)), which is also the state-dict layout; prvr.methods.gmmformer_v2.release
maps the release's per-branch tensors onto it. A parameter that fuses several release tensors
carries `release_chunks` (how many equal row blocks it is made of) so the optimiser reproduces the
release's per-tensor gradient clipping. The CPU fast path of the same network is
prvr.backends.cpu.gmmformer_v2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ClipSearch, ConfigFromDict, TrainOutput, VideoEncoding
from ..layers import InputProjection, PositionEmbedding, attention

RELEASE_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)


@dataclass
class GMMFormerBaseConfig(ConfigFromDict):
    """The network and the base objective terms, shared by GMMFormer v2 and the methods built on
    its encoder (Holmes)."""
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


@dataclass
class GMMFormerConfig(GMMFormerBaseConfig):
    oml: float = 0.09   # the optimal-matching (Hungarian) term's weight


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

def as_bool(mask: Tensor) -> Tensor:
    """A 0/1 float mask or a bool mask -> bool (True at real tokens)."""
    return mask if mask.dtype == torch.bool else mask > 0.5


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer without output projection, then its FFN (the query encoder).

    y = LN1(x + drop(attn(x))), out = LN2(y + drop(FFN(y))), FFN = Linear -> ReLU -> drop -> Linear.
    """

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        _mark(self.qkv.weight, 3), _mark(self.qkv.bias, 3)
        self.ffn_in = nn.Linear(hidden, 4 * hidden)
        self.ffn_out = nn.Linear(4 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, H), mask (B, L) bool -> (B, L, H)"""
        B, L, H = x.shape
        nh = self.n_heads
        q, k, v = self.qkv(x).view(B, L, 3, nh, H // nh).permute(2, 0, 3, 1, 4)  # each (B, nh, L, dh)
        ctx = attention(q, k, v, None, mask, self.drop).transpose(1, 2).reshape(B, L, H)
        y = self.norm1(x + self.drop(ctx))
        f = self.ffn_out(self.drop(F.relu(self.ffn_in(y))))
        return self.norm2(y + self.drop(f))


def branch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim of x (K, ..., H) with per-branch affine parameters (K, H)."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.view(shape) + bias.view(shape)


def branch_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-branch Linear: x (K, B, L, in) or (B, L, in) shared, weight (K, out, in), bias (K, out)
    -> (K, B, L, out)."""
    lhs = "kbli" if x.dim() == 4 else "bli"
    return torch.einsum(f"{lhs},koi->kblo", x, weight) + bias[:, None, None, :]


class GaussianBranches(nn.Module):
    """K post-norm self-attention layers (one per Gaussian width) as one batched layer.

    Branch k is EncoderLayer with its attention logits multiplied by the Gaussian window of
    width widths[k] (gaussian_matrix). Input (B, L, H); output (K, B, L, H).
    """

    def __init__(self, hidden: int, n_heads: int, widths: Sequence[float | None], max_len: int, p: float):
        super().__init__()
        K, H = len(widths), hidden
        self.n_heads, self.widths = n_heads, tuple(widths)
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
        self.drop = nn.Dropout(p)
        gauss = torch.stack([gaussian_matrix(max_len, w) for w in widths]).float()
        self.register_buffer("gauss", gauss, persistent=False)  # (K, max_len, max_len)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, L, H), mask (B, L) bool or None -> (K, B, L, H)"""
        B, L, H = x.shape
        K, nh = self.qkv_weight.shape[0], self.n_heads
        qkv = branch_linear(x, self.qkv_weight, self.qkv_bias)                  # (K, B, L, 3H)
        q, k, v = qkv.view(K, B, L, 3, nh, H // nh).permute(3, 0, 1, 4, 2, 5)   # each (K, B, nh, L, dh)
        gauss = self.gauss[:, None, None, :L, :L]   # a shorter stream uses the top-left corner
        ctx = attention(q, k, v, gauss, mask, self.drop).transpose(2, 3).reshape(K, B, L, H)
        y = branch_norm(x + self.drop(ctx), self.norm1_weight, self.norm1_bias)
        hidden = self.drop(F.relu(branch_linear(y, self.ffn_in_weight, self.ffn_in_bias)))
        f = branch_linear(hidden, self.ffn_out_weight, self.ffn_out_bias)
        return branch_norm(y + self.drop(f), self.norm2_weight, self.norm2_bias)


class WeightTokenAttention(nn.Module):
    """Post-norm cross-attention of one learned token over each branch's outputs.

    t = LN1(token + drop(attn(token, branch))), out = LN2(t + drop(FFN(t))) per branch and video;
    FFN = Linear(H, H) -> ReLU -> drop -> Linear(H, H). Padded positions take no weight.
    """

    def __init__(self, hidden: int, n_heads: int, p: float):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(hidden, 2 * hidden)
        _mark(self.key_value.weight, 2), _mark(self.key_value.bias, 2)
        self.ffn_in = nn.Linear(hidden, hidden)
        self.ffn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(p)

    def forward(self, token: Tensor, branches: Tensor, mask: Tensor | None) -> Tensor:
        """token (H,) shared or (B, H) per video, branches (K, B, L, H), mask (B, L) bool or
        None -> (K, B, H)"""
        K, B, L, H = branches.shape
        nh = self.n_heads
        q = self.query(token).view(1, -1, nh, 1, H // nh)                      # (1, 1 or B, nh, 1, dh)
        k, v = self.key_value(branches).view(K, B, L, 2, nh, H // nh).permute(3, 0, 1, 4, 2, 5)
        ctx = attention(q, k, v, None, mask, self.drop)                         # (K, B, nh, 1, dh)
        t = self.norm1(token + self.drop(ctx.reshape(K, B, H)))
        f = self.ffn_out(self.drop(F.relu(self.ffn_in(t))))
        return self.norm2(t + self.drop(f))


class TemporalConsolidation(nn.Module):
    """Gaussian branches + weight-token mixing of one stream (clips or frames).

    Each position's output is a softmax mixture (over branches, temperature sft_factor) of the
    branch outputs, its weights read off the weight token's per-branch summary. With token None
    the token is each video's mean of the branch outputs over branches and over all L positions,
    padded ones included (Holmes' data-dependent token).
    """

    def __init__(self, cfg: GMMFormerConfig, length: int):
        super().__init__()
        H = cfg.hidden_size
        self.branches = GaussianBranches(H, cfg.n_heads, cfg.widths, length, cfg.drop)
        self.token_attention = WeightTokenAttention(H, cfg.n_heads, cfg.drop)
        self.mix_hidden = nn.Linear(H, H)
        self.mix_out = nn.Linear(H, length)  # one logit per position and branch
        self.drop = nn.Dropout(cfg.drop)
        self.sft_factor = cfg.sft_factor

    def forward(self, x: Tensor, token: Tensor | None, mask: Tensor | None) -> Tensor:
        """x (B, L, H), token (H,) or None, mask (B, L) bool or None (all real) -> (B, L, H)"""
        L = x.shape[1]
        outs = self.branches(x, mask)                                           # (K, B, L, H)
        if token is None:
            token = outs.mean(0).mean(1)                                        # (B, H)
        t = self.token_attention(token, outs, mask)                             # (K, B, H)
        logits = self.mix_out(self.drop(F.relu(self.mix_hidden(t))))[..., :L]  # (K, B, L)
        mix = torch.softmax(logits / self.sft_factor, dim=0)                    # over branches
        return (outs * mix.unsqueeze(-1)).sum(0)


class GMMFormer(ClipSearch, nn.Module):
    # True: one learned weight token shared by both streams (GMMFormer v2). False: each video's
    # mean token (TemporalConsolidation with token None), for which every video's frames are
    # padded to max_frames slots before encoding, as the mean runs over all of them (Holmes).
    learned_token = True

    def __init__(self, cfg: GMMFormerBaseConfig | None = None):
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

        if self.learned_token:
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
        if self.learned_token:
            nn.init.normal_(self.weight_token, 0.0, 1.0)

    # ------------------------------------------------------------------ encoders
    def encode_query_feats(self, query_feats: Tensor, query_mask: Tensor) -> Tensor:
        """(Nq, Lq, Dt), (Nq, Lq) -> (Nq, H): the attention-pooled query encoding."""
        mask = as_bool(query_mask)
        x = self.query_pos(self.query_proj(query_feats))                        # (Nq, Lq, H)
        x = self.query_layer(x, mask)
        logits = self.query_pool(x).squeeze(-1).masked_fill(~mask, -1e10)      # (Nq, Lq)
        return torch.einsum("nl,nlh->nh", torch.softmax(logits, dim=1), x)

    def encode_video_feats(self, clip_feats: Tensor, frame_feats: Tensor, frame_mask: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """-> clips (B, n_clips, H), frames (B, Lf, H) zero at pads, frame_mask (B, Lf) bool
        (Lf = max_frames without a learned token)."""
        token = self.weight_token if self.learned_token else None
        clips = self.clip_pos(self.clip_proj(clip_feats))                       # (B, C, H)
        clips = self.clip_consolidation(clips, token, None)                     # every clip is real

        frame_mask = as_bool(frame_mask)
        slots = self.cfg.max_frames - frame_mask.shape[1]
        if slots < 0:
            raise ValueError(f"frame_feats has {frame_mask.shape[1]} frames; the model takes at most "
                             f"{self.cfg.max_frames}")
        if token is None and slots:
            frame_feats = F.pad(frame_feats, (0, 0, 0, slots))                 # zero frames
            frame_mask = F.pad(frame_mask, (0, slots))                          # ... masked
        frames = self.frame_pos(self.frame_proj(frame_feats))                   # (B, Lf, H)
        frames = self.frame_consolidation(frames, token, frame_mask)
        return clips, frames * frame_mask.unsqueeze(-1), frame_mask

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
                                        self.cfg.max_frames, raw=False)
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
    def undecayed_norm(self, name: str) -> bool:
        """A LayerNorm parameter of an input projection or position embedding."""
        return name.split(".")[0].endswith(("_proj", "_pos")) and ".norm." in name

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The release's decay rule: no decay for biases and for the LayerNorms of the
        input projections and position embeddings; decay for everything else (encoder
        norm1/norm2 weights included)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith("bias") or self.undecayed_norm(name) else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- scores

def pair_scores(query: Tensor, clips: Tensor, frames: Tensor, frame_mask: Tensor, max_frames: int = 128,
                raw: bool = True) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(clip, clip_raw, frame, frame_raw) scores, each (Nq, B).

    Max over clips / frames of cosine (and of the plain dot product, which only training's
    losses read: with raw=False those two are None and not computed). A video with fewer
    than `max_frames` real frames has zero vectors in its remaining slots (as the release
    pads every video to 128), so 0 is among its frame candidates.
    """
    frame_mask = as_bool(frame_mask)
    pad = (~frame_mask)[None]                                  # (1, B, Lf)
    short = (frame_mask.sum(1) < max_frames)[None]             # (1, B): 0 is a candidate

    def frame_max(s: Tensor) -> Tensor:   # (Nq, B, Lf) -> (Nq, B), padding out, 0 for short videos
        # the fill is the lowest value of the product's dtype (bf16 under autocast)
        s = s.masked_fill(pad, torch.finfo(s.dtype).min).amax(-1)
        return torch.where(short, s.clamp_min(0.0), s)

    qn = F.normalize(query, dim=-1)
    clip = torch.einsum("qh,bch->qbc", qn, F.normalize(clips, dim=-1)).amax(-1)
    frame = frame_max(torch.einsum("qh,bfh->qbf", qn, F.normalize(frames, dim=-1)))
    if not raw:
        return clip, None, frame, None
    clip_raw = torch.einsum("qh,bch->qbc", query, clips).amax(-1)
    frame_raw = frame_max(torch.einsum("qh,bfh->qbf", query, frames))
    return clip, clip_raw, frame, frame_raw
