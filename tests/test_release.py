"""Release state-dict mapping: names, shapes, where each tensor acts, errors, config."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from prvr.methods import available, get_method
from prvr.methods.gmmformer_v2.model import GMMFormer, GMMFormerConfig
from prvr.methods.gmmformer_v2.release import (config_from_release, convert_release_state_dict,
                                               is_release_state_dict, load_release, release_layout,
                                               to_release_state_dict)

SMALL = GMMFormerConfig(visual_dim=12, text_dim=10, hidden_size=8, n_heads=2, max_query_len=7, max_frames=20,
                        n_clips=5)
H = SMALL.hidden_size


def random_release_sd(cfg: GMMFormerConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g) for n, shape in release_layout(cfg)}


def expected_tvr_names() -> list[tuple[str, tuple]]:
    """The TVR release layout written out from its construction rules (independent of
    prvr.methods.gmmformer_v2.release): 297 tensors."""
    H, F = 384, 1536

    def layer(p, ffn):
        out = []
        for x in ("query", "key", "value"):
            out += [(f"{p}.self.{x}.weight", (H, H)), (f"{p}.self.{x}.bias", (H,))]
        out += [(f"{p}.output.layer1.weight", (ffn, H)), (f"{p}.output.layer1.bias", (ffn,)),
                (f"{p}.output.layer2.weight", (H, ffn)), (f"{p}.output.layer2.bias", (H,))]
        return out + [(f"{p}.{n}.{k}", (H,)) for n in ("norm1", "norm2") for k in ("weight", "bias")]

    def pos(p, n):
        return [(f"{p}.position_embeddings.weight", (n, H)), (f"{p}.LayerNorm.weight", (H,)),
                (f"{p}.LayerNorm.bias", (H,))]

    def proj(p, d):
        return [(f"{p}.LayerNorm.weight", (d,)), (f"{p}.LayerNorm.bias", (d,)),
                (f"{p}.net.1.weight", (H, d)), (f"{p}.net.1.bias", (H,))]

    def block(p, L):
        out = [t for k in range(8) for t in layer(f"{p}.attn{k}", F)] + layer(f"{p}.ca", H)
        return out + [(f"{p}.layer1.weight", (H, H)), (f"{p}.layer1.bias", (H,)),
                      (f"{p}.layer2.weight", (L, H)), (f"{p}.layer2.bias", (L,))]

    return ([("weight_token", (1, 1, H))] + pos("query_pos_embed", 30) + pos("clip_pos_embed", 128)
            + pos("frame_pos_embed", 128) + proj("query_input_proj", 768) + layer("query_encoder", F)
            + proj("clip_input_proj", 3072) + block("clip_encoder", 32) + proj("frame_input_proj", 3072)
            + block("frame_encoder_1", 128) + [("modular_vector_mapping.weight", (1, H))])


def test_tvr_layout_matches_the_release_names_and_shapes():
    assert release_layout(GMMFormerConfig()) == expected_tvr_names()
    assert len(expected_tvr_names()) == 297


def test_tvr_layout_matches_the_reference_listing_in_docs():
    ref = Path(__file__).resolve().parents[1] / "docs" / "reference_state_dict_tvr.txt"
    rows = []
    for line in ref.read_text().splitlines():
        if line.strip():
            name, shape = re.match(r"(\S+)\s+(\(.*\))", line).groups()
            rows.append((name, tuple(ast.literal_eval(shape))))
    assert rows == release_layout(GMMFormerConfig())


def test_full_tvr_release_state_dict_loads():
    cfg = GMMFormerConfig()
    sd = {n: torch.zeros(shape) for n, shape in release_layout(cfg)}
    sd["frame_encoder_1.attn7.output.layer2.bias"] = torch.full((384,), 0.5)
    ours = convert_release_state_dict(sd, cfg)
    model = GMMFormer(cfg)
    model.load_state_dict(ours)  # strict: every one of our tensors is produced, nothing else
    assert model.frame_consolidation.branches.ffn_out_bias[7].eq(0.5).all()
    assert model.frame_consolidation.branches.ffn_out_bias[:7].eq(0).all()


def test_round_trip_both_ways():
    sd = random_release_sd(SMALL)
    ours = convert_release_state_dict(sd, SMALL)
    back = to_release_state_dict(ours, SMALL)
    assert list(back) == [n for n, _ in release_layout(SMALL)]
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    model = GMMFormer(SMALL)
    again = convert_release_state_dict(to_release_state_dict(model.state_dict(), SMALL), SMALL)
    assert all(torch.equal(again[n], t) for n, t in model.state_dict().items())


def test_each_release_tensor_lands_where_it_acts():
    sd = random_release_sd(SMALL)
    sd["clip_encoder.attn3.self.key.weight"] = torch.full((H, H), 7.0)
    sd["clip_encoder.attn3.self.value.bias"] = torch.full((H,), -2.0)
    sd["frame_encoder_1.attn5.norm2.weight"] = torch.full((H,), 3.0)
    sd["frame_encoder_1.ca.self.value.weight"] = torch.full((H, H), 4.0)
    sd["query_encoder.self.query.bias"] = torch.full((H,), 9.0)
    sd["clip_pos_embed.LayerNorm.weight"] = torch.full((H,), 5.0)
    ours = convert_release_state_dict(sd, SMALL)
    qkv = ours["clip_consolidation.branches.qkv_weight"]
    assert qkv.shape == (8, 3 * H, H)
    assert qkv[3, H:2 * H].eq(7.0).all() and not qkv[3, :H].eq(7.0).any() and not qkv[2].eq(7.0).any()
    assert torch.equal(qkv[3, :H], sd["clip_encoder.attn3.self.query.weight"])
    assert torch.equal(qkv[6, 2 * H:], sd["clip_encoder.attn6.self.value.weight"])
    assert ours["clip_consolidation.branches.qkv_bias"][3, 2 * H:].eq(-2.0).all()
    assert ours["frame_consolidation.branches.norm2_weight"][5].eq(3.0).all()
    assert ours["frame_consolidation.token_attention.key_value.weight"][H:].eq(4.0).all()
    assert ours["query_layer.qkv.bias"][:H].eq(9.0).all() and not ours["query_layer.qkv.bias"][H:].eq(9.0).any()
    assert ours["clip_pos.norm.weight"].eq(5.0).all()
    assert torch.equal(ours["weight_token"], sd["weight_token"].view(H))
    assert torch.equal(ours["query_pool.weight"], sd["modular_vector_mapping.weight"])
    assert torch.equal(ours["frame_consolidation.mix_out.weight"], sd["frame_encoder_1.layer2.weight"])


def test_perturbing_attn3_changes_only_the_width_5_branch():
    sd = random_release_sd(SMALL)
    model = GMMFormer(SMALL).eval()
    model.load_state_dict(convert_release_state_dict(sd, SMALL))
    assert model.cfg.widths[3] == 5.0
    x = torch.randn(2, SMALL.n_clips, H)
    branches = model.clip_consolidation.branches
    with torch.no_grad():
        before = branches(x, None)
        sd2 = dict(sd)
        sd2["clip_encoder.attn3.self.key.weight"] = sd["clip_encoder.attn3.self.key.weight"] + 0.5
        sd2["clip_encoder.attn3.output.layer1.weight"] = sd["clip_encoder.attn3.output.layer1.weight"] * 2
        model.load_state_dict(convert_release_state_dict(sd2, SMALL))
        after = branches(x, None)
    changed = [(before[k] - after[k]).abs().max().item() > 1e-4 for k in range(8)]
    assert changed == [k == 3 for k in range(8)]


def test_missing_tensor_is_named():
    sd = random_release_sd(SMALL)
    del sd["frame_encoder_1.attn2.norm1.bias"]
    del sd["modular_vector_mapping.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'frame_encoder_1\.attn2\.norm1\.bias'"):
        convert_release_state_dict(sd, SMALL)


def test_misshaped_tensor_is_named():
    sd = random_release_sd(SMALL)
    sd["clip_encoder.attn4.output.layer1.weight"] = torch.zeros(4 * H, H + 1)
    with pytest.raises(ValueError, match=r"'clip_encoder\.attn4\.output\.layer1\.weight' has shape \(32, 9\), "
                                         r"expected \(32, 8\)"):
        convert_release_state_dict(sd, SMALL)
    # a checkpoint of another hidden size names the first tensor that disagrees
    with pytest.raises(ValueError, match="'weight_token' has shape"):
        convert_release_state_dict(random_release_sd(SMALL), GMMFormerConfig(**{**SMALL.__dict__, "hidden_size": 16}))


def test_unexpected_tensors_are_named():
    sd = random_release_sd(SMALL)
    sd["clip_encoder.attn8.self.query.weight"] = torch.zeros(H, H)
    with pytest.raises(ValueError, match=r"unexpected tensors \['clip_encoder\.attn8\.self\.query\.weight'\]"):
        convert_release_state_dict(sd, SMALL)


def test_data_parallel_prefix_is_accepted():
    sd = random_release_sd(SMALL)
    ours = convert_release_state_dict({"module." + k: v for k, v in sd.items()}, SMALL)
    assert torch.equal(ours["query_proj.linear.weight"], sd["query_input_proj.net.1.weight"])


class _AttrConfig:
    hidden_size = 16
    sft_factor = 0.6
    q_feat_size = 1024
    visual_feat_dim = 1024
    lr = 2e-4  # not a model setting


def test_config_from_release_dict_and_object():
    base = GMMFormerConfig()
    cfg = config_from_release({"hidden_size": 256, "sft_factor": 0.6, "q_feat_size": 1024,
                               "visual_feat_dim": 2048, "margin": 0.2}, base)
    assert (cfg.hidden_size, cfg.sft_factor, cfg.text_dim, cfg.visual_dim) == (256, 0.6, 1024, 2048)
    assert cfg.n_heads == base.n_heads and cfg.max_frames == 128 and base.hidden_size == 384
    cfg = config_from_release(_AttrConfig(), base)
    assert (cfg.hidden_size, cfg.sft_factor, cfg.text_dim, cfg.visual_dim) == (16, 0.6, 1024, 1024)
    assert config_from_release({}, base) == base
    # the release's model-builder names work too
    assert config_from_release({"visual_input_size": 500, "query_input_size": 300}, base).visual_dim == 500
    with pytest.raises(ValueError, match="'hidden_size'"):
        config_from_release({"hidden_size": "big"}, base)


def test_release_checkpoint_is_recognised_by_gmmformer_v2_only():
    """The registry asks every method whether a checkpoint is its release's: a GMMFormer v2
    release state dict (with or without a DataParallel prefix) is v2's and no other method's."""
    sd = random_release_sd(SMALL)
    for state in (sd, {"module." + k: v for k, v in sd.items()}):
        ckpt = {"config": {"hidden_size": H}, "state_dict": state, "epoch": 3}
        assert [n for n in available() if get_method(n).is_release_checkpoint(ckpt)] == ["gmmformer_v2"]
    method = get_method("gmmformer_v2")
    assert not method.is_release_checkpoint({"state_dict": sd})  # no release config
    assert not method.is_release_checkpoint({"config": {}, "state_dict": GMMFormer(SMALL).state_dict()})  # ours
    assert not is_release_state_dict({k: v for k, v in sd.items() if k != "weight_token"})
    assert not is_release_state_dict([1, 2])


def test_load_release_gives_config_state_and_info():
    sd = random_release_sd(SMALL)
    release_cfg = {"hidden_size": H, "q_feat_size": SMALL.text_dim, "visual_feat_dim": SMALL.visual_dim,
                   "n_heads": 2, "max_desc_l": SMALL.max_query_len, "lr": 1e-4}
    base = GMMFormerConfig(max_frames=SMALL.max_frames, n_clips=SMALL.n_clips)
    cfg, state, info = load_release({"config": release_cfg, "state_dict": sd, "epoch": 4,
                                     "model_val": [1.0, 2.0, float("nan"), 4.0, 7.0]}, base)
    assert cfg == SMALL
    assert all(torch.equal(state[k], v) for k, v in convert_release_state_dict(sd, SMALL).items())
    assert info["epoch"] == 4 and info["metrics"] == {"r1": 1.0, "r5": 2.0, "r100": 4.0, "sumr": 7.0}
    assert info["extra"]["release_config"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="non-dict 'config'"):
        load_release({"config": [1], "state_dict": sd}, base)
