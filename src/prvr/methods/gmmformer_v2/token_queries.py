"""The token-level query branch RAL adds to GMMFormer v2 (and Holmes' dual-query variant reuses):
docs/ral.md, "Confidence-aware set-to-set alignment".

* a second query encoder (its own input projection and self-attention layer; the position
  embedding is the pooled branch's) keeps every token: (Nq, L, H);
* a word-confidence MLP (Linear -> ReLU -> Linear(H, 1)) turns each token into a logit; the
  softmax over a query's real tokens is its token weights;
* the frame-scale score is the weighted sum over tokens of each token's best frame:
  sum_t w_t max_f (token_t . frame_f), on cosines for ranking and the triplet, on dot products
  (with weights from the unnormalised tokens) for the NCE term.

A video shorter than max_frames has zero vectors in its remaining slots (the releases pad every
video to 128), so 0 is among each token's frame candidates; `max_frames` 0 turns that off.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import QueryEncoding
from ..layers import InputProjection
from .model import EncoderLayer, as_bool


class TokenQueryBranch(nn.Module):
    """Input projection + encoder layer over the query tokens, and the word-confidence MLP."""

    def __init__(self, text_dim: int, hidden: int, n_heads: int, input_drop: float, drop: float):
        super().__init__()
        self.proj = InputProjection(text_dim, hidden, input_drop)
        self.layer = EncoderLayer(hidden, n_heads, drop)
        self.confidence_hidden = nn.Linear(hidden, hidden)
        self.confidence_out = nn.Linear(hidden, 1)

    def forward(self, query_feats: Tensor, query_mask: Tensor, pos: nn.Module) -> Tensor:
        """(Nq, L, Dt), (Nq, L) -> (Nq, L, H) every position's encoding (pads not zeroed: the
        support set of RAL reads them)."""
        return self.layer(pos(self.proj(query_feats)), as_bool(query_mask))

    def weights(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """(Nq, L, H), (Nq, L) bool -> (Nq, L) softmax of the confidences over the real tokens."""
        logits = self.confidence_out(F.relu(self.confidence_hidden(tokens))).squeeze(-1)
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def token_frame_scores(tokens: Tensor, mask: Tensor, weights: Tensor, frames: Tensor, frame_mask: Tensor,
                       max_frames: int, cosine: bool) -> Tensor:
    """(Nq, b): sum_t weights[q, t] * max over the video's frames of tokens[q, t] . frame.

    tokens (Nq, L, H), mask/weights (Nq, L), frames (b, Lf, H) zero at pads, frame_mask (b, Lf).
    cosine: normalise both sides first. Padded tokens count 0 whatever the weights hold."""
    frame_mask = as_bool(frame_mask)
    if cosine:
        tokens, frames = F.normalize(tokens, dim=-1), F.normalize(frames, dim=-1)
    sim = torch.einsum("qth,bfh->qbtf", tokens, frames)                         # (Nq, b, L, Lf)
    short = (frame_mask.sum(1) < max_frames)[None, :, None]                      # 0 a candidate
    if bool((~frame_mask).any(1).le(short[0, :, 0]).all()):
        # every padded slot is in a short video, where 0 (what a zero slot gives) is a
        # candidate anyway: no mask needed, and no second (Nq, b, L, Lf) tensor
        sim = sim.amax(-1)
    else:
        sim = sim.masked_fill(~frame_mask[None, :, None, :], torch.finfo(sim.dtype).min).amax(-1)
    sim = torch.where(short, sim.clamp_min(0.0), sim)
    sim = sim.masked_fill(~as_bool(mask)[:, None, :], 0.0)
    return torch.einsum("qbt,qt->qb", sim, weights.to(sim.dtype))


class TokenQueries:
    """Mixin for a GMMFormer-family network with a `token_branch` (TokenQueryBranch): the query
    encoding becomes a QueryEncoding and the frame-scale score the token-level one. The clip
    scale stays the pooled query's max cosine over clips. The host sets `frame_zero_candidate`
    (True: a video shorter than max_frames has 0 among its frame candidates)."""

    frame_zero_candidate = True

    def _zero_slots(self) -> int:
        return self.cfg.max_frames if self.frame_zero_candidate else 0

    def encode_tokens(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """-> tokens (Nq, L, H) (pads not zeroed), mask (Nq, L) bool"""
        mask = as_bool(batch["query_mask"])
        return self.token_branch(batch["query_feats"], mask, self.query_pos), mask

    def encode_queries(self, batch: Mapping[str, Any]) -> QueryEncoding:
        """query batch -> QueryEncoding: the pooled vector, the tokens (zero at pads) and the
        token weights the cosine score uses (confidences of the normalised tokens)."""
        pooled = self.encode_query_feats(batch["query_feats"], batch["query_mask"])
        tokens, mask = self.encode_tokens(batch)
        tokens = tokens * mask.unsqueeze(-1)
        weights = self.token_branch.weights(F.normalize(tokens, dim=-1), mask)
        return QueryEncoding(pooled, tokens, mask, weights)

    def score(self, query: QueryEncoding, videos) -> dict[str, Tensor]:
        """{"score": clip_scale_w * clip + frame_scale_w * frame, "clip", "frame"}, each (Nq, b)."""
        clips = videos.fixed["clips"]
        clip = torch.einsum("qh,bch->qbc", F.normalize(query.pooled, dim=-1),
                            F.normalize(clips, dim=-1)).amax(-1)
        frame = token_frame_scores(query.tokens, query.mask, query.weights, videos.seq, videos.seq_mask,
                                   self._zero_slots(), cosine=True)
        return {"score": self.cfg.clip_scale_w * clip + self.cfg.frame_scale_w * frame,
                "clip": clip, "frame": frame}

    def token_train_queries(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The training forward's token tensors: tokens (pads not zeroed), their mask and the
        two weight sets (of the normalised tokens, for cosines; of the raw ones, for dot
        products)."""
        tokens, mask = self.encode_tokens(batch)
        return {"tokens": tokens, "token_mask": mask,
                "token_weight": self.token_branch.weights(F.normalize(tokens, dim=-1), mask),
                "token_weight_raw": self.token_branch.weights(tokens, mask)}

    def train_scores(self, queries: Mapping[str, Tensor], videos) -> dict[str, Tensor]:
        """Cosine ("clip", "frame") and dot-product ("clip_raw", "frame_raw") scores, (Nq, B);
        the frame scale token-level."""
        q, clips = queries["query"], videos.fixed["clips"]
        clip = torch.einsum("qh,bch->qbc", F.normalize(q, dim=-1), F.normalize(clips, dim=-1)).amax(-1)
        clip_raw = torch.einsum("qh,bch->qbc", q, clips).amax(-1)
        tokens, mask = queries["tokens"], as_bool(queries["token_mask"])
        slots = self._zero_slots()
        frame = token_frame_scores(tokens, mask, queries["token_weight"], videos.seq, videos.seq_mask,
                                   slots, cosine=True)
        frame_raw = token_frame_scores(tokens, mask, queries["token_weight_raw"], videos.seq,
                                       videos.seq_mask, slots, cosine=False)
        return {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw}

    def undecayed_norm(self, name: str) -> bool:
        """The releases' rule (no decay for the input projections' and position embeddings'
        LayerNorms), the token branch's projection included."""
        return super().undecayed_norm(name) or name.startswith("token_branch.proj.norm.")


