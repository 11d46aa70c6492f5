import h5py
import numpy as np
import pytest
import torch

from prvr.evaluation import (ScoreResult, VideoBank, encode_videos, evaluate, load_scores_h5,
                             save_scores_h5, score_matrix, score_queries)
from prvr.methods import VideoEncoding
from prvr.methods.gmmformer_v2.model import GMMFormer, GMMFormerConfig
from prvr.methods.meanpool import MeanPool, MeanPoolConfig
from prvr.metrics import METRIC_KEYS, retrieval_metrics

CFG = dict(visual_dim=10, text_dim=6, hidden_size=8, n_heads=2, max_query_len=5, max_frames=12,
           n_clips=4, input_drop=0.3, drop=0.3)


def make_split(n_videos=11, seed=0, lengths=None):
    """Synthetic eval split: per video a random frame count (some at max_frames), 1-3 captions."""
    g = torch.Generator().manual_seed(seed)
    cfg = GMMFormerConfig(**CFG)
    lengths = lengths or [int(torch.randint(1, cfg.max_frames + 1, (1,), generator=g)) for _ in range(n_videos)]
    videos = []
    for i, n in enumerate(lengths):
        videos.append(dict(id=f"vid_{i}", clips=torch.randn(cfg.n_clips, cfg.visual_dim, generator=g),
                           frames=torch.randn(n, cfg.visual_dim, generator=g)))
    queries = []
    for i in range(n_videos):
        for j in range(1 + i % 3):
            n_tok = int(torch.randint(1, cfg.max_query_len + 1, (1,), generator=g))
            queries.append(dict(id=f"vid_{i}#enc#{j}", feats=torch.randn(n_tok, cfg.text_dim, generator=g)))
    return cfg, videos, queries


def video_batches(videos, bs, pad_to=None):
    out = []
    for s in range(0, len(videos), bs):
        chunk = videos[s:s + bs]
        lf = pad_to or max(v["frames"].shape[0] for v in chunk)
        frames = torch.zeros(len(chunk), lf, chunk[0]["frames"].shape[1])
        mask = torch.zeros(len(chunk), lf, dtype=torch.bool)
        for k, v in enumerate(chunk):
            n = v["frames"].shape[0]
            frames[k, :n] = v["frames"]
            mask[k, :n] = True
        out.append({"clip_feats": torch.stack([v["clips"] for v in chunk]), "frame_feats": frames,
                    "frame_mask": mask, "video_ids": [v["id"] for v in chunk]})
    return out


def query_batches(queries, bs):
    out = []
    for s in range(0, len(queries), bs):
        chunk = queries[s:s + bs]
        lq = max(q["feats"].shape[0] for q in chunk)
        feats = torch.zeros(len(chunk), lq, chunk[0]["feats"].shape[1])
        mask = torch.zeros(len(chunk), lq, dtype=torch.bool)
        for k, q in enumerate(chunk):
            n = q["feats"].shape[0]
            feats[k, :n] = q["feats"]
            mask[k, :n] = True
        out.append({"query_feats": feats, "query_mask": mask, "query_ids": [q["id"] for q in chunk],
                    "query_video_ids": [q["id"].split("#", 1)[0] for q in chunk]})
    return out


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return GMMFormer(cfg)


def direct_scores(model, videos, queries):
    """Everything in one batch, frames padded to max_frames, no chunking."""
    model.eval()
    with torch.no_grad():
        vb = video_batches(videos, len(videos), pad_to=model.cfg.max_frames)[0]
        qb = query_batches(queries, len(queries))[0]
        clips, frames, mask = model.encode_video_feats(vb["clip_feats"], vb["frame_feats"], vb["frame_mask"])
        query = model.encode_query_feats(qb["query_feats"], qb["query_mask"])
        return model.score(query, VideoEncoding({"clips": clips}, frames, mask))["score"]


