"""GMMFormer v1 (Wang et al., AAAI 2024; github huangmozhi9527/GMMFormer): the reference network.

What it computes is the public release's behaviour:

* queries: input projection (LayerNorm -> dropout -> Linear -> ReLU), position embedding, one
  post-norm self-attention layer (no feed-forward), attention pooling -> one vector per query;
* videos at two scales, each an input projection, a position embedding and two GMM blocks:
  32 clips -> 32 clip vectors; up to 128 frames -> attention pooling -> one frame vector.
  A GMM block is the mean of four post-norm self-attention branches (no feed-forward), whose
  scaled attention logits are multiplied by Gaussian windows of widths (None = global, 0.5, 1,
  5): row i is the normal density over positions linspace(0, 1, L) around i / L with
  sigma = width / 9, divided by its row maximum; padded keys are masked after the multiply;
* scores: 0.7 * max cosine over the clips + 0.3 * cosine with the frame vector.

Batch dependence (the release's, reproduced by default): the frame windows are built for L =
the longest real frame count in the batch, so a video's frame vector depends on the other
videos it is encoded with (release evaluation: 100 videos a batch, in caption-file order).
`own_length_windows=True` builds each video's windows from its own frame count instead; then
neither the batch nor its padding changes a video's encoding.

This is plain PyTorch on padded batches with masks. The four branches of a block are one
batched computation (stacked q/k/v, output and LayerNorm parameters, also the state-dict
layout). The frame stream is cut to the batch's longest real length, which the windows need
anyway. Parameters that fuse several release tensors carry `release_chunks` (equal row blocks)
so the optimiser clips gradients per release tensor. The CPU fast path of the same network
(packed real tokens, length buckets, fused dropout) is prvr.backends.cpu.gmmformer_v1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ClipSearch, ConfigFromDict, TrainOutput, VideoEncoding
from ..layers import InputProjection, PositionEmbedding, attention

RELEASE_WIDTHS = (None, 0.5, 1.0, 5.0)
MASK_ADD = -10000.0  # the release's additive key mask
POOL_FILL = -1e10    # the release's masked pooling logit


@dataclass
class GMMFormerV1Config(ConfigFromDict):
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
    input_drop: float = 0.2
    drop: float = 0.2
    widths: tuple = RELEASE_WIDTHS
    own_length_windows: bool = False  # True: frame windows from each video's own length
    # objective (the release's margin, loss_factor and neg_factor, named)
    margin: float = 0.1
    hard_pool_size: int = 20
    clip_nce: float = 0.05
    frame_nce: float = 0.04
    qdl: float = 0.001
    qdl_margin: float = 0.15
    qdl_alpha: float = 32.0

    def __post_init__(self) -> None:
        self.widths = tuple(None if w is None else float(w) for w in self.widths)
        self.own_length_windows = bool(self.own_length_windows)
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
        if self.n_clips > self.max_frames:
            raise ValueError(f"n_clips {self.n_clips} exceeds max_frames {self.max_frames} "
                             "(the clip stream's position table has max_frames rows)")
        if not self.widths:
            raise ValueError("widths: need at least one branch")
        if int(self.hard_pool_size) < 1:
            raise ValueError(f"hard_pool_size: expected >= 1, got {self.hard_pool_size}")



# ----------------------------------------------------------------------------- helpers

def _mark(param: nn.Parameter, chunks: int) -> nn.Parameter:
    param.release_chunks = chunks  # how many release tensors (equal row blocks) it fuses
    return param


def gaussian_windows(lengths: Tensor, size: int, widths: Sequence[float | None]) -> Tensor:
    """(K, n, size, size) float32 windows of n sequences of the given lengths (<= size).

    For length L, row i is exp(-(p_j - i/L)^2 / (2 sigma^2)) over p = linspace(0, 1, L),
    sigma = max(width, 0.01) / 9, divided by its maximum over j < L (the release's window;
    ones for width None). Entries at j >= L or i >= L are in [0, 1] but otherwise unspecified
    (callers mask them).
    """
    L = lengths.to(torch.float64).clamp_min(1).view(-1, 1, 1)                # (n, 1, 1)
    idx = torch.arange(size, dtype=torch.float64, device=lengths.device)
    centre = idx.view(1, -1, 1) / L                                          # (n, size, 1)
    pos = idx.view(1, 1, -1) / (L - 1).clamp_min(1)                          # (n, 1, size)
    d2 = (pos - centre) ** 2
    d2_min = d2.masked_fill(idx.view(1, 1, -1) >= L, math.inf).amin(-1, keepdim=True)
    out = []
    for w in widths:  # K <= 4 small tensors, built without gradient
        if w is None:
            out.append(torch.ones_like(d2))
        else:
            sigma = max(float(w), 0.01) / 9.0
            out.append(torch.exp(-(d2 - d2_min).clamp_min(0.0) / (2.0 * sigma ** 2)))
    return torch.stack(out).float()


def _branch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm of (K, ..., H) with per-branch affine parameters (K, H)."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:]), weight.view(shape))


def as_bool(mask: Tensor) -> Tensor:
    """A 0/1 float mask or a bool mask -> bool (True at real tokens)."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def masked_pool(x: Tensor, mask: Tensor, linear: nn.Linear) -> Tensor:
    """Attention pooling (B, L, H), mask (B, L) -> (B, H); padded slots get logit POOL_FILL
    (weight exactly 0), as in the release."""
    logits = linear(x).squeeze(-1).masked_fill(~mask, POOL_FILL)
    return torch.einsum("bl,blh->bh", torch.softmax(logits, dim=1), x)


