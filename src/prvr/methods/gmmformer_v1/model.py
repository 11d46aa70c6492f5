"""GMMFormer v1 (Wang et al., AAAI 2024; github huangmozhi9527/GMMFormer): network and scores.

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

Speed (the kernels are prvr.kernels'): the four branches of a block run as one batched
computation (stacked q/k/v, output and LayerNorm parameters); every dense layer (input
projections, q/k/v, output projections, LayerNorms) runs on packed real tokens only; q/k/v
are scattered straight into the padded attention layout (`_ScatterBuckets`) and attention
runs per group: the queries at their longest length, the frame stream in up to four length
buckets (videos sorted by length, each bucket padded to its own longest video). Exact:
padded keys get weight exp(-10000) = 0 and padded slots are never read back.
Parameters that fuse several release tensors carry `release_chunks` (equal row blocks) so the
optimiser clips gradients per release tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ConfigFromDict, TrainOutput, VideoEncoding
from ...kernels import (Tokens, _ScatterBuckets, add_dropout, as_bool, dropout, dropout_unscaled,
                       gather_heads)
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


def length_buckets(lengths: Sequence[int], max_groups: int = 4, overhead: float = 0.02,
                   attn_tokens: float = 960.0) -> list[tuple[int, int]]:
    """Cut lengths sorted in descending order into <= max_groups contiguous [a, b) ranges,
    each padded to its first (longest) length, minimising sum b*l*(1 + l/attn_tokens) (linear
    work + attention) plus `overhead` of the unbucketed cost per range (dynamic programme)."""
    e = np.asarray(lengths, dtype=np.float64)
    n = len(e)
    if n < 2:
        return [(0, n)]
    w = e * (1.0 + e / attn_tokens)                                          # cost per video
    a, b = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    cost = np.where(b > a, (b - a) * np.append(w, 0.0)[:, None] + overhead * n * w[0], np.inf)
    f = np.full(n + 1, np.inf)
    f[0] = 0.0                                                               # [0, 0) in 0 groups
    best, args = [], []
    for _ in range(max_groups):
        total = f[:, None] + cost                                            # (a, b)
        args.append(total.argmin(0))
        f = total.min(0)
        best.append(f[n])
    g, cuts = int(np.argmin(best)), [n]
    while g >= 0:                                                            # walk back
        cuts.append(int(args[g][cuts[-1]]))
        g -= 1
    cuts = cuts[::-1]
    return list(zip(cuts[:-1], cuts[1:]))


def _branch_layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm of (K, ..., H) with per-branch affine parameters (K, H)."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[1],)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:]), weight.view(shape))


def _project(proj: InputProjection, x: Tensor) -> Tensor:
    """proj(x) (LayerNorm -> Dropout -> Linear -> ReLU) with the dropout's keep scale folded
    into the Linear's weight and the drop applied in place on the fresh LayerNorm output."""
    h = F.layer_norm(x, x.shape[-1:], proj.norm.weight, proj.norm.bias, proj.norm.eps)
    h, scale = dropout_unscaled(h, proj.p, proj.training)
    w = proj.linear.weight if scale == 1.0 else proj.linear.weight * scale
    return F.relu(F.linear(h, w, proj.linear.bias), inplace=True)


def _pool(x: Tensor, tokens: Tokens, linear: nn.Linear) -> Tensor:
    """Attention pooling of packed tokens (N, H) -> (B, H), one vector per row of `tokens`;
    padded slots get logit POOL_FILL (weight exactly 0), as in the release."""
    B, L = tokens.batch, tokens.length
    logits = tokens.unpack(linear(x).squeeze(1), fill=POOL_FILL).view(B, L)
    attn = tokens.pack(torch.softmax(logits, dim=1).unsqueeze(-1))          # (N, 1)
    rows = tokens.rows if tokens.index is not None \
        else torch.arange(B, device=x.device).repeat_interleave(L)
    return x.new_zeros(B, x.shape[1]).index_add(0, rows, attn * x)


# ----------------------------------------------------------------------------- modules

