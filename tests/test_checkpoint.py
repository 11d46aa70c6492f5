import dataclasses
import sys
import types

import pytest
import torch

from prvr.checkpoint import FORMAT, FORMAT_V1, VERSION, CheckpointError, load_checkpoint, load_model, save_checkpoint
from prvr.methods.gmmformer_v2.model import GMMFormer, GMMFormerConfig
from prvr.methods.gmmformer_v2.release import config_from_release, convert_release_state_dict, to_release_state_dict
from prvr.methods.meanpool import MeanPool, MeanPoolConfig

METHOD = "gmmformer_v2"

CFG = GMMFormerConfig(visual_dim=10, text_dim=6, hidden_size=8, n_heads=2, max_query_len=5,
                      max_frames=12, n_clips=4, sft_factor=0.5)


def make_model(seed=0):
    torch.manual_seed(seed)
    return GMMFormer(CFG)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 5:] = False
    qmask = torch.ones(4, 5, dtype=torch.bool)
    qmask[1, 2:] = False
    return dict(clip_feats=torch.randn(3, 4, 10, generator=g), frame_feats=torch.randn(3, 12, 10, generator=g),
                frame_mask=mask, query_feats=torch.randn(4, 5, 6, generator=g), query_mask=qmask,
                query_labels=torch.tensor([0, 1, 2, 2]))


def scores_of(model):
    model.eval()
    with torch.no_grad():
        out = model(inputs())
    return out.scores["clip"], out.scores["frame"]


def stepped_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=False)
    model.train()
    out = model(inputs())
    (out.scores["clip"].sum() + out.scores["frame"].sum()).backward()
    opt.step()
    return opt


def release_config():
    return {"hidden_size": 8, "q_feat_size": 6, "visual_feat_dim": 10, "n_heads": 2, "max_desc_l": 5,
            "sft_factor": 0.5, "input_drop": 0.2, "drop": 0.2, "clip_scale_w": 0.7, "frame_scale_w": 0.3,
            "lr": 3e-4, "loss_factor": [0.05, 0.04, 8e-5, 0.09], "model_name": "gmmformer_v2"}


