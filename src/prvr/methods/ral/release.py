"""RAL's release checkpoints onto our network (docs/ral.md).

The release's network is GMMFormer v2's module layout (branches `attnK`) plus the token branch
(`frame_branch_query_proj`, `frame_branch_query_encoder`, `text_weight_fc`) and the Gaussian
heads (`pie_net_video`, `uncertain_net_video`, `pie_net_text`, `uncertain_net_text`). Its loss
weights are partly in its config (`loss_factor`, `neg_factor`) and partly fixed in its code
(mil, vib: our defaults). A checkpoint from its `save_ckpt` is {"config", "epoch",
"model_val", "state_dict", "optimizer"} of plain types.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..gmmformer_v2.release import (_RELEASE_KEYS, config_from_release, release_groups, release_layout,
                                    release_metrics)
from ..gmmformer_v2.token_queries import token_branch_release_groups, with_token_branch
from ..layers import check_release_layout, fuse_release_tensors, split_release_tensors, strip_module_prefix
from . import prob
from .model import RAL, RALConfig

RELEASE_KEYS = {
    **_RELEASE_KEYS,
    "margin": "margin",
    "hard_pool_size": "hard_pool_size",
    "loss_factor[0]": "clip_nce",
    "loss_factor[1]": "frame_nce",
    "loss_factor[2]": "qdl",
    "loss_factor[3]": "oml",
    "neg_factor[0]": "qdl_delta",
    "neg_factor[1]": "qdl_alpha",
    "neg_factor[2]": "qdl_lambda",
}

_GAUSSIANS = (("video_gaussian", "pie_net_video", "uncertain_net_video"),
              ("text_gaussian", "pie_net_text", "uncertain_net_text"))


def ral_layout(cfg: RALConfig):
    """Every release parameter name and shape, in the release's state_dict order."""
    H = cfg.hidden_size
    heads = [e for _, pie, sigma in _GAUSSIANS for e in prob.release_layout(pie, sigma, H)]
    return with_token_branch(release_layout(cfg), cfg.text_dim, H, heads)


def ral_groups(cfg: RALConfig):
    yield from release_groups(cfg)
    yield from token_branch_release_groups()
    for ours, pie, sigma in _GAUSSIANS:
        yield from prob.release_groups(ours, pie, sigma)


def convert(sd: Mapping[str, Tensor], cfg: RALConfig) -> dict[str, Tensor]:
    """A release state dict -> ours (ValueError naming the first missing/mis-shaped tensor)."""
    sd = strip_module_prefix(sd)
    check_release_layout(sd, ral_layout(cfg), cfg)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in RAL(cfg).named_parameters()}
    return fuse_release_tensors(sd, ral_groups(cfg), shapes)


def to_release(our_sd: Mapping[str, Tensor], cfg: RALConfig) -> dict[str, Tensor]:
    """Ours -> the release's names and shapes."""
    return split_release_tensors(our_sd, ral_groups(cfg), ral_layout(cfg))


def is_release_checkpoint(ckpt: Any) -> bool:
    """{"config", "state_dict"} with v2's branches `clip_encoder.attnK` and RAL's Gaussian heads."""
    if not isinstance(ckpt, Mapping) or not all(k in ckpt for k in ("config", "state_dict")):
        return False
    sd = ckpt["state_dict"]
    if not isinstance(sd, Mapping):
        return False
    names = {k[len("module."):] if k.startswith("module.") else k for k in sd}
    return "weight_token" in names and "pie_net_video.fc.weight" in names \
        and any(n.startswith("clip_encoder.attn") for n in names)


def load_release(ckpt: Mapping[str, Any], base: RALConfig | None
                 ) -> tuple[RALConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, our state dict, info {epoch, metrics, extra}) from a release checkpoint."""
    if not isinstance(ckpt["state_dict"], Mapping) or not isinstance(ckpt["config"], Mapping):
        raise ValueError("release checkpoint with a non-dict 'config' or 'state_dict'")
    cfg = config_from_release(ckpt["config"], base if base is not None else RALConfig(), RELEASE_KEYS)
    state = convert(ckpt["state_dict"], cfg)
    info = {"epoch": ckpt.get("epoch"), "metrics": release_metrics(ckpt.get("model_val", ())),
            "extra": {"release_config": dict(ckpt["config"])}}
    return cfg, state, info
