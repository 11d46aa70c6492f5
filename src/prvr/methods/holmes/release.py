"""Holmes' release checkpoints (its `save_ckpt`: {"config", "epoch", "model_val", "state_dict",
"optimizer"}, all plain types) onto our network.

The release's network is GMMFormer v2's module layout with the branches in a ModuleList
(`clip_encoder.e_attns.K` instead of `attnK`), so GMMFormer v2's mapping applies with that
name. The release also holds a `weight_token` parameter that its forward never reads (the token
is computed); it is checked for shape and dropped, and written as zeros on export.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ..gmmformer_v2.release import (_RELEASE_KEYS, config_from_release, convert_release_state_dict,
                                    release_layout, release_metrics, to_release_state_dict)
from .model import Holmes, HolmesConfig

BRANCH = "e_attns.{k}"

# release config key -> our HolmesConfig field: the network's (as v2) and the objective's
RELEASE_KEYS = {
    **_RELEASE_KEYS,
    "margin": "margin",
    "hard_pool_size": "hard_pool_size",
    "loss_factor[0]": "clip_nce",
    "loss_factor[1]": "frame_nce",
    "loss_factor[2]": "qdl",
    "loss_factor[3]": "edl_intra",
    "loss_factor[4]": "edl",
    "neg_factor[0]": "qdl_delta",
    "neg_factor[1]": "qdl_alpha",
    "neg_factor[2]": "qdl_lambda",
    "edl_tau": "edl_tau",
    "edl_intra_video_tau": "edl_intra_tau",
    "pot_prompt_ratio": "pot_dustbin_quantile",
    "pot_scale": "pot_scale",
    "warmup_epoch": "warmup_epoch",
    "division_beta": "division_beta",
    "smooth_beta": "smooth_beta",
}


def holmes_layout(cfg: HolmesConfig):
    return release_layout(cfg, BRANCH)


def convert(sd: Mapping[str, Tensor], cfg: HolmesConfig) -> dict[str, Tensor]:
    """A release state dict -> ours (ValueError naming the first missing/mis-shaped tensor)."""
    return convert_release_state_dict(sd, cfg, Holmes, BRANCH)


def to_release(our_sd: Mapping[str, Tensor], cfg: HolmesConfig) -> dict[str, Tensor]:
    """Ours -> the release's names and shapes."""
    return to_release_state_dict(our_sd, cfg, BRANCH)


def is_release_checkpoint(ckpt: Any) -> bool:
    """{"config", "state_dict"} whose branches are named `clip_encoder.e_attns.K`."""
    if not isinstance(ckpt, Mapping) or not all(k in ckpt for k in ("config", "state_dict")):
        return False
    sd = ckpt["state_dict"]
    if not isinstance(sd, Mapping):
        return False
    names = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    return "weight_token" in names and any(n.startswith("clip_encoder.e_attns.") for n in names)


def load_release(ckpt: Mapping[str, Any], base: HolmesConfig | None
                 ) -> tuple[HolmesConfig, dict[str, Tensor], dict[str, Any]]:
    """(config, our state dict, info {epoch, metrics, extra}) from a release checkpoint."""
    if not isinstance(ckpt["state_dict"], Mapping) or not isinstance(ckpt["config"], Mapping):
        raise ValueError("release checkpoint with a non-dict 'config' or 'state_dict'")
    cfg = config_from_release(ckpt["config"], base if base is not None else HolmesConfig(), RELEASE_KEYS)
    state = convert(ckpt["state_dict"], cfg)
    info = {"epoch": ckpt.get("epoch"), "metrics": release_metrics(ckpt.get("model_val", ())),
            "extra": {"release_config": dict(ckpt["config"])}}
    return cfg, state, info