def test_round_trip_restores_model_optimizer_and_metadata(tmp_path):
    model = make_model()
    opt = stepped_optimizer(model)
    settings = {"dataset": "demo", "model": dataclasses.asdict(CFG), "train": {"seed": 9527}}
    path = save_checkpoint(tmp_path / "ck" / "best.ckpt", model, METHOD, opt, epoch=7,
                           metrics={"sumr": 123.5, "r1": torch.tensor(1.5)}, settings=settings,
                           extra={"best_epoch": 7, "note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]  # no temp left behind
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == FORMAT and raw["version"] == VERSION == 2 and raw["method"] == METHOD
    assert raw["model_config"]["hidden_size"] == 8

    loaded, info = load_model(path, "cpu")
    assert not loaded.training
    assert info["kind"] == "prvr" and info["method"] == METHOD and info["epoch"] == 7
    assert info["metrics"] == {"sumr": 123.5, "r1": 1.5}
    assert info["settings"]["train"] == {"seed": 9527}
    from prvr.config import settings_hash
    assert info["settings_hash"] == settings_hash(settings)
    assert info["extra"] == {"best_epoch": 7, "note": "x"}
    assert GMMFormerConfig(**info["model_config"]) == CFG
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    for a, b in zip(scores_of(model), scores_of(loaded)):   # auto on the CPU: the CPU backend
        assert torch.allclose(a, b, atol=1e-5)
    same, _ = load_model(path, "cpu", backend="reference")
    assert type(same) is type(model) and type(loaded) is not type(model)
    for a, b in zip(scores_of(model), scores_of(same)):
        assert torch.equal(a, b)

    opt2 = torch.optim.SGD(loaded.parameters(), lr=1e-3, momentum=0.9, foreach=False)
    opt2.load_state_dict(info["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k]["momentum_buffer"], s2[k]["momentum_buffer"]) for k in s1)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    model = make_model()
    path = save_checkpoint(tmp_path / "a.ckpt", model, METHOD, epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, METHOD, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_release_checkpoint_loads_and_scores_like_its_converted_state_dict(tmp_path):
    model = make_model(seed=3)
    release_sd = to_release_state_dict(model.state_dict(), CFG)
    path = tmp_path / "release_best.ckpt"
    torch.save({"config": release_config(), "epoch": 11, "model_val": [1.0, 2.0, 3.0, 4.0, 10.0],
                "state_dict": release_sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    base = GMMFormerConfig(visual_dim=3072, max_frames=12, n_clips=4)  # dims come from the release config
    # the reference network on both sides, so the scores can match bit for bit (the CPU
    # backend is held to its own tolerance in test_backend_equality)
    loaded, info = load_model(path, "cpu", base_config=base, backend="reference")
    assert info["kind"] == "release" and info["method"] == METHOD and info["epoch"] == 11
    assert info["metrics"] == {"r1": 1.0, "r5": 2.0, "r10": 3.0, "r100": 4.0, "sumr": 10.0}
    assert info["extra"]["release_config"]["model_name"] == "gmmformer_v2"

    direct = GMMFormer(config_from_release(release_config(), base))
    direct.load_state_dict(convert_release_state_dict(release_sd, direct.cfg))
    for a, b, c in zip(scores_of(loaded), scores_of(direct), scores_of(model)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)


def test_data_parallel_prefixes_are_stripped(tmp_path):
    model = make_model(seed=4)
    sd = {"module." + k: v for k, v in to_release_state_dict(model.state_dict(), CFG).items()}
    path = tmp_path / "dp.ckpt"
    torch.save({"config": release_config(), "epoch": 0, "model_val": [0.0] * 5, "state_dict": sd,
                "optimizer": {}}, path)
    loaded, _ = load_model(path, "cpu", base_config=GMMFormerConfig(max_frames=12, n_clips=4), backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(scores_of(loaded), scores_of(model)))

    ours = tmp_path / "ddp.ckpt"
    save_checkpoint(ours, model, METHOD, epoch=0)
    ck = torch.load(ours, weights_only=True)
    ck["state_dict"] = {"module." + k: v for k, v in ck["state_dict"].items()}
    torch.save(ck, ours)
    loaded, _ = load_model(ours, "cpu", backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(scores_of(loaded), scores_of(model)))


def test_easydict_release_config_loads_without_easydict(tmp_path):
    module = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None):
            super().__init__()
            for k, v in (d or {}).items():
                setattr(self, k, v)

        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__ = "easydict"
    EasyDict.__qualname__ = "EasyDict"
    module.EasyDict = EasyDict
    model = make_model(seed=5)
    path = tmp_path / "ed.ckpt"
    sys.modules["easydict"] = module
    try:
        torch.save({"config": EasyDict(release_config()), "epoch": 2, "model_val": [0.0] * 5,
                    "state_dict": to_release_state_dict(model.state_dict(), CFG), "optimizer": {}}, path)
    finally:
        del sys.modules["easydict"]
    ck = load_checkpoint(path)
    assert type(ck["config"]) is dict and ck["config"]["q_feat_size"] == 6
    loaded, info = load_model(path, "cpu", base_config=GMMFormerConfig(max_frames=12, n_clips=4))
    assert loaded.cfg.hidden_size == 8 and info["epoch"] == 2


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    model = make_model()
    good = save_checkpoint(tmp_path / "good.ckpt", model, METHOD, epoch=1)
    blob = good.read_bytes()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(blob[: len(blob) // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match=bad.name) as exc:
            load_model(bad, "cpu")
        assert "\n" not in str(exc.value)

    with pytest.raises(CheckpointError, match="missing.ckpt: not found"):
        load_checkpoint(tmp_path / "missing.ckpt")

    evil = tmp_path / "evil.ckpt"
    torch.save({"config": Evil(), "state_dict": {}}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt: not loadable as a safe.*Unsupported global") as exc:
        load_checkpoint(evil)
    assert "\n" not in str(exc.value)

    other = tmp_path / "other.ckpt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="other.ckpt: not a prvr or release checkpoint"):
        load_model(other, "cpu")
    torch.save([1, 2], other)
    with pytest.raises(CheckpointError, match="other.ckpt: not a checkpoint"):
        load_checkpoint(other)


def test_wrong_state_dicts_name_the_first_problem(tmp_path):
    model = make_model()
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, METHOD)
    ck = torch.load(path, weights_only=True)

    bad = dict(ck, state_dict={k: v for k, v in ck["state_dict"].items() if k != "weight_token"})
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="m.ckpt: state_dict lacks 'weight_token'"):
        load_model(path, "cpu")

    sd = dict(ck["state_dict"])
    expected = tuple(sd["weight_token"].shape)
    sd["weight_token"] = torch.zeros(1, 1, 9)
    torch.save(dict(ck, state_dict=sd), path)
    with pytest.raises(CheckpointError, match=rf"'weight_token' has shape \(1, 1, 9\), the model expects "
                                              rf"\({expected[0]},\)"):
        load_model(path, "cpu")

    torch.save(dict(ck, model_config=dict(ck["model_config"], colour="red")), path)
    with pytest.raises(CheckpointError, match="m.ckpt: bad model_config.*colour"):
        load_model(path, "cpu")

    rel = to_release_state_dict(model.state_dict(), CFG)
    rel.pop("query_pos_embed.LayerNorm.bias")
    torch.save({"config": release_config(), "state_dict": rel, "epoch": 0, "model_val": [], "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="m.ckpt: cannot convert the gmmformer_v2 release checkpoint "
                                              r"\(ValueError: .*missing tensor 'query_pos_embed\.LayerNorm\.bias'") as exc:
        load_model(path, "cpu", base_config=GMMFormerConfig(max_frames=12, n_clips=4))
    assert "\n" not in str(exc.value)
    # without its weight token it is no method's release any more: the error says so
    rel.pop("weight_token")
    torch.save({"config": release_config(), "state_dict": rel, "epoch": 0, "model_val": [], "optimizer": {}}, path)
    with pytest.raises(CheckpointError, match="m.ckpt: not a release checkpoint of any known method"):
        load_model(path, "cpu", base_config=GMMFormerConfig(max_frames=12, n_clips=4))


def test_bare_state_dict_needs_a_base_config(tmp_path):
    model = make_model(seed=6)
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="sd.pt: a bare state dict; pass its method and base config"):
        load_model(path, "cpu")
    with pytest.raises(CheckpointError, match="sd.pt: a base config needs its method"):
        load_model(path, "cpu", base_config=dataclasses.asdict(CFG))
    loaded, info = load_model(path, "cpu", method=METHOD, base_config=dataclasses.asdict(CFG), backend="reference")
    assert info["kind"] == "state_dict" and info["method"] == METHOD and info["backend"] == "reference"
    assert all(torch.equal(a, b) for a, b in zip(scores_of(loaded), scores_of(model)))


def test_a_checkpoint_of_one_method_cannot_be_loaded_as_another(tmp_path):
    ours = save_checkpoint(tmp_path / "gmm.ckpt", make_model(), METHOD, epoch=1)
    torch.manual_seed(0)
    floor = save_checkpoint(tmp_path / "floor.ckpt", MeanPool(MeanPoolConfig(visual_dim=10, text_dim=6, hidden_size=8)),
                            "meanpool", epoch=1)
    cases = [(ours, "meanpool", "gmm.ckpt: a gmmformer_v2 checkpoint; it cannot be loaded as meanpool"),
             (floor, METHOD, "floor.ckpt: a meanpool checkpoint; it cannot be loaded as gmmformer_v2")]
    for path, other, message in cases:
        with pytest.raises(CheckpointError) as exc:
            load_model(path, "cpu", method=other)
        assert str(exc.value) == f"{path.parent / message}" and "\n" not in str(exc.value)
    # each loads as its own method, named or not
    loaded, info = load_model(floor, "cpu")
    assert isinstance(loaded, MeanPool) and info["method"] == "meanpool"
    loaded, info = load_model(ours, "cpu", method=METHOD)
    assert isinstance(loaded, GMMFormer) and info["method"] == METHOD
    # a release checkpoint asked for as another method's release
    release = tmp_path / "release.ckpt"
    torch.save({"config": release_config(), "state_dict": to_release_state_dict(make_model().state_dict(), CFG),
                "epoch": 0, "model_val": [], "optimizer": {}}, release)
    with pytest.raises(CheckpointError, match="release.ckpt: not a gmmformer_v1 release checkpoint") as exc:
        load_model(release, "cpu", method="gmmformer_v1")
    assert "\n" not in str(exc.value)


def test_recorded_method_must_be_known_and_the_first_format_is_gmmformer_v2(tmp_path):
    model = make_model(seed=2)
    path = save_checkpoint(tmp_path / "m.ckpt", model, METHOD, epoch=3)
    ck = torch.load(path, weights_only=True)
    torch.save(dict(ck, method="nope"), path)
    with pytest.raises(CheckpointError, match=r"m.ckpt: unknown method 'nope' \(known: .*gmmformer_v2") as exc:
        load_model(path, "cpu")
    assert "\n" not in str(exc.value)
    # version 1 ("prvr-gmmformer-v2") recorded no method: it loads as GMMFormer v2
    v1 = {k: v for k, v in ck.items() if k != "method"}
    torch.save(dict(v1, format=FORMAT_V1, version=1), path)
    loaded, info = load_model(path, "cpu", backend="reference")
    assert info["kind"] == "prvr" and info["method"] == METHOD and info["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(scores_of(loaded), scores_of(model)))


def test_the_static_allow_list_is_every_methods_release_globals():
    from prvr.checkpoint import RELEASE_GLOBALS, allowed_globals
    from prvr.methods import available, get_method

    for name in available():
        assert tuple(RELEASE_GLOBALS.get(name, ())) == tuple(get_method(name).release_globals), name
    assert {g for globs in RELEASE_GLOBALS.values() for g in globs} <= set(allowed_globals())


def test_loading_a_gmmformer_v2_checkpoint_imports_no_other_method(tmp_path):
    """Loading builds only the checkpoint's own method: the allow-list asks no method, so MS-SL,
    GMMFormer v1 and the floor are never imported (fresh interpreter, its sys.modules)."""
    import subprocess

    path = save_checkpoint(tmp_path / "v2.ckpt", make_model(), METHOD, epoch=1)
    code = ("import sys; from prvr.checkpoint import load_model; model, info = load_model(sys.argv[1], 'cpu'); "
            "print(info['method']); print(sorted(m for m in sys.modules if m.startswith('prvr.methods.')))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    assert out[0] == METHOD
    loaded = eval(out[1])  # noqa: S307 - the list the child printed
    assert any(m.startswith("prvr.methods.gmmformer_v2") for m in loaded)
    assert not [m for m in loaded if m.split(".")[2] in ("msssl", "gmmformer_v1", "meanpool")], loaded
