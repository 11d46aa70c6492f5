"""Map the public GMMFormer v2 release's parameter layout onto ours and back.

The release keeps one module per Gaussian branch (`clip_encoder.attn0` .. `attn7`) with
separate query/key/value Linears; we stack the branches and fuse q/k/v (see
`prvr.methods.gmmformer_v2.model`). Every one of our tensors is the concatenation, in a fixed order, of one
or more release tensors flattened: e.g. `frame_consolidation.branches.qkv_weight`
(8, 3H, H) is [attn0.query, attn0.key, attn0.value, attn1.query, ...] row blocks. That one
rule (`release_groups`) drives both directions, so they cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ..layers import (check_release_layout, fuse_release_tensors, split_release_tensors,
                      strip_module_prefix)
from .model import GMMFormerConfig

__all__ = ["release_layout", "convert_release_state_dict", "to_release_state_dict", "config_from_release"]

Shape = tuple[int, ...]


def _layer(prefix: str, H: int, ffn: int) -> list[tuple[str, Shape]]:
    """Release names of one BertAttention / BertCrossAttention module, in release order."""
    out = []
    for part in ("query", "key", "value"):
        out += [(f"{prefix}.self.{part}.weight", (H, H)), (f"{prefix}.self.{part}.bias", (H,))]
    out += [(f"{prefix}.output.layer1.weight", (ffn, H)), (f"{prefix}.output.layer1.bias", (ffn,)),
            (f"{prefix}.output.layer2.weight", (H, ffn)), (f"{prefix}.output.layer2.bias", (H,))]
    for norm in ("norm1", "norm2"):
        out += [(f"{prefix}.{norm}.weight", (H,)), (f"{prefix}.{norm}.bias", (H,))]
    return out


def _proj(prefix: str, d_in: int, H: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.LayerNorm.weight", (d_in,)), (f"{prefix}.LayerNorm.bias", (d_in,)),
            (f"{prefix}.net.1.weight", (H, d_in)), (f"{prefix}.net.1.bias", (H,))]


def _pos(prefix: str, n: int, H: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.position_embeddings.weight", (n, H)),
            (f"{prefix}.LayerNorm.weight", (H,)), (f"{prefix}.LayerNorm.bias", (H,))]


# how the release names branch k of a block: v2 "attn{k}", Holmes (a ModuleList) "e_attns.{k}"
BRANCH = "attn{k}"


def _block(prefix: str, K: int, H: int, length: int, branch: str = BRANCH) -> list[tuple[str, Shape]]:
    out = []
    for k in range(K):
        out += _layer(f"{prefix}.{branch.format(k=k)}", H, 4 * H)
    out += _layer(f"{prefix}.ca", H, H)
    out += [(f"{prefix}.layer1.weight", (H, H)), (f"{prefix}.layer1.bias", (H,)),
            (f"{prefix}.layer2.weight", (length, H)), (f"{prefix}.layer2.bias", (length,))]
    return out


def release_layout(cfg: GMMFormerConfig, branch: str = BRANCH) -> list[tuple[str, Shape]]:
    """Every release parameter name and shape for `cfg`, in the release's state_dict order
    (`branch`: the name pattern of a block's branch k)."""
    H, K = cfg.hidden_size, len(cfg.widths)
    return ([("weight_token", (1, 1, H))]
            + _pos("query_pos_embed", cfg.max_query_len, H)
            + _pos("clip_pos_embed", cfg.max_frames, H)
            + _pos("frame_pos_embed", cfg.max_frames, H)
            + _proj("query_input_proj", cfg.text_dim, H)
            + _layer("query_encoder", H, 4 * H)
            + _proj("clip_input_proj", cfg.visual_dim, H)
            + _block("clip_encoder", K, H, cfg.n_clips, branch)
            + _proj("frame_input_proj", cfg.visual_dim, H)
            + _block("frame_encoder_1", K, H, cfg.max_frames, branch)
            + [("modular_vector_mapping.weight", (1, H))])


def release_groups(cfg: GMMFormerConfig, branch: str = BRANCH, token: bool = True
                   ) -> Iterator[tuple[str, list[str]]]:
    """(our name, release names whose flattened concatenation it is); `token`: our network has
    the learned weight token."""
    K = len(cfg.widths)

    def qkv(p: str, kind: str) -> list[str]:
        return [f"{p}.self.{x}.{kind}" for x in ("query", "key", "value")]

    def at(rel: str, k: int) -> str:
        return f"{rel}.{branch.format(k=k)}"

    if token:
        yield "weight_token", ["weight_token"]
    for ours, rel in (("query", "query"), ("clip", "clip"), ("frame", "frame")):
        yield f"{ours}_pos.embedding.weight", [f"{rel}_pos_embed.position_embeddings.weight"]
        for kind in ("weight", "bias"):
            yield f"{ours}_pos.norm.{kind}", [f"{rel}_pos_embed.LayerNorm.{kind}"]
            yield f"{ours}_proj.norm.{kind}", [f"{rel}_input_proj.LayerNorm.{kind}"]
            yield f"{ours}_proj.linear.{kind}", [f"{rel}_input_proj.net.1.{kind}"]
    for kind in ("weight", "bias"):
        yield f"query_layer.qkv.{kind}", qkv("query_encoder", kind)
        yield f"query_layer.ffn_in.{kind}", [f"query_encoder.output.layer1.{kind}"]
        yield f"query_layer.ffn_out.{kind}", [f"query_encoder.output.layer2.{kind}"]
        yield f"query_layer.norm1.{kind}", [f"query_encoder.norm1.{kind}"]
        yield f"query_layer.norm2.{kind}", [f"query_encoder.norm2.{kind}"]
    yield "query_pool.weight", ["modular_vector_mapping.weight"]
    for ours, rel in (("clip_consolidation", "clip_encoder"), ("frame_consolidation", "frame_encoder_1")):
        br, ca = f"{ours}.branches", f"{rel}.ca"
        for kind in ("weight", "bias"):
            yield f"{br}.qkv_{kind}", [n for k in range(K) for n in qkv(at(rel, k), kind)]
            yield f"{br}.ffn_in_{kind}", [f"{at(rel, k)}.output.layer1.{kind}" for k in range(K)]
            yield f"{br}.ffn_out_{kind}", [f"{at(rel, k)}.output.layer2.{kind}" for k in range(K)]
            yield f"{br}.norm1_{kind}", [f"{at(rel, k)}.norm1.{kind}" for k in range(K)]
            yield f"{br}.norm2_{kind}", [f"{at(rel, k)}.norm2.{kind}" for k in range(K)]
            ta = f"{ours}.token_attention"
            yield f"{ta}.query.{kind}", [f"{ca}.self.query.{kind}"]
            yield f"{ta}.key_value.{kind}", [f"{ca}.self.key.{kind}", f"{ca}.self.value.{kind}"]
            yield f"{ta}.ffn_in.{kind}", [f"{ca}.output.layer1.{kind}"]
            yield f"{ta}.ffn_out.{kind}", [f"{ca}.output.layer2.{kind}"]
            yield f"{ta}.norm1.{kind}", [f"{ca}.norm1.{kind}"]
            yield f"{ta}.norm2.{kind}", [f"{ca}.norm2.{kind}"]
            yield f"{ours}.mix_hidden.{kind}", [f"{rel}.layer1.{kind}"]
            yield f"{ours}.mix_out.{kind}", [f"{rel}.layer2.{kind}"]


def _our_shapes(cfg: GMMFormerConfig, model_class: type | None = None) -> dict[str, Shape]:
    from .model import GMMFormer
    with torch.device("meta"):
        model = (model_class or GMMFormer)(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def convert_release_state_dict(sd: Mapping[str, Tensor], cfg: GMMFormerConfig, model_class: type | None = None,
                               branch: str = BRANCH) -> dict[str, Tensor]:
    """A release `state_dict` (names of reference_state_dict_tvr.txt) -> our state_dict.

    `model_class` (default GMMFormer) is the network it is for and `branch` the release's name
    of branch k; the release's weight token is dropped when that network has no learned token.
    Raises ValueError naming the first missing or mis-shaped release tensor (in release
    order), or the unexpected extra names.
    """
    from .model import GMMFormer

    model_class = model_class or GMMFormer
    sd = strip_module_prefix(sd)
    check_release_layout(sd, release_layout(cfg, branch), cfg)
    return fuse_release_tensors(sd, release_groups(cfg, branch, model_class.learned_token),
                                _our_shapes(cfg, model_class))


def to_release_state_dict(our_sd: Mapping[str, Tensor], cfg: GMMFormerConfig, branch: str = BRANCH
                          ) -> dict[str, Tensor]:
    """Our state_dict -> the release's names and shapes (inverse of the conversion). Without a
    weight token in ours (a network that computes it), the release's is written as zeros: its
    network holds the parameter but never reads it."""
    token = "weight_token" in our_sd
    layout = release_layout(cfg, branch)
    if not token:
        our_sd = {**our_sd, "weight_token": torch.zeros(dict(layout)["weight_token"])}
    return split_release_tensors(our_sd, release_groups(cfg, branch, True), layout)


_RELEASE_KEYS = {  # release config key -> our GMMFormerConfig field
    "hidden_size": "hidden_size",
    "sft_factor": "sft_factor",
    "q_feat_size": "text_dim",
    "query_input_size": "text_dim",
    "visual_feat_dim": "visual_dim",
    "visual_input_size": "visual_dim",
    "n_heads": "n_heads",
    "max_desc_l": "max_query_len",
    "input_drop": "input_drop",
    "drop": "drop",
    "initializer_range": "init_std",
    "clip_scale_w": "clip_scale_w",
    "frame_scale_w": "frame_scale_w",
}


def config_from_release(release_config: Mapping[str, Any] | Any, base: GMMFormerConfig,
                        keys: Mapping[str, str] = _RELEASE_KEYS) -> GMMFormerConfig:
    """`base` with the values the release's config (dict, EasyDict or attribute object) sets.
    `keys`: release key -> our field; "name[i]" is item i of the release's list `name`."""
    def get(key):
        name, _, index = key.partition("[")
        value = (release_config.get(name) if isinstance(release_config, Mapping)
                 else getattr(release_config, name, None))
        if index and isinstance(value, (list, tuple)):
            i = int(index.rstrip("]"))
            return value[i] if i < len(value) else None
        return None if index else value
    changes: dict[str, Any] = {}
    for key, field in keys.items():
        value = get(key)
        if value is None:
            continue
        kind = type(getattr(base, field))
        try:
            changes[field] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"release config: '{key}' = {value!r} is not a {kind.__name__}") from None
    return dataclasses.replace(base, **changes)


def is_release_state_dict(sd: Any) -> bool:
    """A GMMFormer v2 release state dict: a weight token and Gaussian branches `clip_encoder.attnK`."""
    if not isinstance(sd, Mapping):
        return False
    names = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    return "weight_token" in names and any(n.startswith("clip_encoder.attn") for n in names)


def release_metrics(model_val: Any) -> dict[str, float]:
    """The release's model_val [r1, r5, r10, r100, sumr, ...] as a dict (NaNs and non-numbers
    dropped)."""
    import math

    out = {}
    try:
        pairs = list(zip(("r1", "r5", "r10", "r100", "sumr"), model_val))
    except TypeError:
        return {}
    for k, v in pairs:   # Holmes appends a None; skip what is not a number
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isnan(x):
            out[k] = x
    return out


def load_release(ckpt: Mapping[str, Any], base: GMMFormerConfig
                 ) -> tuple[GMMFormerConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, our state dict, info) from a release checkpoint {"config", "state_dict", ...}."""
    if not isinstance(ckpt["state_dict"], Mapping) or not isinstance(ckpt["config"], Mapping):
        raise ValueError("release checkpoint with a non-dict 'config' or 'state_dict'")
    cfg = config_from_release(ckpt["config"], base if base is not None else GMMFormerConfig())
    state = convert_release_state_dict(ckpt["state_dict"], cfg)
    info = {"epoch": ckpt.get("epoch"), "metrics": release_metrics(ckpt.get("model_val", ())),
            "extra": {"release_config": dict(ckpt["config"])}}
    return cfg, state, info