def test_chunked_bank_scores_equal_direct_computation():
    cfg, videos, queries = make_split(lengths=[3, 12, 1, 7, 12, 5, 2, 9, 4, 11, 6])
    model = make_model(cfg)
    expected = direct_scores(model, videos, queries)
    bank = encode_videos(model, video_batches(videos, 4), "cpu", progress=False)
    # packed storage: only real frames, no padding to the split's longest video
    assert bank.seq.shape == (sum(v["frames"].shape[0] for v in videos), cfg.hidden_size)
    assert bank.lengths.tolist() == [v["frames"].shape[0] for v in videos]
    assert set(bank.fixed) == {"clips"} and bank.fixed["clips"].shape == (len(videos), cfg.n_clips, cfg.hidden_size)
    result = score_queries(model, bank, query_batches(queries, 5), "cpu", query_chunk=3,
                           video_chunk=2, progress=False)
    assert result.scores.dtype == torch.float32
    assert result.scores.shape == (len(queries), len(videos))
    assert result.video_ids == [v["id"] for v in videos]
    assert result.query_ids == [q["id"] for q in queries]
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)


def test_chunk_sizes_do_not_change_scores():
    cfg, videos, queries = make_split(n_videos=9, seed=1)
    model = make_model(cfg, seed=1)
    bank = encode_videos(model, video_batches(videos, 3), "cpu", progress=False)
    big = score_queries(model, bank, query_batches(queries, 50), "cpu", query_chunk=10_000,
                        video_chunk=10_000, progress=False)
    small = score_queries(model, bank, query_batches(queries, 2), "cpu", query_chunk=1,
                          video_chunk=1, progress=False)
    torch.testing.assert_close(small.scores, big.scores, rtol=1e-5, atol=1e-6)


def test_bank_block_unpacks_padded_frames():
    frames = torch.arange(12, dtype=torch.float32).view(6, 2)
    clips = torch.arange(6, dtype=torch.float32).view(3, 1, 2)
    bank = VideoBank(["a", "b", "c"], {"clips": clips}, frames, torch.tensor([0, 1, 4, 6]))
    block = bank.block(1, 3)
    assert isinstance(block, VideoEncoding) and len(block) == 2
    mask, padded = block.seq_mask, block.seq
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert padded[0].tolist() == frames[1:4].tolist()
    assert padded[1].tolist() == [frames[4].tolist(), frames[5].tolist(), [0.0, 0.0]]
    assert torch.equal(block.fixed["clips"], clips[1:3])
    # a block is padded to ITS longest video only
    assert bank.block(0, 1).seq.shape == (1, 1, 2)


def test_evaluate_restores_training_mode_and_matches_metrics():
    cfg, videos, queries = make_split(n_videos=8, seed=2)
    model = make_model(cfg, seed=2)
    model.train()
    metrics, result = evaluate(model, video_batches(videos, 3), query_batches(queries, 4), "cpu",
                               progress=False)
    assert model.training  # restored; dropout was off while scoring (else direct would differ)
    torch.testing.assert_close(result.scores, direct_scores(model, videos, queries), rtol=1e-5, atol=1e-6)
    assert metrics == retrieval_metrics(result.scores, result.query_video_ids, result.video_ids)
    assert set(metrics) >= set(METRIC_KEYS)
    assert metrics["r100"] == 100.0  # fewer than 100 videos


def test_queries_of_unknown_videos_raise():
    cfg, videos, queries = make_split(n_videos=4, seed=3)
    model = make_model(cfg)
    with pytest.raises(ValueError, match="'vid_3' of query 'vid_3#enc#0'"):
        evaluate(model, video_batches(videos[:3], 2), query_batches(queries, 4), "cpu", progress=False)


def test_duplicate_or_empty_video_loader_is_an_error():
    cfg, videos, _ = make_split(n_videos=3, seed=4)
    model = make_model(cfg)
    with pytest.raises(ValueError, match="more than once"):
        encode_videos(model, video_batches(videos + videos[:1], 2), "cpu", progress=False)
    with pytest.raises(ValueError, match="no videos"):
        encode_videos(model, [], "cpu", progress=False)


