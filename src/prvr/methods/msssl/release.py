"""Map the public MS-SL release's checkpoints onto this implementation and back.

A release checkpoint (method/train.py) is {"model": state_dict, "model_cfg": EasyDict, "epoch"}
(its opt.json, beside it, is not needed). The EasyDict is read through the weights_only
allow-list as a plain OrderedDict (`RELEASE_GLOBALS`); nothing is unpickled as code.

The release keeps separate query/key/value Linears per attention layer; we fuse them (q/k/v
row blocks, in that order). Every one of our tensors is the concatenation of one or more
release tensors flattened (`_groups`), which drives both directions.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..layers import (check_release_layout, fuse_release_tensors, split_release_tensors,
                      strip_module_prefix)
from .model import MSSLConfig

__all__ = ["RELEASE_GLOBALS", "release_layout", "convert_release_state_dict", "to_release_state_dict",
           "config_from_release", "is_release_checkpoint", "load_release"]

Shape = tuple[int, ...]
# The release's model_cfg is an easydict.EasyDict (a dict subclass): restored as an OrderedDict.
RELEASE_GLOBALS = ((OrderedDict, "easydict.EasyDict"),)
_STREAMS = (("query", "query"), ("clip", "clip"), ("frame", "frame"))  # (ours, release prefix)


def release_layout(cfg: MSSLConfig) -> list[tuple[str, Shape]]:
    """Every release parameter name and shape for `cfg`, in the release's state_dict order."""
    H = cfg.hidden_size
    pos = {"query": cfg.max_query_len, "clip": cfg.max_frames, "frame": cfg.max_frames}
    d_in = {"query": cfg.text_dim, "clip": cfg.visual_dim, "frame": cfg.visual_dim}
    out: list[tuple[str, Shape]] = []
    for _, rel in _STREAMS:
        out += [(f"{rel}_pos_embed.position_embeddings.weight", (pos[rel], H)),
                (f"{rel}_pos_embed.LayerNorm.weight", (H,)), (f"{rel}_pos_embed.LayerNorm.bias", (H,))]
    for _, rel in _STREAMS:
        out += [(f"{rel}_input_proj.LayerNorm.weight", (d_in[rel],)),
                (f"{rel}_input_proj.LayerNorm.bias", (d_in[rel],)),
                (f"{rel}_input_proj.net.1.weight", (H, d_in[rel])), (f"{rel}_input_proj.net.1.bias", (H,))]
        for part in ("query", "key", "value"):
            out += [(f"{rel}_encoder.self.{part}.weight", (H, H)), (f"{rel}_encoder.self.{part}.bias", (H,))]
        out += [(f"{rel}_encoder.output.dense.weight", (H, H)), (f"{rel}_encoder.output.dense.bias", (H,)),
                (f"{rel}_encoder.output.LayerNorm.weight", (H,)), (f"{rel}_encoder.output.LayerNorm.bias", (H,))]
    return out + [("modular_vector_mapping.weight", (1, H)),
                  ("mapping_linear.0.weight", (H, H)), ("mapping_linear.1.weight", (H, H))]


def _groups() -> Iterator[tuple[str, list[str]]]:
    """(our name, release names whose flattened concatenation it is)."""
    for ours, rel in _STREAMS:
        yield f"{ours}.pos.embedding.weight", [f"{rel}_pos_embed.position_embeddings.weight"]
        for kind in ("weight", "bias"):
            yield f"{ours}.pos.norm.{kind}", [f"{rel}_pos_embed.LayerNorm.{kind}"]
            yield f"{ours}.proj.norm.{kind}", [f"{rel}_input_proj.LayerNorm.{kind}"]
            yield f"{ours}.proj.linear.{kind}", [f"{rel}_input_proj.net.1.{kind}"]
            yield f"{ours}.encoder.qkv.{kind}", [f"{rel}_encoder.self.{p}.{kind}" for p in ("query", "key", "value")]
            yield f"{ours}.encoder.out.{kind}", [f"{rel}_encoder.output.dense.{kind}"]
            yield f"{ours}.encoder.norm.{kind}", [f"{rel}_encoder.output.LayerNorm.{kind}"]
    yield "query_pool.weight", ["modular_vector_mapping.weight"]
    yield "key_proj.weight", ["mapping_linear.0.weight"]
    yield "value_proj.weight", ["mapping_linear.1.weight"]