def token_branch_release_groups(prefix: str = "token_branch"):
    """(our name, [release name]) of the token branch: the releases' frame_branch_query_proj,
    frame_branch_query_encoder and text_weight_fc."""
    out = []
    for kind in ("weight", "bias"):
        out += [(f"{prefix}.proj.norm.{kind}", [f"frame_branch_query_proj.LayerNorm.{kind}"]),
                (f"{prefix}.proj.linear.{kind}", [f"frame_branch_query_proj.net.1.{kind}"])]
        rel = "frame_branch_query_encoder"
        out += [(f"{prefix}.layer.qkv.{kind}", [f"{rel}.self.{x}.{kind}" for x in ("query", "key", "value")]),
                (f"{prefix}.layer.ffn_in.{kind}", [f"{rel}.output.layer1.{kind}"]),
                (f"{prefix}.layer.ffn_out.{kind}", [f"{rel}.output.layer2.{kind}"]),
                (f"{prefix}.layer.norm1.{kind}", [f"{rel}.norm1.{kind}"]),
                (f"{prefix}.layer.norm2.{kind}", [f"{rel}.norm2.{kind}"])]
        out += [(f"{prefix}.confidence_hidden.{kind}", [f"text_weight_fc.0.{kind}"]),
                (f"{prefix}.confidence_out.{kind}", [f"text_weight_fc.2.{kind}"])]
    return out


def token_branch_release_layout(text_dim: int, H: int):
    """Release names and shapes of the token branch, in the releases' state_dict order."""
    rel = "frame_branch_query_encoder"
    layer = []
    for part in ("query", "key", "value"):
        layer += [(f"{rel}.self.{part}.weight", (H, H)), (f"{rel}.self.{part}.bias", (H,))]
    layer += [(f"{rel}.output.layer1.weight", (4 * H, H)), (f"{rel}.output.layer1.bias", (4 * H,)),
              (f"{rel}.output.layer2.weight", (H, 4 * H)), (f"{rel}.output.layer2.bias", (H,))]
    for norm in ("norm1", "norm2"):
        layer += [(f"{rel}.{norm}.weight", (H,)), (f"{rel}.{norm}.bias", (H,))]
    proj = [("frame_branch_query_proj.LayerNorm.weight", (text_dim,)),
            ("frame_branch_query_proj.LayerNorm.bias", (text_dim,)),
            ("frame_branch_query_proj.net.1.weight", (H, text_dim)),
            ("frame_branch_query_proj.net.1.bias", (H,))]
    fc = [("text_weight_fc.0.weight", (H, H)), ("text_weight_fc.0.bias", (H,)),
          ("text_weight_fc.2.weight", (1, H)), ("text_weight_fc.2.bias", (1,))]
    return layer, proj, fc


def with_token_branch(layout, text_dim: int, H: int, extra=()):
    """A release layout [(name, shape)] with the token branch added where the releases register
    it: its encoder and projection after the query encoder, the confidence MLP (and `extra`
    entries) at the end."""
    layer, proj, fc = token_branch_release_layout(text_dim, H)
    last_query = max(i for i, (n, _) in enumerate(layout) if n.startswith("query_encoder."))
    return list(layout[:last_query + 1]) + layer + proj + list(layout[last_query + 1:]) + list(extra) + fc
