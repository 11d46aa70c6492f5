"""The `prvr` command and the index's bad input: every case is one line on stderr naming the file
or the value, a non-zero exit and nothing on stdout; k is checked and clamped with a note; the
command table takes more subcommands (docs/search.md)."""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_workdir
from prvr import main as cli
from prvr.checkpoint import save_checkpoint
from prvr.config import load_params, load_settings
from prvr.methods import build_config, create_model
from prvr.search import SearchError, build_index, open_index


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_demo_corpus) -> Path:
    w = make_workdir(tmp_path_factory.mktemp("search_cli") / "work", tiny_demo_corpus)
    s = load_settings(w / "params.yaml", "demo", "gmmformer_v2")
    torch.manual_seed(0)
    save_checkpoint(w / "v2.pt", create_model("gmmformer_v2", build_config(s)), "gmmformer_v2", settings=s)
    params = load_params(w / "params.yaml")
    params["search"]["stage1"]["candidates"] = 3
    build_index(w / "v2.pt", params, "demo", "test", w / "index", data_dir=w / "data", progress=False)
    return w


@pytest.fixture()
def at(work, monkeypatch) -> Path:
    monkeypatch.chdir(work)
    return work


def _prvr(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    rc = cli.main(list(argv))
    got = capsys.readouterr()
    return rc, got.out.splitlines(), got.err.splitlines()


def _qids(work: Path, n: int) -> list[str]:
    return open_index(work / "index").corpus.split("test").query_ids[:n]


def _refused(capsys, *argv: str, names: str) -> str:
    rc, out, err = _prvr(capsys, *argv)
    assert rc == 1 and out == [] and len(err) == 1, (rc, out, err)
    assert names in err[0], err[0]
    return err[0]


# ----------------------------------------------------------------------------- k

def test_k_larger_than_the_collection_is_clamped_with_a_note(at, capsys):
    n = json.loads((at / "index" / "manifest.json").read_text())["n_videos"]
    q = _qids(at, 2)
    rc, out, err = _prvr(capsys, "search", "--index", "index", "--query-id", q[0], "--query-id", q[1],
                         "--k", str(n + 5), "--json")
    assert rc == 0 and len(out) == 2 and len(err) == 1 and "note" in err[0] and f"{n} hits" in err[0]
    for line in out:
        hits = json.loads(line)["hits"]
        assert len(hits) == n and len({h["video_id"] for h in hits}) == n
        assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


@pytest.mark.parametrize("k", ["0", "-3"])
def test_k_below_one_is_refused(at, capsys, k):
    _refused(capsys, "search", "--index", "index", "--query-id", _qids(at, 1)[0], "--k", k, names=f"--k {k}")


def test_k_above_the_shortlist_still_gives_k_exact_hits(work):
    # the index keeps 3 candidates a query; k = 6 must widen the shortlist, not cut the answer
    idx = open_index(work / "index", data_dir=work / "data")
    batch = idx.query_features(_qids(work, 4))
    q = idx.encode(batch)
    got = idx.search_encoded(q, 6)
    assert all(len(h) == 6 for h in got)
    scores, _ = idx.exhaustive(q, 6)
    for hits, row in zip(got, scores):
        assert hits[0]["score"] <= float(row[0]) + 1e-5      # never above the exact best
    with pytest.raises(SearchError, match="k 0"):
        idx.search_encoded(q, 0)
    assert idx.exhaustive(q, 10 ** 6)[0].shape == (4, idx.manifest["n_videos"])


# ----------------------------------------------------------------------------- query ids

def test_an_unknown_query_id_anywhere_writes_nothing(at, capsys):
    (at / "ids_bad.txt").write_text("\n".join(_qids(at, 2) + ["nope#enc#9"]) + "\n")
    _refused(capsys, "search", "--index", "index", "--query-ids-file", "ids_bad.txt", "--k", "2", "--json",
             names="nope#enc#9")


def test_a_missing_or_empty_ids_file_is_named(at, capsys):
    _refused(capsys, "search", "--index", "index", "--query-ids-file", "absent.txt", "--k", "2", names="absent.txt")
    (at / "empty.txt").write_text("\n\n")
    _refused(capsys, "search", "--index", "index", "--query-ids-file", "empty.txt", "--k", "2", names="empty.txt")
    _refused(capsys, "search", "--index", "index", "--k", "2", names="--query-id")


# ----------------------------------------------------------------------------- the index on disk

def _copy(work: Path, name: str) -> Path:
    dst = work / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work / "index", dst)
    return dst


