"""Map the public GMMFormer v1 release's checkpoints onto ours and back.

The release keeps one BertAttention module per Gaussian branch (`clip_encoder.attn0` ..
`attn3`, blocks `clip_encoder`, `clip_encoder_2`, `frame_encoder_1`, `frame_encoder_2`) with
separate query/key/value Linears; we stack the branches and fuse q/k/v
(prvr.methods.gmmformer_v1.model). Each of our tensors is the concatenation, in a fixed order,
of one or more release tensors flattened (e.g. `frame_block1.attn.qkv_weight` (4, 3H, H) is
[attn0.query, attn0.key, attn0.value, attn1.query, ...]); that one rule (`_groups`) drives
both directions.

A release checkpoint is {"config", "epoch", "model_val", "state_dict", "optimizer"}: config is
the release's plain config dict; the optimiser's param groups pickle the BertAdam schedule, an
`Opts.optimization.WarmupLinearSchedule` object, which `RELEASE_GLOBALS` lets torch's
weights_only unpickler rebuild as an (empty) OrderedDict, so no release code is needed or run.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..layers import (check_release_layout, fuse_release_tensors, split_release_tensors,
                      strip_module_prefix)
from .model import GMMFormer, GMMFormerV1Config

__all__ = ["RELEASE_GLOBALS", "release_layout", "convert_release_state_dict",
           "to_release_state_dict", "config_from_release", "is_release_state_dict", "load_release"]

# the classes a release checkpoint pickles (optimizer.param_groups[*]["schedule"])
RELEASE_GLOBALS = ((OrderedDict, "Opts.optimization.WarmupLinearSchedule"),)

Shape = tuple[int, ...]
_VIDEO_BLOCKS = (("clip_block1", "clip_encoder"), ("clip_block2", "clip_encoder_2"),
                 ("frame_block1", "frame_encoder_1"), ("frame_block2", "frame_encoder_2"))


def _attention(prefix: str, H: int) -> list[tuple[str, Shape]]:
    """Release names of one BertAttention module, in release order."""
    out = []
    for part in ("self.query", "self.key", "self.value", "output.dense"):
        out += [(f"{prefix}.{part}.weight", (H, H)), (f"{prefix}.{part}.bias", (H,))]
    return out + [(f"{prefix}.output.LayerNorm.weight", (H,)), (f"{prefix}.output.LayerNorm.bias", (H,))]


def _proj(prefix: str, d_in: int, H: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.LayerNorm.weight", (d_in,)), (f"{prefix}.LayerNorm.bias", (d_in,)),
            (f"{prefix}.net.1.weight", (H, d_in)), (f"{prefix}.net.1.bias", (H,))]


def _pos(prefix: str, n: int, H: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.position_embeddings.weight", (n, H)),
            (f"{prefix}.LayerNorm.weight", (H,)), (f"{prefix}.LayerNorm.bias", (H,))]


def release_layout(cfg: GMMFormerV1Config) -> list[tuple[str, Shape]]:
    """Every release parameter name and shape for `cfg`, in the release's state_dict order."""
    H, K = cfg.hidden_size, len(cfg.widths)
    blocks = {rel: [x for k in range(K) for x in _attention(f"{rel}.attn{k}", H)] for _, rel in _VIDEO_BLOCKS}
    return (_pos("query_pos_embed", cfg.max_query_len, H)
            + _pos("clip_pos_embed", cfg.max_frames, H)
            + _pos("frame_pos_embed", cfg.max_frames, H)
            + _proj("query_input_proj", cfg.text_dim, H)
            + _attention("query_encoder", H)
            + _proj("clip_input_proj", cfg.visual_dim, H)
            + blocks["clip_encoder"] + blocks["clip_encoder_2"]
            + _proj("frame_input_proj", cfg.visual_dim, H)
            + blocks["frame_encoder_1"] + blocks["frame_encoder_2"]
            + [("modular_vector_mapping.weight", (1, H)), ("modular_vector_mapping_2.weight", (1, H))])