def test_scores_h5_round_trip_is_atomic(tmp_path):
    scores = torch.randn(3, 2)
    result = ScoreResult(scores, ["a#0", "b#1", "ü#x"], ["a", "ü"], ["a", "b", "ü"])
    path = save_scores_h5(tmp_path / "out" / "scores.h5", result, {"sumr": 12.5})
    with h5py.File(path) as h5:
        assert h5["scores"].dtype == np.float32
        assert h5["scores"].shape == (3, 2)
        assert h5["video_ids"].asstr()[()].tolist() == ["a", "ü"]
    back, metrics = load_scores_h5(path)
    assert torch.equal(back.scores, scores)
    assert back.query_ids == result.query_ids and back.video_ids == result.video_ids
    assert back.query_video_ids == result.query_video_ids
    assert metrics == {"sumr": 12.5}
    # a failed write leaves the old file untouched and no temp file behind
    bad = ScoreResult(torch.zeros(2, 2), ["a#0"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="does not match"):
        save_scores_h5(path, bad)
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.h5"]
    assert torch.equal(load_scores_h5(path)[0].scores, scores)


def test_load_scores_h5_rejects_other_files(tmp_path):
    garbage = tmp_path / "x.h5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="x.h5"):
        load_scores_h5(garbage)
    other = tmp_path / "y.h5"
    with h5py.File(other, "w") as h5:
        h5["scores"] = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="y.h5: missing dataset 'query_ids'"):
        load_scores_h5(other)


def test_score_matrix_with_custom_score_fn_covers_all_blocks():
    bank = VideoBank([f"v{i}" for i in range(5)], {"clips": torch.arange(5.0).view(5, 1, 1)},
                     torch.ones(5, 1), torch.arange(6))
    query = torch.arange(7.0).view(7, 1)

    def fn(q, videos):
        return q[:, :1] * 100 + videos.fixed["clips"][:, 0, 0][None, :]

    s = score_matrix(query, bank, fn, "cpu", query_chunk=3, video_chunk=2, progress=False)
    assert torch.equal(s, query * 100 + torch.arange(5.0)[None, :])


def test_a_method_without_sequences_evaluates_through_the_same_bank():
    """The bank is the method's: MeanPool keeps one fixed vector per video and no sequence."""
    cfg, videos, queries = make_split(n_videos=7, seed=6)
    torch.manual_seed(6)
    model = MeanPool(MeanPoolConfig(visual_dim=cfg.visual_dim, text_dim=cfg.text_dim, hidden_size=8,
                                    max_query_len=cfg.max_query_len, max_frames=cfg.max_frames, n_clips=cfg.n_clips))
    bank = encode_videos(model, video_batches(videos, 3), "cpu", progress=False)
    assert bank.seq is None and bank.offsets is None and set(bank.fixed) == {"video"}
    block = bank.block(2, 5)
    assert block.seq is None and block.seq_mask is None and len(block) == 3
    result = score_queries(model, bank, query_batches(queries, 4), "cpu", query_chunk=2, video_chunk=3,
                           progress=False)
    with torch.no_grad():
        vb = video_batches(videos, len(videos))[0]
        qb = query_batches(queries, len(queries))[0]
        expected = model.score(model.encode_queries(qb), model.encode_videos(vb))["score"]
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_matches_cpu():
    cfg, videos, queries = make_split(n_videos=10, seed=5)
    model = make_model(cfg, seed=5)
    _, cpu = evaluate(model, video_batches(videos, 3), query_batches(queries, 4), "cpu", progress=False)
    model.to("cuda")
    _, gpu = evaluate(model, video_batches(videos, 3), query_batches(queries, 4), "cuda", progress=False)
    assert gpu.scores.device.type == "cpu"
    torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-4, atol=1e-5)
