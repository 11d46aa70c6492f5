"""The GPU paths (bf16 autocast, TF32, torch.compile, pinned memory and prefetch, data-loader
workers, the evaluation memory budget), run on CPU; tests named test_cuda_* need CUDA
(benchmarks/gpu_check.sh runs them on a GPU machine)."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from conftest import TINY_RECIPE, TINY_SCALE, assert_same_batches
from prvr.accel import (Compiled, DevicePrefetcher, autocast, fp32_output, maybe_compile, tf32,
                        use_pin_memory)
from prvr.config import ConfigError, load_params, load_settings, resolve
from prvr.data import demo
from prvr.data.datasets import Corpus, make_eval_loaders, make_train_loader
from prvr.data.layout import default_h5_feature, default_query_feature
from prvr.distributed import DistContext
from prvr.backends.cpu.kernels import switches
from prvr.evaluation import block_plan, encode_queries, encode_videos, evaluate, score_matrix
from prvr.methods import get_method
from prvr.training import EpochShuffleSampler, fingerprint, stream_kw, train, train_dataset, train_loader

METHODS = ("gmmformer_v2", "gmmformer_v1", "msssl", "meanpool")
REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """The tiny demo corpus in both layouts (memmap BigFile and the CLIP HDF5 files)."""
    root = tmp_path_factory.mktemp("gpu_paths_demo")
    return demo.generate_corpus(root, "demo", seed=7, scale=TINY_SCALE, progress=False, layout="both")


def _corpus(cdir: Path, hdf5: bool = False) -> Corpus:
    if hdf5:
        return Corpus(cdir, default_h5_feature("demo"), feature_format="hdf5",
                      query_feature=default_query_feature("demo", "hdf5"))
    return Corpus(cdir, "demo_feats")


def _settings(method: str, **train) -> dict:
    s = load_settings(REPO / "params.yaml", "demo", method)
    s["model"]["hidden_size"] = TINY_RECIPE["hidden_size"]
    s["train"].update({"device": "cpu", "epochs": 1, "batch_size": 20, **train})
    return s


def _model(method: str, seed: int = 0, **cfg):
    m = get_method(method)
    model_cfg = {**_settings(method)["model"], **cfg}
    torch.manual_seed(seed)
    return m.build_model(m.config_from_dict(model_cfg)).eval(), m, model_cfg


def _scores(model, cdir: Path, cfg: dict, device="cpu", **kw):
    vl, ql = make_eval_loaders(_corpus(cdir), "test", 16, 20, 0, **stream_kw(cfg))
    return evaluate(model, vl, ql, device, progress=False, **kw)


def _batches(loader) -> list[dict]:
    return [{k: (v.clone() if torch.is_tensor(v) else list(v)) for k, v in b.items()} for b in loader]


# ------------------------------------------------------------------------------ settings

def test_accelerator_settings_are_checked_with_one_line_errors():
    params = load_params(REPO / "params.yaml")
    s = resolve(params, "demo")
    assert (s["train"]["precision"], s["train"]["tf32"], s["train"]["compile"]) == ("fp32", True, False)
    assert s["evaluate"]["precision"] == "fp32" and s["evaluate"]["memory_budget_mb"] > 0
    for section, key, bad, msg in [("train", "precision", "fp16", r"train.precision 'fp16': expected one of fp32, bf16"),
                                   ("train", "compile", 3, r"train.compile 3: expected false, true"),
                                   ("train", "pin_memory", "always", r"train.pin_memory 'always'"),
                                   ("train", "tf32", "yes", r"train.tf32 'yes'"),
                                   ("evaluate", "precision", "half", r"evaluate.precision 'half'"),
                                   ("evaluate", "memory_budget_mb", 0, r"evaluate.memory_budget_mb 0")]:
        p = copy.deepcopy(params)
        p[section][key] = bad
        with pytest.raises(ConfigError, match=msg):
            resolve(p, "demo")
    with pytest.raises(ConfigError, match="train.compile 'inductr': not a torch.compile backend"):
        maybe_compile(torch.nn.Linear(2, 2), "inductr")


def test_precision_and_compile_are_in_the_resume_fingerprint_pin_memory_is_not():
    base = _settings("meanpool")
    fp = fingerprint(base, None)["settings_hash"]
    for key, value in (("precision", "bf16"), ("compile", "aot_eager"), ("tf32", False)):
        assert fingerprint({**base, "train": {**base["train"], key: value}}, None)["settings_hash"] != fp
    assert fingerprint({**base, "train": {**base["train"], "pin_memory": "false"}}, None)["settings_hash"] == fp
    assert use_pin_memory("auto", torch.device("cpu")) is False          # pinning needs CUDA
    assert use_pin_memory("true", torch.device("cpu")) is False


def test_tf32_switches_cuda_matmul_precision_and_restores_it():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32(True):
        assert matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
        with tf32(False):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    with tf32(True):
        assert torch.equal(a @ b, a @ b.clone())      # a no-op for CPU matmuls
        tf32_cpu = a @ b
    assert torch.equal(tf32_cpu, a @ b)


# ------------------------------------------------------------------------------ bf16

@pytest.mark.parametrize("method", METHODS)
def test_bf16_eval_scores_are_within_1e_2_of_fp32_on_the_demo(corpus_dir, method):
    model, _, cfg = _model(method)
    m32, r32 = _scores(model, corpus_dir, cfg)
    m16, r16 = _scores(model, corpus_dir, cfg, precision="bf16")
    assert r16.scores.dtype == torch.float32 and r16.video_ids == r32.video_ids
    diff = (r16.scores - r32.scores).abs()
    if method != "msssl":
        assert diff.max() <= 1e-2, float(diff.max())
    else:
        # MS-SL's frame score attends from the ARGMAX proposal of 528 overlapping windows: where
        # bf16 rounding picks a near-tied neighbour, that pair's frame score moves with it.
        # Its clip score (a max, continuous) and every pair with the same key stay within 1e-2.
        same, clip_diff = _msssl_same_key(model, corpus_dir, cfg)
        assert clip_diff <= 1e-2 and same.float().mean() > 0.9
        assert diff[same].max() <= 1e-2, float(diff[same].max())
    assert abs(m16["sumr"] - m32["sumr"]) <= 5.0


def _msssl_same_key(model, cdir: Path, cfg: dict):
    from prvr.methods.msssl.model import clip_scale

    vl, ql = make_eval_loaders(_corpus(cdir), "test", 16, 20, 0, **stream_kw(cfg))
    out = {}
    for precision in ("fp32", "bf16"):
        bank = encode_videos(model, vl, "cpu", progress=False, precision=precision)
        query, _, _ = encode_queries(model, ql, "cpu", progress=False, precision=precision)
        with torch.no_grad(), autocast("cpu", precision):
            out[precision] = clip_scale(query, bank.fixed["clips"], model.proposals)
    clip_diff = float((out["bf16"]["clip"].float() - out["fp32"]["clip"]).abs().max())
    return out["bf16"]["key"] == out["fp32"]["key"], clip_diff


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_step_keeps_fp32_weights_gradients_and_losses(corpus_dir, method):
    model, m, cfg = _model(method)
    model.train()
    loss_fn = m.build_loss(m.config_from_dict(cfg))
    batch = next(iter(make_train_loader(_corpus(corpus_dir), 20, seed=0, **stream_kw(cfg))))
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        # under autocast the CPU takes the portable kernels (CUDA's path): so does the reference
        with switches(portable=True), autocast("cpu", precision):
            out = model(batch)
        terms = loss_fn(fp32_output(out), batch["query_labels"], True, torch.Generator().manual_seed(0))
        model.zero_grad(set_to_none=True)
        terms["total"].backward()
        assert all(t.dtype == torch.float32 for t in terms.values())
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in model.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        losses[precision] = float(terms["total"])
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.05 * abs(losses["fp32"]) + 1e-3, losses


# ------------------------------------------------------------------------------ compile

def _train_and_score(work: Path, monkeypatch, method: str, **train_kw):
    monkeypatch.chdir(work)
    s = _settings(method, **train_kw)
    result = train(s, work / f"ckpt_{train_kw.get('compile', 'eager')}", ctx=DistContext.from_env("cpu"),
                   progress=False)
    from prvr.checkpoint import load_model

    model, info = load_model(work / f"ckpt_{train_kw.get('compile', 'eager')}" / "best.pt", "cpu",
                             method=method)
    return result, _scores(model, work / "data" / "demo" / "corpus" / "demo", info["model_config"])


def test_compile_on_or_off_gives_the_same_training_and_eval_scores(tiny_workdir, monkeypatch):
    eager, (m_eager, s_eager) = _train_and_score(tiny_workdir, monkeypatch, "meanpool", compile=False)
    comp, (m_comp, s_comp) = _train_and_score(tiny_workdir, monkeypatch, "meanpool", compile="aot_eager")
    assert [r["loss_total"] for r in comp.history] == [r["loss_total"] for r in eager.history]
    assert comp.fingerprint["settings_hash"] != eager.fingerprint["settings_hash"]
    assert torch.equal(s_comp.scores, s_eager.scores) and m_comp == m_eager


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(corpus_dir, caplog):
    model, m, cfg = _model("gmmformer_v2")
    model.train()
    batch = next(iter(make_train_loader(_corpus(corpus_dir), 20, seed=0, **stream_kw(cfg))))

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch.manual_seed(3)
    want = model(batch).scores
    compiled = Compiled(model, backend=broken_backend)
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="prvr.accel"):
        got = compiled(batch).scores
        again = compiled(batch).scores           # eager from now on: no second warning
    assert compiled.eager and again.keys() == got.keys()
    warnings = [r for r in caplog.records if "training eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    for k in want:                                # the RNG was rewound: the same dropout draw
        assert torch.equal(want[k], got[k]), k


# ------------------------------------------------------------------------------ data path

def test_the_prefetcher_is_a_pass_through_on_cpu(corpus_dir):
    plain = _batches(make_train_loader(_corpus(corpus_dir), 20, seed=0))
    loader = make_train_loader(_corpus(corpus_dir), 20, seed=0)   # a new loader: the same order
    fetched = list(DevicePrefetcher(loader, "cpu"))
    assert len(DevicePrefetcher(loader, "cpu")) == len(loader)
    assert_same_batches(plain, fetched)
    batch = next(iter(loader))
    moved = next(iter(DevicePrefetcher([batch], torch.device("cpu"))))
    assert all(moved[k] is batch[k] for k in batch)   # the very same tensors


@pytest.mark.parametrize("hdf5", [False, True], ids=["memmap", "hdf5"])
def test_workers_give_the_training_loops_batches_bit_for_bit(corpus_dir, hdf5):
    """The loaders prvr.training builds (epoch sampler, persistent workers over two epochs,
    the batch-buffer pool) and the eval loaders: num_workers=2 == num_workers=0."""
    cfg = _settings("gmmformer_v2")["model"]
    got = {}
    for workers in (0, 2):
        corpus = _corpus(corpus_dir, hdf5)
        dataset = train_dataset(corpus, {"model": cfg})
        sampler = EpochShuffleSampler(len(dataset), seed=5)
        loader = train_loader(dataset, 7, workers, sampler)
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs.append(_batches(loader))
        vl, ql = make_eval_loaders(corpus, "val", 6, 9, workers, **stream_kw(cfg))
        got[workers] = (epochs, _batches(vl), _batches(ql))
    (e0, v0, q0), (e2, v2, q2) = got[0], got[2]
    for a, b in zip(e0, e2):
        assert_same_batches(a, b)
    assert [b["video_ids"] for b in e0[0]] != [b["video_ids"] for b in e0[1]]   # reshuffled
    assert_same_batches(v0, v2)
    assert_same_batches(q0, q2)


# ------------------------------------------------------------------------------ memory budget

@pytest.mark.parametrize("method", ["gmmformer_v2", "msssl"])
def test_a_tiny_memory_budget_gives_the_same_scores_in_smaller_blocks(corpus_dir, method):
    model, _, cfg = _model(method)
    vl, ql = make_eval_loaders(_corpus(corpus_dir), "test", 16, 20, 0, **stream_kw(cfg))
    bank = encode_videos(model, vl, "cpu", progress=False)
    query, _, _ = encode_queries(model, ql, "cpu", progress=False)
    big = block_plan(bank, len(query), query.shape[1], "cpu", 4096)
    tiny = block_plan(bank, len(query), query.shape[1], "cpu", 0.2)
    assert big == (len(bank), len(query))                 # everything in one block
    assert tiny[0] < len(bank) and tiny[1] < len(query)
    from prvr.evaluation import block_bytes

    per_video, per_pair = block_bytes(bank, int(bank.lengths.max()))
    assert tiny[0] * per_video + tiny[0] * tiny[1] * per_pair + 4 * query.numel() <= 0.2 * 2 ** 20
    fn = lambda q, v: model.score(q, v)["score"]          # noqa: E731
    with torch.no_grad():
        s_big = score_matrix(query, bank, fn, "cpu", progress=False, memory_budget_mb=4096)
        s_tiny = score_matrix(query, bank, fn, "cpu", progress=False, memory_budget_mb=0.2)
    torch.testing.assert_close(s_tiny, s_big, rtol=0, atol=1e-6)


def test_the_cuda_probe_turns_allocator_peaks_into_block_sizes(corpus_dir, monkeypatch):
    """measured_block_bytes' arithmetic and probe block, with torch.cuda's memory counters
    replaced by a scripted allocator (the real one is checked by the CUDA budget test)."""
    from prvr import evaluation

    model, _, cfg = _model("msssl")
    vl, ql = make_eval_loaders(_corpus(corpus_dir), "test", 16, 20, 0, **stream_kw(cfg))
    bank = encode_videos(model, vl, "cpu", progress=False)
    query, _, _ = encode_queries(model, ql, "cpu", progress=False)
    state = {"now": 5_000, "peak": 5_000}
    seen = []

    def score(q, videos):                       # scoring adds 6,400 bytes on top of the block
        seen.append((q.shape[0], videos.seq.shape[1]))
        state["peak"] = max(state["peak"], state["now"] + 6_400)
        return model.score(q, videos)["score"]

    real_block = evaluation.VideoBank.block

    def block(self, start, stop, device=None):  # building a block: 1,200 peak, 1,000 kept
        state["peak"] = max(state["peak"], state["now"] + 1_200)
        state["now"] += 1_000
        return real_block(self, start, stop, device)

    monkeypatch.setattr(evaluation.VideoBank, "block", block)
    for name, fn in {"synchronize": lambda d=None: None, "memory_allocated": lambda d=None: state["now"],
                     "max_memory_allocated": lambda d=None: state["peak"],
                     "reset_peak_memory_stats": lambda d=None: state.update(peak=state["now"])}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    per_video, per_pair = evaluation.measured_block_bytes(bank, query, score, torch.device("cpu"), 4, 8)
    assert seen == [(8, int(bank.lengths.max()))]            # the probe holds the longest video
    assert per_video == int(1.1 * 1_200 / 4) + 1 and per_pair == int(1.1 * 6_400 / 32) + 1
    v, q = block_plan(bank, 59, query.shape[1], "cpu", 0.05, sizes=(per_video, per_pair))
    assert v * per_video + v * q * per_pair + 4 * 59 * query.shape[1] <= 0.05 * 2 ** 20


def test_a_budget_smaller_than_one_block_still_scores_everything(corpus_dir, caplog):
    model, _, cfg = _model("meanpool")
    with caplog.at_level(logging.WARNING, logger="prvr.evaluation"):
        m_small, small = _scores(model, corpus_dir, cfg, memory_budget_mb=1e-4)
    m_big, big = _scores(model, corpus_dir, cfg)
    assert any("leaves no room for one block" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(small.scores, big.scores, rtol=0, atol=1e-6)
    assert m_small == m_big


# ------------------------------------------------------------------------------ CUDA

@cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_eval_matches_cpu_and_bf16_is_close(corpus_dir, method):
    model, _, cfg = _model(method)
    _, cpu = _scores(model, corpus_dir, cfg)
    model.to("cuda")
    _, gpu = _scores(model, corpus_dir, cfg, device="cuda")
    torch.testing.assert_close(gpu.scores, cpu.scores, rtol=0, atol=1e-4)
    _, gpu16 = _scores(model, corpus_dir, cfg, device="cuda", precision="bf16")
    if method != "msssl":
        assert (gpu16.scores - cpu.scores).abs().max() <= 1e-2


@cuda
def test_cuda_eval_stays_within_its_memory_budget(corpus_dir):
    """A budget below the bank: the bank goes to (pinned) host memory, the blocks are streamed,
    the scores equal those of a large budget, and the device memory scoring added stays
    within the budget."""
    model, _, cfg = _model("msssl")
    model.to("cuda")
    vl, ql = make_eval_loaders(_corpus(corpus_dir), "test", 16, 20, 0, pin_memory=True, **stream_kw(cfg))
    budget = 0.5
    large = encode_videos(model, vl, "cuda", progress=False)
    bank = encode_videos(model, vl, "cuda", progress=False, memory_budget_mb=budget * large.nbytes() / 2 ** 20)
    assert large.device.type == "cuda" and bank.device.type == "cpu" and bank.seq.is_pinned()
    query, _, _ = encode_queries(model, ql, "cuda", progress=False)
    fn = lambda q, v: model.score(q, v)["score"]          # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mb = 4 * query.numel() / 2 ** 20 + 0.25
    with torch.no_grad():
        streamed = score_matrix(query, bank, fn, "cuda", progress=False, memory_budget_mb=mb)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= mb * 2 ** 20, f"peak {peak / 2 ** 20:.2f} MB > budget {mb:.2f} MB"
    with torch.no_grad():
        whole = score_matrix(query, large, fn, "cuda", progress=False, memory_budget_mb=4096)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


@cuda
def test_cuda_prefetcher_gives_the_cpu_batches(corpus_dir):
    plain = _batches(make_train_loader(_corpus(corpus_dir), 20, seed=0))
    loader = make_train_loader(_corpus(corpus_dir), 20, seed=0, pin_memory=True)
    fetched = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()}
               for b in DevicePrefetcher(loader, "cuda")]
    assert_same_batches(plain, fetched)


def _one_bf16_epoch(work: Path, monkeypatch, method: str, device: str, **train_kw):
    """One epoch with bf16 (+ train_kw): finite losses and metrics, fp32 weights saved."""
    monkeypatch.chdir(work)
    s = _settings(method, device=device, precision="bf16", **train_kw)
    result = train(s, work / "ckpt", ctx=DistContext.from_env(device), progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 0
    row = result.history[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values() if isinstance(v, float)), row
    assert row["val_sumr"] > 0 and row["loss_total"] > 0
    state = torch.load(work / "ckpt" / "best.pt", weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())


def test_a_bf16_training_run_on_cpu(tiny_workdir, monkeypatch):
    _one_bf16_epoch(tiny_workdir, monkeypatch, "gmmformer_v2", "cpu")


@cuda
@pytest.mark.parametrize("method,compile_", [("gmmformer_v2", True), ("gmmformer_v1", False),
                                             ("msssl", False), ("meanpool", True)])
def test_cuda_training_epoch_bf16(tiny_workdir, monkeypatch, method, compile_):
    """One epoch on CUDA with bf16, TF32, pinned memory and the prefetcher (inductor for two
    of the methods: compiling all four would not fit the GPU check's five minutes)."""
    _one_bf16_epoch(tiny_workdir, monkeypatch, method, "cuda", compile=compile_, tf32=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_gpu_check_stops_clearly_without_cuda(tmp_path):
    import subprocess
    import sys

    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gpu_check: needs CUDA" in proc.stderr and "nothing was run" in proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()