# ----------------------------------------------------------------------------- modules

class AttentionBranches(nn.Module):
    """K post-norm self-attention layers without feed-forward, run as one batch:
    LN_k(x + Dropout(Dense_k(softmax(scaled q_k k_k^T * G_k + mask) v_k))). K = 1 with no
    window is the query encoder."""

    def __init__(self, hidden: int, n_heads: int, branches: int, p: float):
        super().__init__()
        K, H = branches, hidden
        self.n_heads = n_heads
        self.qkv_weight = _mark(nn.Parameter(torch.empty(K, 3 * H, H)), 3 * K)
        self.qkv_bias = _mark(nn.Parameter(torch.zeros(K, 3 * H)), 3 * K)
        self.out_weight = _mark(nn.Parameter(torch.empty(K, H, H)), K)
        self.out_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.norm_weight = _mark(nn.Parameter(torch.ones(K, H)), K)
        self.norm_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.drop = nn.Dropout(p)

    def forward(self, x: Tensor, mask: Tensor | None, gauss: Tensor | None) -> Tensor:
        """x (B, L, H), mask (B, L) bool or None, gauss (K, B or 1, 1, L, L) or None -> (K, B, L, H)"""
        B, L, H = x.shape
        K, nh = self.qkv_weight.shape[0], self.n_heads
        qkv = torch.einsum("blh,kch->kblc", x, self.qkv_weight) + self.qkv_bias[:, None, None]
        q, k, v = qkv.view(K, B, L, 3, nh, H // nh).permute(3, 0, 1, 4, 2, 5)   # each (K, B, nh, L, dh)
        ctx = attention(q, k, v, gauss, mask, self.drop).transpose(2, 3).reshape(K, B, L, H)
        out = torch.einsum("kblh,koh->kblo", ctx, self.out_weight) + self.out_bias[:, None, None]
        return _branch_layer_norm(x + self.drop(out), self.norm_weight, self.norm_bias)


class GMMBlock(nn.Module):
    """Mean of the Gaussian-window attention branches."""

    def __init__(self, cfg: GMMFormerV1Config):
        super().__init__()
        self.widths = cfg.widths
        self.attn = AttentionBranches(cfg.hidden_size, cfg.n_heads, len(cfg.widths), cfg.drop)

    def forward(self, x: Tensor, mask: Tensor | None, gauss: Tensor | None) -> Tensor:
        """(B, L, H) -> (B, L, H); see AttentionBranches.forward."""
        return self.attn(x, mask, gauss).mean(0)


class GMMFormer(ClipSearch, nn.Module):
    def __init__(self, cfg: GMMFormerV1Config | None = None):
        super().__init__()
        cfg = cfg or GMMFormerV1Config()
        self.cfg = cfg
        H, p_in = cfg.hidden_size, cfg.input_drop
        self.query_proj = InputProjection(cfg.text_dim, H, p_in)
        self.query_pos = PositionEmbedding(cfg.max_query_len, H, p_in)
        self.query_layer = AttentionBranches(H, cfg.n_heads, 1, cfg.drop)
        self.query_pool = nn.Linear(H, 1, bias=False)

        self.clip_proj = InputProjection(cfg.visual_dim, H, p_in)
        self.clip_pos = PositionEmbedding(cfg.max_frames, H, p_in)  # the release sizes it max_ctx_l
        self.clip_block1 = GMMBlock(cfg)
        self.clip_block2 = GMMBlock(cfg)

        self.frame_proj = InputProjection(cfg.visual_dim, H, p_in)
        self.frame_pos = PositionEmbedding(cfg.max_frames, H, p_in)
        self.frame_block1 = GMMBlock(cfg)
        self.frame_block2 = GMMBlock(cfg)
        self.frame_pool = nn.Linear(H, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights N(0, init_std), biases 0, LayerNorms (1, 0), as the release initialises."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ encoders
    def encode_query_feats(self, query_feats: Tensor, query_mask: Tensor, copies: int = 1) -> Tensor:
        """(Nq, Lq, Dt), (Nq, Lq) -> (copies * Nq, H): `copies` encodings of the queries in one
        pass (each its own dropout draw in training)."""
        mask = as_bool(query_mask).repeat(copies, 1)
        x = self.query_pos(self.query_proj(query_feats.repeat(copies, 1, 1)))       # (copies Nq, Lq, H)
        x = self.query_layer(x, mask, None).squeeze(0)
        return masked_pool(x, mask, self.query_pool)

    def encode_clips(self, clip_feats: Tensor) -> Tensor:
        """(B, n_clips, Dv) -> (B, n_clips, H); windows for n_clips positions."""
        C = clip_feats.shape[1]
        x = self.clip_pos(self.clip_proj(clip_feats))
        gauss = gaussian_windows(torch.tensor([C], device=x.device), C, self.cfg.widths)
        gauss = gauss.to(x.dtype)[:, :, None]                                        # (K, 1, 1, C, C)
        return self.clip_block2(self.clip_block1(x, None, gauss), None, gauss)

    def encode_frames(self, frame_feats: Tensor, frame_mask: Tensor) -> Tensor:
        """(B, Lf, Dv), (B, Lf) -> (B, H) pooled frame vectors (see the module docstring for
        the windows' batch dependence)."""
        mask = as_bool(frame_mask)
        if mask.shape[1] > self.cfg.max_frames:
            raise ValueError(f"frame_feats has {mask.shape[1]} frames; the model takes at most "
                             f"{self.cfg.max_frames}")
        ends = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(1).clamp_min(1)
        L = int(ends.max())                     # the windows are built for the longest real length
        mask, x = mask[:, :L], self.frame_pos(self.frame_proj(frame_feats[:, :L]))   # (B, L, H)
        lengths = ends if self.cfg.own_length_windows else ends.new_tensor([L])
        gauss = gaussian_windows(lengths, L, self.cfg.widths).to(x.dtype)[:, :, None]  # (K, B or 1, 1, L, L)
        x = self.frame_block2(self.frame_block1(x, mask, gauss), mask, gauss)
        return masked_pool(x, mask, self.frame_pool)

    # ------------------------------------------------------------------ the method contract
    def encode_queries(self, batch: Mapping[str, Any]) -> Tensor:
        """query batch -> (Nq, H)"""
        return self.encode_query_feats(batch["query_feats"], batch["query_mask"])

    def encode_videos(self, batch: Mapping[str, Any]) -> VideoEncoding:
        """video batch -> fixed {"clips": (B, n_clips, H), "frame_vec": (B, H)}."""
        clips = self.encode_clips(batch["clip_feats"])
        frame_vec = self.encode_frames(batch["frame_feats"], batch["frame_mask"])
        return VideoEncoding({"clips": clips, "frame_vec": frame_vec})

    def score(self, query: Tensor, videos: VideoEncoding) -> dict[str, Tensor]:
        """{"score": clip_scale_w * clip + frame_scale_w * frame, "clip", "frame"}, each (Nq, b)."""
        clip, _, frame, _ = pair_scores(query, videos.fixed["clips"], videos.fixed["frame_vec"], raw=False)
        return {"score": self.cfg.clip_scale_w * clip + self.cfg.frame_scale_w * frame,
                "clip": clip, "frame": frame}

    def train_scores(self, queries: Mapping[str, Tensor], videos: VideoEncoding) -> dict[str, Tensor]:
        """Cosine ("clip", "frame") and dot-product ("clip_raw", "frame_raw") scores, (Nq, B)."""
        clip, clip_raw, frame, frame_raw = pair_scores(queries["query"], videos.fixed["clips"],
                                                       videos.fixed["frame_vec"])
        return {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw}

    def forward(self, batch: Mapping[str, Any]) -> TrainOutput:
        """Training forward. As the release does, the queries are encoded a second time (own
        dropout draw; here in the same pass) for the query-diverse loss: queries["query_aux"]."""
        feats, mask = batch["query_feats"], batch["query_mask"]
        if self.training:
            both = self.encode_query_feats(feats, mask, copies=2)
            queries = dict(zip(("query", "query_aux"), both.chunk(2)))
        else:
            queries = {"query": self.encode_query_feats(feats, mask)}
        videos = self.encode_videos(batch)
        return TrainOutput(queries, videos, self.train_scores(queries, videos))

    # ------------------------------------------------------------------ optimiser
    def param_groups(self, weight_decay: float) -> list[dict]:
        """The release's rule: no decay for biases and LayerNorm parameters, decay otherwise."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- scores

def pair_scores(query: Tensor, clips: Tensor, frame_vec: Tensor, raw: bool = True
                ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(clip, clip_raw, frame, frame_raw), each (Nq, B): max over clips of the cosine (and of
    the dot product); cosine (and dot product) with the pooled frame vector. The dot products
    are for training's losses only: with raw=False they are None and not computed."""
    qn = F.normalize(query, dim=-1)
    clip = torch.einsum("qh,bch->qbc", qn, F.normalize(clips, dim=-1)).amax(-1)
    frame = qn @ F.normalize(frame_vec, dim=-1).t()
    if not raw:
        return clip, None, frame, None
    clip_raw = torch.einsum("qh,bch->qbc", query, clips).amax(-1)
    frame_raw = query @ frame_vec.t()
    return clip, clip_raw, frame, frame_raw
