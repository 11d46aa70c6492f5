"""GMMFormer v2 on the CPU fast path: prvr.methods.gmmformer_v2.model computed on packed tokens.

The reference network's modules, switched (prvr.backends.cpu.switch_modules) to subclasses whose
forwards take packed real tokens (N, H) with their `Tokens` bookkeeping instead of padded
batches, and fused CPU nodes (prvr.backends.cpu.kernels) that keep less for backward:

* token-wise work (projections, norms, FFNs) runs on real tokens only;
* attention runs at the batch's own longest frame length, the videos sorted by length and split
  into up to three length buckets, using the top-left corner of the max_frames Gaussian. Exact:
  padded keys are masked after the Gaussian multiply;
* the weight token's query is the same for every branch and video, so it is folded into the key
  projection, and the value projection is applied after pooling.

Same parameters, same function (tests/test_backend_equality.py); dropout draws its own masks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...methods.gmmformer_v2.model import (EncoderLayer, GaussianBranches, GMMFormer, GMMFormerConfig,
                                           TemporalConsolidation, WeightTokenAttention)
from . import switch_modules
from .kernels import (Tokens, _ScatterBuckets, add_dropout, as_bool, branch_layer_norm, branch_norm_ffn,
                      dropout, linear, norm_ffn, pool_tokens)
from .layers import LAYERS, attention


class PackedEncoderLayer(EncoderLayer):
    def forward(self, x: Tensor, tokens: Tokens) -> Tensor:
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = (t.squeeze(0) for t in tokens.qkv_heads(qkv, 1, self.n_heads))
        ctx = attention(q, k, v, None, tokens.key_mask_add(x.dtype), self.drop.p, self.training)
        ctx = tokens.from_heads(ctx)
        y, f = norm_ffn(add_dropout(x, ctx, self.drop.p, self.training), self.norm1, self.ffn_in, self.ffn_out,
                        self.drop.p, self.training)                             # norm1 and the FFN
        return self.norm2(add_dropout(y, f, self.drop.p, self.training))


class PackedGaussianBranches(GaussianBranches):
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
            ctx = attention(q, k, v, gauss, sub.key_mask_add(x.dtype), self.drop.p, self.training)
            parts.append(sub.from_heads(ctx))                              # (K, n, H)
        ctx = parts[0] if len(parts) == 1 else torch.cat(parts, 1)         # (K, N, H)
        y, f = branch_norm_ffn(add_dropout(x, ctx, self.drop.p, self.training), self.norm1_weight, self.norm1_bias,
                               self.ffn_in_weight, self.ffn_in_bias, self.ffn_out_weight, self.ffn_out_bias,
                               self.drop.p, self.training)                      # LN1 and the FFN
        return branch_layer_norm(add_dropout(y, f, self.drop.p, self.training), self.norm2_weight, self.norm2_bias)


class PackedWeightTokenAttention(WeightTokenAttention):
    def forward(self, token: Tensor, branches: Tensor, tokens: Tokens) -> Tensor:
        """token (H,) shared or (B, H) per video, branches (K, N, H) packed -> (K, B, H)."""
        if token.dim() == 2:
            return self.per_video(token, branches, tokens)
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
        probs = dropout(torch.softmax(scores, dim=2), self.drop.p, self.training)  # (K, B, L, nh)
        pooled = pool_tokens(probs, branches, tokens)                         # (KB, nh, H)
        # values: W_v applied after pooling; the bias is weighted by the kept probability mass.
        ctx = torch.einsum("nhc,hdc->nhd", pooled, w_v) + probs.sum(2).view(K * B, nh, 1) * b_v
        t = self.norm1(add_dropout(token, ctx.reshape(K, B, H), self.drop.p, self.training))
        f = self.ffn_out(dropout(self.ffn_in(t), self.drop.p, self.training, relu=True))
        return self.norm2(add_dropout(t, f, self.drop.p, self.training))

    def per_video(self, token: Tensor, branches: Tensor, tokens: Tokens) -> Tensor:
        """A token per video (B, H), with every one of the B x L slots a token (tokens.index
        None; padded keys masked by tokens.key_mask_add): each video's query folded into the
        key projection, the value projection after pooling."""
        K, H, nh = branches.shape[0], branches.shape[-1], self.n_heads
        B, L, dh = tokens.batch, tokens.length, H // nh
        if tokens.index is not None:
            raise ValueError("a per-video token needs every slot as a token")
        w_k, w_v = self.key_value.weight.view(2, nh, dh, H).unbind(0)
        b_k, b_v = self.key_value.bias.view(2, nh, dh).unbind(0)
        q = self.query(token).view(B, nh, dh) / math.sqrt(dh)
        key_q = torch.einsum("bhd,hdc->bch", q, w_k)                      # (B, H, nh)
        o = branches.view(K, B, L, H)
        scores = torch.matmul(o, key_q) + (q * b_k).sum(-1)[:, None, :]   # (K, B, L, nh)
        mask_add = tokens.key_mask_add(scores.dtype)                      # (B, 1, 1, L) or None
        if mask_add is not None:
            scores = scores + mask_add.view(1, B, L, 1)
        probs = dropout(torch.softmax(scores, dim=2), self.drop.p, self.training)
        pooled = torch.matmul(probs.transpose(2, 3), o)                   # (K, B, nh, H)
        ctx = torch.einsum("kbnc,ndc->kbnd", pooled, w_v) + probs.sum(2)[..., None] * b_v
        t = self.norm1(add_dropout(token, ctx.reshape(K, B, H), self.drop.p, self.training))
        f = self.ffn_out(dropout(self.ffn_in(t), self.drop.p, self.training, relu=True))
        return self.norm2(add_dropout(t, f, self.drop.p, self.training))


class PackedTemporalConsolidation(TemporalConsolidation):
    def forward(self, x: Tensor, token: Tensor | None, tokens: Tokens) -> Tensor:
        """packed (N, H) -> packed (N, H); token None: each video's mean of the branch outputs
        over branches and all L slots (every slot a token, as the reference)."""
        outs = self.branches(x, tokens)                                   # (K, N, H)
        if token is None:
            token = outs.view(len(outs), tokens.batch, tokens.length, -1).mean(0).mean(1)   # (B, H)
        t = self.token_attention(token, outs, tokens)                     # (K, B, H)
        h = dropout(self.mix_hidden(t), self.drop.p, self.training, relu=True)
        L = tokens.length
        logits = F.linear(h, self.mix_out.weight[:L], self.mix_out.bias[:L])  # (K, B, L)
        mix = torch.softmax(logits / self.sft_factor, dim=0).reshape(len(outs), -1)
        if tokens.index is not None:
            mix = mix.index_select(1, tokens.index)                       # (K, N)
        return (outs * mix.unsqueeze(-1)).sum(0)  # (einsum would run N tiny matmuls here)


class PackedGMMFormer(GMMFormer):
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


TABLE = {**LAYERS, EncoderLayer: PackedEncoderLayer, GaussianBranches: PackedGaussianBranches,
         WeightTokenAttention: PackedWeightTokenAttention, TemporalConsolidation: PackedTemporalConsolidation,
         GMMFormer: PackedGMMFormer}


def build_model(cfg: GMMFormerConfig | None = None) -> GMMFormer:
    """The reference GMMFormer v2 with every module on its packed CPU forward."""
    return switch_modules(GMMFormer(cfg), TABLE)