def _our_shapes(cfg: MSSLConfig) -> dict[str, Shape]:
    from .model import MSSL
    with torch.device("meta"):
        model = MSSL(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def convert_release_state_dict(sd: Mapping[str, Tensor], cfg: MSSLConfig) -> dict[str, Tensor]:
    """A release state dict -> ours. ValueError naming the first missing, non-tensor or
    mis-shaped release tensor (in release order), or the unexpected extra names."""
    sd = strip_module_prefix(sd)
    check_release_layout(sd, release_layout(cfg), cfg)
    return fuse_release_tensors(sd, _groups(), _our_shapes(cfg))


def to_release_state_dict(our_sd: Mapping[str, Tensor], cfg: MSSLConfig) -> dict[str, Tensor]:
    """Our state dict -> the release's names and shapes, in its order (inverse of the above)."""
    return split_release_tensors(our_sd, _groups(), release_layout(cfg))


_RELEASE_KEYS = {  # release model_cfg key -> our MSSLConfig field
    "visual_input_size": "visual_dim",
    "query_input_size": "text_dim",
    "hidden_size": "hidden_size",
    "max_ctx_l": "max_frames",
    "max_desc_l": "max_query_len",
    "map_size": "n_clips",
    "input_drop": "input_drop",
    "drop": "drop",
    "n_heads": "n_heads",
    "initializer_range": "init_std",
    "margin": "margin",
    "hard_pool_size": "hard_pool_size",
}


def config_from_release(model_cfg: Mapping[str, Any], base: MSSLConfig) -> MSSLConfig:
    """`base` with the values the release's model_cfg sets (clip/frame score weights are not
    in it: they come from `base`, i.e. the dataset's recipe)."""
    changes: dict[str, Any] = {}
    for key, field in _RELEASE_KEYS.items():
        value = model_cfg.get(key)
        if value is None:
            continue
        kind = type(getattr(base, field))
        try:
            changes[field] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"release model_cfg: '{key}' = {value!r} is not a {kind.__name__}") from None
    return dataclasses.replace(base, **changes)


def is_release_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """{"model": an MS-SL state dict (key-clip mapping_linear and frame_encoder), "model_cfg"}."""
    sd = ckpt.get("model")
    if not isinstance(sd, Mapping) or "model_cfg" not in ckpt:
        return False
    names = {k[len("module."):] if k.startswith("module.") else k for k in sd}
    return "mapping_linear.0.weight" in names and "frame_encoder.self.query.weight" in names


def load_release(ckpt: Mapping[str, Any], base: MSSLConfig | None
                 ) -> tuple[MSSLConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, our state dict, info) from a release checkpoint."""
    if not isinstance(ckpt.get("model_cfg"), Mapping):
        raise ValueError(f"release checkpoint: 'model_cfg' is a {type(ckpt.get('model_cfg')).__name__}, "
                         "not a mapping")
    cfg = config_from_release(ckpt["model_cfg"], base if base is not None else MSSLConfig())
    state = convert_release_state_dict(ckpt["model"], cfg)
    epoch = ckpt.get("epoch")
    info = {"epoch": int(epoch) if isinstance(epoch, int) else None, "metrics": {},
            "extra": {"release_config": {str(k): v for k, v in dict(ckpt["model_cfg"]).items()
                                         if isinstance(v, (str, int, float, bool, type(None), list))}}}
    return cfg, state, info
