"""GMMFormer v1 on the CPU fast path: prvr.methods.gmmformer_v1.model computed on packed tokens.

The reference network's modules, switched (prvr.backends.cpu.switch_modules) to subclasses whose
forwards take packed real tokens: every dense layer (input projections, q/k/v, output
projections, LayerNorms) runs on real tokens only; q/k/v are scattered straight into the padded
attention layout (`_ScatterBuckets`) and attention runs per group: the queries at their longest
length, the frame stream in up to four length buckets (videos sorted by length, each bucket
padded to its own longest video). Exact: padded keys get weight exp(-10000) = 0 and padded slots
are never read back. Same parameters, same function (tests/test_backend_equality.py); dropout
draws its own masks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...methods.gmmformer_v1.model import (POOL_FILL, AttentionBranches, GMMBlock, GMMFormer, GMMFormerV1Config,
                                           _branch_layer_norm, gaussian_windows)
from ...methods.layers import InputProjection
from . import switch_modules
from .kernels import Tokens, _ScatterBuckets, add_dropout, as_bool, dropout_unscaled, gather_heads
from .layers import LAYERS, attention


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


def _project(proj: InputProjection, x: Tensor) -> Tensor:
    """proj(x) (LayerNorm -> Dropout -> Linear -> ReLU) with the dropout's keep scale folded
    into the Linear's weight and the drop applied in place on the fresh LayerNorm output."""
    h = F.layer_norm(x, x.shape[-1:], proj.norm.weight, proj.norm.bias, proj.norm.eps)
    h, scale = dropout_unscaled(h, proj.drop.p, proj.training)
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


class PackedAttentionBranches(AttentionBranches):
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
            ctx = attention(q, k, v, gauss[i], sub.key_mask_add(x.dtype), self.drop.p, self.training)
            parts.append(gather_heads(ctx, sub))                             # (K, n, H)
        ctx = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        out = torch.baddbmm(self.out_bias.unsqueeze(1), ctx, self.out_weight.transpose(1, 2))
        out = add_dropout(x, out, self.drop.p, self.training)
        return _branch_layer_norm(out, self.norm_weight, self.norm_bias)


class PackedGMMBlock(GMMBlock):
    def forward(self, x: Tensor, groups: Sequence[tuple[int, int, Tokens]],
                gauss: Sequence[Tensor | None]) -> Tensor:
        """packed (N, H) -> (N, H); see AttentionBranches.forward."""
        return self.attn(x, groups, gauss).mean(0)


class PackedGMMFormer(GMMFormer):
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


TABLE = {**LAYERS, AttentionBranches: PackedAttentionBranches, GMMBlock: PackedGMMBlock,
         GMMFormer: PackedGMMFormer}


def build_model(cfg: GMMFormerV1Config | None = None) -> GMMFormer:
    """The reference GMMFormer v1 with every module on its packed CPU forward."""
    return switch_modules(GMMFormer(cfg), TABLE)