class AttentionBranches(nn.Module):
    """K post-norm self-attention layers without feed-forward, run as one batch:
    LN_k(x + Dropout(Dense_k(softmax(scaled q_k k_k^T * G_k + mask) v_k))). Dense layers run on
    packed real tokens; attention on padded (b, l) groups. K = 1 with no window is the query
    encoder."""

    def __init__(self, hidden: int, n_heads: int, branches: int, p: float):
        super().__init__()
        K, H = branches, hidden
        self.n_heads, self.p = n_heads, p
        self.qkv_weight = _mark(nn.Parameter(torch.empty(K, 3 * H, H)), 3 * K)
        self.qkv_bias = _mark(nn.Parameter(torch.zeros(K, 3 * H)), 3 * K)
        self.out_weight = _mark(nn.Parameter(torch.empty(K, H, H)), K)
        self.out_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)
        self.norm_weight = _mark(nn.Parameter(torch.ones(K, H)), K)
        self.norm_bias = _mark(nn.Parameter(torch.zeros(K, H)), K)

    def forward(self, x: Tensor, groups: Sequence[tuple[int, int, Tokens]],
                gauss: Sequence[Tensor | None]) -> Tensor:
        """x packed tokens (N, H); groups [(t0, t1, Tokens)]: contiguous token runs [t0, t1),
        each one padded attention batch (b, l); gauss[i] (K, b or 1, 1, l, l) or None.
        Returns (K, N, H)."""
        K, H, nh = self.qkv_weight.shape[0], x.shape[-1], self.n_heads
        qkv = F.linear(x, self.qkv_weight.reshape(K * 3 * H, H), self.qkv_bias.reshape(-1))
        heads = _ScatterBuckets.apply(qkv.view(-1, K, 3, nh, H // nh),   # (K, b, nh, l, dh) each
                                      [(t0, t1, *sub.scatter_spec()) for t0, t1, sub in groups])
        parts = []
        for i, (_, _, sub) in enumerate(groups):
            q, k, v = heads[3 * i:3 * i + 3]
            ctx = attention(q, k, v, gauss[i], sub.key_mask_add(x.dtype), self.p, self.training)
            parts.append(gather_heads(ctx, sub))                             # (K, n, H)
        ctx = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        out = torch.baddbmm(self.out_bias.unsqueeze(1), ctx, self.out_weight.transpose(1, 2))
        out = add_dropout(x, out, self.p, self.training)
        return _branch_layer_norm(out, self.norm_weight, self.norm_bias)


class GMMBlock(nn.Module):
    """Mean of the Gaussian-window attention branches, on packed tokens."""

    def __init__(self, cfg: GMMFormerV1Config):
        super().__init__()
        self.widths = cfg.widths
        self.attn = AttentionBranches(cfg.hidden_size, cfg.n_heads, len(cfg.widths), cfg.drop)

    def forward(self, x: Tensor, groups: Sequence[tuple[int, int, Tokens]],
                gauss: Sequence[Tensor | None]) -> Tensor:
        """packed (N, H) -> (N, H); see AttentionBranches.forward."""
        return self.attn(x, groups, gauss).mean(0)


class GMMFormer(nn.Module):
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
        mask = as_bool(query_mask)
        Nq, Lq = mask.shape
        x = Tokens(mask, Nq, Lq, mask.device).pack(query_feats)
        tokens = Tokens(mask.repeat(copies, 1) if copies > 1 else mask, copies * Nq, Lq, mask.device)
        x = x.repeat(copies, 1) if copies > 1 else x
        x = self.query_pos(_project(self.query_proj, x), tokens.positions)            # (N, H) real tokens
        x = self.query_layer(x, [(0, tokens.count, tokens)], [None]).squeeze(0)
        return _pool(x, tokens, self.query_pool)

    def encode_clips(self, clip_feats: Tensor) -> Tensor:
        """(B, n_clips, Dv) -> (B, n_clips, H); windows for n_clips positions."""
        B, C = clip_feats.shape[:2]
        tokens = Tokens(None, B, C, clip_feats.device)
        x = self.clip_pos(_project(self.clip_proj, tokens.pack(clip_feats)), tokens.positions)
        gauss = gaussian_windows(torch.tensor([C], device=x.device), C, self.cfg.widths)
        groups, gauss = [(0, B * C, tokens)], [gauss.to(x.dtype)[:, :, None]]   # (K, 1, 1, C, C)
        return self.clip_block2(self.clip_block1(x, groups, gauss), groups, gauss).view(B, C, -1)

    def encode_frames(self, frame_feats: Tensor, frame_mask: Tensor) -> Tensor:
        """(B, Lf, Dv), (B, Lf) -> (B, H) pooled frame vectors (see the module docstring for
        the windows' batch dependence)."""
        mask = as_bool(frame_mask)
        B, Lf = mask.shape
        if Lf > self.cfg.max_frames:
            raise ValueError(f"frame_feats has {Lf} frames; the model takes at most {self.cfg.max_frames}")
        ends = (mask * torch.arange(1, Lf + 1, device=mask.device)).amax(1).clamp_min(1)
        order = torch.argsort(ends, descending=True, stable=True)           # longest first
        ends = ends[order]
        ends_host = ends.tolist()
        valid = mask.index_select(0, order)[:, :ends_host[0]]
        tokens = Tokens(valid, B, ends_host[0], mask.device)
        rows = tokens.rows if tokens.index is not None \
            else torch.arange(B, device=mask.device).repeat_interleave(tokens.length)
        source = order[rows] * Lf + tokens.positions                        # slots in (B, Lf)
        x = frame_feats.reshape(B * Lf, -1).index_select(0, source)
        x = self.frame_pos(_project(self.frame_proj, x), tokens.positions)            # (N, H) real tokens
        groups, gauss = self._frame_groups(valid, ends, ends_host, x.dtype)
        x = self.frame_block2(self.frame_block1(x, groups, gauss), groups, gauss)
        vecs = _pool(x, tokens, self.frame_pool)                            # (B, H), sorted
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B, device=order.device)
        return vecs.index_select(0, inverse)

    def _frame_groups(self, valid: Tensor, ends: Tensor, ends_host: list[int], dtype: torch.dtype
                      ) -> tuple[list[tuple[int, int, Tokens]], list[Tensor]]:
        """Length buckets of the sorted videos (valid (B, L) mask, real lengths descending):
        [(first token, end token, Tokens of the bucket)] and each bucket's windows."""
        L = ends_host[0]
        full = None if self.cfg.own_length_windows else gaussian_windows(
            torch.tensor([L], device=valid.device), L, self.cfg.widths).to(dtype)
        starts = [0] + valid.sum(1).cumsum(0).tolist()
        groups, gauss = [], []
        for a, b in length_buckets(ends_host):
            l = ends_host[a]
            groups.append((starts[a], starts[b], Tokens(valid[a:b, :l], b - a, l, valid.device)))
            if full is None:
                gauss.append(gaussian_windows(ends[a:b], l, self.cfg.widths).to(dtype)[:, :, None])
            else:
                gauss.append(full[:, :, None, :l, :l])
        return groups, gauss

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
        clip, _, frame, _ = pair_scores(query, videos.fixed["clips"], videos.fixed["frame_vec"])
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

def pair_scores(query: Tensor, clips: Tensor, frame_vec: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(clip, clip_raw, frame, frame_raw), each (Nq, B): max over clips of the cosine (and of
    the dot product); cosine (and dot product) with the pooled frame vector."""
    qn = F.normalize(query, dim=-1)
    clip_raw = torch.einsum("qh,bch->qbc", query, clips).amax(-1)
    clip = torch.einsum("qh,bch->qbc", qn, F.normalize(clips, dim=-1)).amax(-1)
    frame_raw = query @ frame_vec.t()
    frame = qn @ F.normalize(frame_vec, dim=-1).t()
    return clip, clip_raw, frame, frame_raw