def test_no_index_is_named(at, capsys):
    _refused(capsys, "search", "--index", "nowhere", "--query-id", "x", "--k", "1", names="nowhere/manifest.json")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.parametrize("name, damage", [
    ("exact_clips.npy", _truncate),
    ("n_frames.npy", _truncate),
    ("stage1_video.npy", _truncate),
    ("stage1.faiss", _truncate),
    ("stage1.faiss", lambda p: p.write_bytes(b"not a faiss index")),
    ("exact_offsets.npy", lambda p: p.unlink()),
    ("n_frames.npy", lambda p: np.save(p, np.zeros(3, dtype=np.int64))),       # wrong count
    ("video_ids.txt", lambda p: p.write_text("only_one\n")),
    ("manifest.json", lambda p: p.write_text("{not json")),
    ("manifest.json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                         if k != "n_vectors"}))),
])
def test_damaged_index_files_are_named(at, capsys, name, damage):
    folder = _copy(at, "damaged")
    damage(folder / name)
    _refused(capsys, "search", "--index", "damaged", "--query-id", _qids(at, 1)[0], "--k", "2",
             names=str(Path("damaged") / name))


def test_another_checkpoint_shows_both_hashes(at, capsys):
    folder = _copy(at, "other_ckpt")
    m = json.loads((folder / "manifest.json").read_text())
    m["checkpoint_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(m))
    line = _refused(capsys, "search", "--index", "other_ckpt", "--query-id", "x", "--k", "1", names="v2.pt")
    from prvr.search.index import sha256_file

    assert "0" * 64 in line and sha256_file(at / "v2.pt") in line


def test_a_method_without_the_search_part_is_refused(work, monkeypatch):
    from prvr.methods.meanpool.model import MeanPool

    s = load_settings(work / "params.yaml", "demo", "meanpool")
    save_checkpoint(work / "mp.pt", create_model("meanpool", build_config(s)), "meanpool", settings=s)
    monkeypatch.delattr(MeanPool, "localize")
    with pytest.raises(SearchError, match="localize") as e:
        build_index(work / "mp.pt", load_params(work / "params.yaml"), "demo", "test", work / "mp_index",
                    data_dir=work / "data", progress=False)
    assert "mp.pt" in str(e.value) and not (work / "mp_index").exists()


# ----------------------------------------------------------------------------- the command table

def test_the_console_script_and_a_registered_subcommand(monkeypatch, capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["prvr"] == "prvr.main:main"
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "echo", ("say a word", lambda p: p.add_argument("--word"),
                                               lambda a: seen.append(a.word) or 3))
    assert cli.main(["echo", "--word", "hi"]) == 3 and seen == ["hi"]
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    capsys.readouterr()


def test_an_empty_split_is_named_and_writes_nothing(tmp_path, tiny_demo_corpus, work):
    from prvr.data.layout import DataError

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_demo_corpus, corpus)
    captions = corpus / "demo" / "TextData" / "demotest.caption.txt"
    captions.write_text("")
    w = make_workdir(tmp_path / "work", corpus)
    with pytest.raises((DataError, SearchError)) as e:
        build_index(work / "v2.pt", load_params(w / "params.yaml"), "demo", "test", w / "idx",
                    data_dir=w / "data", progress=False)
    assert "demotest.caption.txt" in str(e.value) and "\n" not in str(e.value)
    assert not (w / "idx").exists() and not list(w.glob(".idx.*"))