def _branch_groups(ours: str, rel: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(our tensor, release tensors) of AttentionBranches `ours` over BertAttentions `rel`."""
    for kind in ("weight", "bias"):
        yield f"{ours}.qkv_{kind}", [f"{r}.self.{x}.{kind}" for r in rel for x in ("query", "key", "value")]
        yield f"{ours}.out_{kind}", [f"{r}.output.dense.{kind}" for r in rel]
        yield f"{ours}.norm_{kind}", [f"{r}.output.LayerNorm.{kind}" for r in rel]


def _groups(cfg: GMMFormerV1Config) -> Iterator[tuple[str, list[str]]]:
    """(our name, release names whose flattened concatenation it is)."""
    K = len(cfg.widths)
    for stream in ("query", "clip", "frame"):
        yield f"{stream}_pos.embedding.weight", [f"{stream}_pos_embed.position_embeddings.weight"]
        for kind in ("weight", "bias"):
            yield f"{stream}_pos.norm.{kind}", [f"{stream}_pos_embed.LayerNorm.{kind}"]
            yield f"{stream}_proj.norm.{kind}", [f"{stream}_input_proj.LayerNorm.{kind}"]
            yield f"{stream}_proj.linear.{kind}", [f"{stream}_input_proj.net.1.{kind}"]
    yield from _branch_groups("query_layer", ["query_encoder"])
    yield "query_pool.weight", ["modular_vector_mapping.weight"]
    for ours, rel in _VIDEO_BLOCKS:
        yield from _branch_groups(f"{ours}.attn", [f"{rel}.attn{k}" for k in range(K)])
    yield "frame_pool.weight", ["modular_vector_mapping_2.weight"]


def _our_shapes(cfg: GMMFormerV1Config) -> dict[str, Shape]:
    with torch.device("meta"):
        model = GMMFormer(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def convert_release_state_dict(sd: Mapping[str, Tensor], cfg: GMMFormerV1Config) -> dict[str, Tensor]:
    """A release `state_dict` -> our state_dict. Raises ValueError naming the first missing or
    mis-shaped release tensor (in release order), or the unexpected extra names."""
    sd = strip_module_prefix(sd)
    check_release_layout(sd, release_layout(cfg), cfg, "GMMFormer v1 release state dict")
    return fuse_release_tensors(sd, _groups(cfg), _our_shapes(cfg))


def to_release_state_dict(our_sd: Mapping[str, Tensor], cfg: GMMFormerV1Config) -> dict[str, Tensor]:
    """Our state_dict -> the release's names and shapes, in release order (the inverse)."""
    return split_release_tensors(our_sd, _groups(cfg), release_layout(cfg))


_RELEASE_KEYS = {  # release config key -> our config field
    "hidden_size": "hidden_size", "n_heads": "n_heads",
    "q_feat_size": "text_dim", "visual_feat_dim": "visual_dim",
    "max_desc_l": "max_query_len", "max_ctx_l": "max_frames", "map_size": "n_clips",
    "input_drop": "input_drop", "drop": "drop", "initializer_range": "init_std",
    "clip_scale_w": "clip_scale_w", "frame_scale_w": "frame_scale_w",
    "margin": "margin", "hard_pool_size": "hard_pool_size",
}
_RELEASE_LISTS = {"loss_factor": ("clip_nce", "frame_nce", "qdl"), "neg_factor": ("qdl_margin", "qdl_alpha")}


def config_from_release(release_config: Mapping[str, Any], base: GMMFormerV1Config) -> GMMFormerV1Config:
    """`base` with the values the release's config dict sets (named weights from its lists)."""
    changes: dict[str, Any] = {}
    for key, field in _RELEASE_KEYS.items():
        if release_config.get(key) is not None:
            changes[field] = _as(type(getattr(base, field)), release_config[key], key)
    for key, names in _RELEASE_LISTS.items():
        value = release_config.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != len(names):
            raise ValueError(f"release config: '{key}' = {value!r} is not a list of {len(names)} numbers")
        changes.update({n: _as(float, v, key) for n, v in zip(names, value)})
    return dataclasses.replace(base, **changes)


def _as(kind: type, value: Any, key: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"release config: '{key}' = {value!r} is not a {kind.__name__}")
    if kind is int and value != int(value):
        raise ValueError(f"release config: '{key}' = {value!r} is not an int")
    return kind(value)


def is_release_state_dict(sd: Any) -> bool:
    """A v1 release state dict: second GMM blocks and a frame pooling vector, no weight token
    (v2's releases have `weight_token` and no `clip_encoder_2`)."""
    if not isinstance(sd, Mapping):
        return False
    names = set(strip_module_prefix({str(k): None for k in sd}))
    return ("weight_token" not in names and "clip_encoder_2.attn0.self.query.weight" in names
            and "frame_encoder_2.attn0.self.query.weight" in names and "modular_vector_mapping_2.weight" in names)


def release_metrics(model_val: Any) -> dict[str, float]:
    """The release's model_val [r1, r5, r10, r100, sumr] as a dict (NaNs dropped)."""
    try:
        vals = [float(v) for v in model_val]
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in zip(("r1", "r5", "r10", "r100", "sumr"), vals) if not math.isnan(v)}


def load_release(ckpt: Mapping[str, Any], base: GMMFormerV1Config | None
                 ) -> tuple[GMMFormerV1Config, dict[str, Tensor], dict[str, Any]]:
    """(config, our state dict, info) from a release checkpoint {"config", "state_dict", ...}."""
    if not isinstance(ckpt.get("state_dict"), Mapping) or not isinstance(ckpt.get("config"), Mapping):
        raise ValueError("GMMFormer v1 release checkpoint: 'config' and 'state_dict' must be dicts")
    cfg = config_from_release(ckpt["config"], base if base is not None else GMMFormerV1Config())
    state = convert_release_state_dict(ckpt["state_dict"], cfg)
    extra = {"release_config": {str(k): v for k, v in ckpt["config"].items()
                                if v is None or isinstance(v, (str, int, float, bool, list))}}
    info = {"epoch": ckpt.get("epoch"), "metrics": release_metrics(ckpt.get("model_val", ())), "extra": extra}
    return cfg, state, info
