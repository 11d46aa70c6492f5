"""MS-SL on the CPU fast path: prvr.methods.msssl.model's encoders on packed real tokens.

The reference network's streams, switched (prvr.backends.cpu.switch_modules) to subclasses that
run token-wise work (projections, LayerNorms, output Linears) on packed real tokens with the
fused dropout nodes of prvr.backends.cpu.kernels. The scores are the reference's. Same
parameters, same function (tests/test_backend_equality.py); dropout draws its own masks.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...methods.msssl.model import MSSL, AttentionLayer, MSSLConfig, Stream
from . import switch_modules
from .kernels import Tokens, add_dropout, as_bool, dropout
from .layers import LAYERS


class PackedAttentionLayer(AttentionLayer):
    def forward(self, x: Tensor, tokens: Tokens) -> Tensor:
        """packed (N, H) -> packed (N, H)"""
        q, k, v = (t.squeeze(0) for t in tokens.qkv_heads(self.qkv(x), 1, self.n_heads))  # (B, nh, L, dh)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mask_add = tokens.key_mask_add(x.dtype)
        if mask_add is not None:
            scores = scores + mask_add
        probs = dropout(torch.softmax(scores, dim=-1), self.drop.p, self.training)
        ctx = tokens.from_heads(torch.matmul(probs, v))                              # (N, H)
        return self.norm(add_dropout(x, self.out(ctx), self.drop.p, self.training))


class PackedStream(Stream):
    def forward(self, feats: Tensor, tokens: Tokens) -> Tensor:
        """padded (B, L, D_in) -> packed (N, H)"""
        return self.encoder(self.pos(self.proj(tokens.pack(feats)), tokens.positions), tokens)


class PackedMSSL(MSSL):
    def encode_query_feats(self, query_feats: Tensor, query_mask: Tensor) -> Tensor:
        """(Nq, Lq, Dt), (Nq, Lq) -> (Nq, H): attention pooling over the real tokens."""
        Nq, Lq = query_mask.shape
        if Lq > self.cfg.max_query_len:
            raise ValueError(f"query_feats has {Lq} tokens; the model takes at most {self.cfg.max_query_len}")
        tokens = Tokens(as_bool(query_mask), Nq, Lq, query_feats.device)
        x = self.query(query_feats, tokens)                                     # (N, H)
        logits = tokens.unpack(self.query_pool(x).squeeze(1), fill=-1e10).view(Nq, Lq)
        attn = tokens.pack(torch.softmax(logits, dim=1).unsqueeze(-1))         # (N, 1)
        rows = tokens.rows if tokens.index is not None \
            else torch.arange(Nq, device=x.device).repeat_interleave(Lq)
        return x.new_zeros(Nq, x.shape[1]).index_add(0, rows, attn * x)

    def encode_video_feats(self, clip_feats: Tensor, frame_feats: Tensor, frame_mask: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """-> clips (B, n_clips, H), frames (B, Lf, H) zero at pads, frame_mask (B, Lf) bool."""
        B, C = clip_feats.shape[:2]
        if C != self.cfg.n_clips:
            raise ValueError(f"clip_feats has {C} clips; the model is configured for {self.cfg.n_clips}")
        clips = self.clip(clip_feats, Tokens(None, B, C, clip_feats.device)).view(B, C, -1)
        frame_mask = as_bool(frame_mask)
        Lf = frame_mask.shape[1]
        if Lf > self.cfg.max_frames:
            raise ValueError(f"frame_feats has {Lf} frames; the model takes at most {self.cfg.max_frames}")
        tokens = Tokens(frame_mask, B, Lf, frame_feats.device)
        frames = tokens.unpack(self.frame(frame_feats, tokens)).view(B, Lf, -1)
        return clips, frames, frame_mask


TABLE = {**LAYERS, AttentionLayer: PackedAttentionLayer, Stream: PackedStream, MSSL: PackedMSSL}


def build_model(cfg: MSSLConfig | None = None) -> MSSL:
    """The reference MS-SL with its encoders on their packed CPU forwards."""
    return switch_modules(MSSL(cfg), TABLE)
