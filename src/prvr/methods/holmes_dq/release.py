"""Holmes-DQ's release checkpoints (multisrc/ of lijun2005/ICML26-Holmes): Holmes' layout
(branches `e_attns.K`, an unread `weight_token`) plus the token branch
(`frame_branch_query_proj`, `frame_branch_query_encoder`, `text_weight_fc`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..gmmformer_v2.release import config_from_release, release_groups, release_metrics
from ..gmmformer_v2.token_queries import token_branch_release_groups, with_token_branch
from ..holmes.release import BRANCH, RELEASE_KEYS as HOLMES_KEYS, holmes_layout
from ..layers import check_release_layout, fuse_release_tensors, split_release_tensors, strip_module_prefix
from .model import HolmesDQ, HolmesDQConfig

RELEASE_KEYS = {**HOLMES_KEYS, "loss_factor[5]": "edl_dc"}


def dq_layout(cfg: HolmesDQConfig):
    return with_token_branch(holmes_layout(cfg), cfg.text_dim, cfg.hidden_size)


def _groups(cfg: HolmesDQConfig, token: bool):
    yield from release_groups(cfg, BRANCH, token)
    yield from token_branch_release_groups()


def convert(sd: Mapping[str, Tensor], cfg: HolmesDQConfig) -> dict[str, Tensor]:
    """A release state dict -> ours (ValueError naming the first missing/mis-shaped tensor); the
    release's unread weight token is checked for shape and dropped."""
    sd = strip_module_prefix(sd)
    check_release_layout(sd, dq_layout(cfg), cfg)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in HolmesDQ(cfg).named_parameters()}
    return fuse_release_tensors(sd, _groups(cfg, False), shapes)


def to_release(our_sd: Mapping[str, Tensor], cfg: HolmesDQConfig) -> dict[str, Tensor]:
    """Ours -> the release's names and shapes (its weight token written as zeros)."""
    layout = dq_layout(cfg)
    our_sd = {**our_sd, "weight_token": torch.zeros(dict(layout)["weight_token"])}
    return split_release_tensors(our_sd, _groups(cfg, True), layout)


def is_release_checkpoint(ckpt: Any) -> bool:
    """{"config", "state_dict"} with Holmes' `clip_encoder.e_attns.K` and the token branch."""
    if not isinstance(ckpt, Mapping) or not all(k in ckpt for k in ("config", "state_dict")):
        return False
    sd = ckpt["state_dict"]
    if not isinstance(sd, Mapping):
        return False
    names = {k[len("module."):] if k.startswith("module.") else k for k in sd}
    return "text_weight_fc.0.weight" in names and any(n.startswith("clip_encoder.e_attns.") for n in names)


def load_release(ckpt: Mapping[str, Any], base: HolmesDQConfig | None
                 ) -> tuple[HolmesDQConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, our state dict, info {epoch, metrics, extra}) from a release checkpoint."""
    if not isinstance(ckpt["state_dict"], Mapping) or not isinstance(ckpt["config"], Mapping):
        raise ValueError("release checkpoint with a non-dict 'config' or 'state_dict'")
    cfg = config_from_release(ckpt["config"], base if base is not None else HolmesDQConfig(), RELEASE_KEYS)
    state = convert(ckpt["state_dict"], cfg)
    info = {"epoch": ckpt.get("epoch"), "metrics": release_metrics(ckpt.get("model_val", ())),
            "extra": {"release_config": dict(ckpt["config"])}}
    return cfg, state, info
