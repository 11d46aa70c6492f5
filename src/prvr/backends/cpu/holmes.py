"""Holmes on the CPU fast path: GMMFormer v2's packed modules (prvr.backends.cpu.gmmformer_v2)
with the padded semantics kept exactly.

Holmes' mean weight token pools the branch outputs over all 128 frame slots, padded ones
included, so every slot stays a token here: the frame stream runs on B x 128 tokens
(`SlotTokens`, the layout a reshape), and only attention keys are masked to the real frames.
The speed comes from the fused CPU nodes (one matmul for all branches' projections, the norm
and FFN nodes that keep less for backward, dropout as packed bits), not from skipping padding.
Same parameters and function as the reference (tests/test_backend_equality.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...methods.holmes.model import Holmes, HolmesConfig
from . import switch_modules
from .gmmformer_v2 import TABLE as V2_TABLE, PackedGMMFormer
from .kernels import _MASK_ADD, Tokens, as_bool


class SlotTokens(Tokens):
    """Every one of the B x L slots is a token; attention keys are the True slots of key_mask."""

    def __init__(self, key_mask: Tensor | None, batch: int, length: int, device: torch.device):
        super().__init__(None, batch, length, device)
        self.key_mask = key_mask

    def key_mask_add(self, dtype: torch.dtype) -> Tensor | None:
        if self.key_mask is None:
            return None
        return ((~self.key_mask).to(dtype) * _MASK_ADD)[:, None, None, :]


class PackedHolmes(PackedGMMFormer, Holmes):
    def encode_video_feats(self, clip_feats: Tensor, frame_feats: Tensor, frame_mask: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """-> clips (B, n_clips, H), frames (B, max_frames, H) zero at pads, the padded mask."""
        B, C = clip_feats.shape[:2]
        dev = clip_feats.device
        clip_tokens = SlotTokens(None, B, C, dev)
        c = self.clip_pos(self.clip_proj(clip_tokens.pack(clip_feats)), clip_tokens.positions)
        clips = self.clip_consolidation(c, None, clip_tokens).view(B, C, -1)

        frame_mask = as_bool(frame_mask)
        L = self.cfg.max_frames
        slots = L - frame_mask.shape[1]
        if slots < 0:
            raise ValueError(f"frame_feats has {frame_mask.shape[1]} frames; the model takes at most {L}")
        frame_feats, frame_mask = F.pad(frame_feats, (0, 0, 0, slots)), F.pad(frame_mask, (0, slots))
        frame_tokens = SlotTokens(frame_mask, B, L, dev)
        f = self.frame_pos(self.frame_proj(frame_feats.reshape(B * L, -1)), frame_tokens.positions)
        frames = self.frame_consolidation(f, None, frame_tokens).view(B, L, -1)
        return clips, frames * frame_mask.unsqueeze(-1), frame_mask


TABLE = {**V2_TABLE, Holmes: PackedHolmes}


def build_model(cfg: HolmesConfig | None = None) -> Holmes:
    """The reference Holmes network with every module on its packed CPU forward."""
    return switch_modules(Holmes(cfg), TABLE)
