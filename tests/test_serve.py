"""`prvr serve` (docs/serve.md): the JSON API answers what `prvr search --json` writes, bad
requests get a 4xx JSON message, video files are served with Range requests and only from
the table built at start-up; the page is tested in a real browser in test_serve_browser.py."""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from prvr import main as cli
from prvr.search import SearchError, open_index
from prvr.serve import Service, VideoFiles, create_app

fastapi = pytest.importorskip("fastapi")   # the [serve] extra; `.[test]` installs it
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def videos(tmp_path_factory, text_search_work):
    """A folder of fake video files for the first three indexed videos, and a secret outside it."""
    root = tmp_path_factory.mktemp("videos")
    (root / "clips").mkdir()
    ids = (text_search_work / "index" / "video_ids.txt").read_text().split()[:3]
    for i, v in enumerate(ids):
        (root / "clips" / f"{v}.mp4").write_bytes(bytes(range(256)) * (4 + i))
    (root / "clips" / "notes.txt").write_text("not a video")
    (root / "secret.mp4").write_bytes(b"outside the video folder")
    return root, ids


@pytest.fixture(scope="module")
def client(text_search_work, videos):
    idx = open_index(text_search_work / "index")
    service = Service(idx, idx.load_encoder(text_search_work / "encoder"), VideoFiles(videos[0] / "clips"))
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def bare(text_search_work):
    """A server with no encoder and no videos."""
    return TestClient(create_app(Service(open_index(text_search_work / "index"))))


def _cli_json(capsys, monkeypatch, work, *argv):
    monkeypatch.chdir(work)
    assert cli.main(["search", "--index", "index", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])


def test_get_by_query_id_is_the_cli_json(client, text_search_work, capsys, monkeypatch):
    qid = open_index(text_search_work / "index").corpus.split("test").query_ids[3]
    assert "#" in qid
    r = client.get(f"/api/search?query_id={quote(qid, safe='')}&k=4")
    assert r.status_code == 200
    assert r.json() == _cli_json(capsys, monkeypatch, text_search_work, "--query-id", qid, "--k", "4")


def test_get_and_post_by_text_are_the_cli_json(client, text_search_work, capsys, monkeypatch):
    text = "a person opens a door"
    r = client.get("/api/search", params={"text": text, "k": 5})
    assert r.status_code == 200
    want = _cli_json(capsys, monkeypatch, text_search_work, "--text", text, "--encoder", "encoder", "--k", "5")
    assert r.json() == want and want["query_id"] is None and want["text"] == text
    assert client.post("/api/search", json={"text": text, "k": 5}).json() == want


def test_index_and_health(client):
    info = client.get("/api/index").json()
    assert info["method"] == "gmmformer_v2" and info["dataset"] == "demo" and info["text_queries"] is True
    assert info["videos"] == 3
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"


@pytest.mark.parametrize("query, status, names", [
    ("text=", 400, "text: empty"),
    ("text=" + "a" * 501, 400, "at most 500"),
    ("text=door&k=0", 400, "k 0"),
    ("text=door&k=101", 400, "from 1 to 100"),
    ("text=door&k=ten", 400, "k 'ten'"),
    ("query_id=nobody%23enc%230", 404, "nobody#enc#0"),
    ("", 400, "exactly one of query_id and text"),
    ("text=door&query_id=x", 400, "exactly one"),
])
def test_bad_get_requests_are_4xx_json_with_a_message(client, query, status, names):
    r = client.get("/api/search?" + query)
    assert r.status_code == status and names in r.json()["error"], r.text


@pytest.mark.parametrize("body, names", [
    ("{not json", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "door", "colour": "red"}', "unknown fields colour"),
    ('{"text": 5}', "text: expected a string"),
    ('{"text": "door", "k": true}', "k True"),
])
def test_malformed_post_bodies_are_400(client, body, names):
    r = client.post("/api/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and names in r.json()["error"], r.text


def test_a_text_query_with_no_encoder_loaded_is_400_and_ids_still_work(bare, text_search_work):
    r = bare.get("/api/search", params={"text": "a door"})
    assert r.status_code == 400 and "--encoder" in r.json()["error"]
    qid = open_index(text_search_work / "index").corpus.split("test").query_ids[0]
    assert bare.get("/api/search", params={"query_id": qid}).status_code == 200
    assert bare.get("/api/index").json()["text_queries"] is False


def test_k_above_the_collection_gives_every_video(client, text_search_work):
    n = len((text_search_work / "index" / "video_ids.txt").read_text().split())
    hits = client.get("/api/search", params={"text": "door", "k": 100}).json()["hits"]
    assert len(hits) == min(n, 100) and len({h["video_id"] for h in hits}) == len(hits)


def test_the_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="q"' in r.text and "api/search" in r.text


# ----------------------------------------------------------------------------- videos

def test_a_video_is_served_with_range_requests(client, videos):
    root, ids = videos
    whole = (root / "clips" / f"{ids[1]}.mp4").read_bytes()
    r = client.get(f"/videos/{ids[1]}")
    assert r.status_code == 200 and r.content == whole and r.headers["content-type"] == "video/mp4"
    assert r.headers.get("accept-ranges") == "bytes"
    part = client.get(f"/videos/{ids[1]}", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == whole[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(whole)}"
    assert client.get("/api/videos", params=[("id", ids[0]), ("id", "nope")]).json() == {ids[0]: True, "nope": False}


@pytest.mark.parametrize("vid", ["../secret", "..%2Fsecret", "%2E%2E%2Fsecret.mp4", "%2Fetc%2Fpasswd",
                                 "notes", "%2E%2E", "secret"])
def test_a_video_id_never_reaches_a_path_outside_the_folder(client, vid):
    r = client.get(f"/videos/{vid}")
    assert r.status_code == 404 and b"outside the video folder" not in r.content


def test_a_mapping_file_maps_ids_and_refuses_paths_outside_its_folder(tmp_path):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.webm").write_bytes(b"x")
    (tmp_path / "outside.mp4").write_bytes(b"y")
    good = tmp_path / "media" / "map.tsv"
    good.write_text("# id\tpath\nvid_1#x\ta.webm\n")
    assert VideoFiles(good).get("vid_1#x") == (tmp_path / "media" / "a.webm").resolve()
    bad = tmp_path / "media" / "bad.tsv"
    for line, names in [("v\t../outside.mp4", "outside"), (f"v\t{tmp_path / 'outside.mp4'}", "outside"),
                        ("v\tmissing.mp4", "no such file"), ("just-one-field", "expected 'video_id<TAB>path'")]:
        bad.write_text(line + "\n")
        with pytest.raises(SearchError, match=names) as err:
            VideoFiles(bad)
        assert "bad.tsv:1" in str(err.value) and "\n" not in str(err.value)


def test_a_folder_ignores_links_leaving_it(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "elsewhere.mp4").write_bytes(b"z")
    (tmp_path / "v" / "sneaky.mp4").symlink_to(tmp_path / "elsewhere.mp4")
    (tmp_path / "v" / "ok.mkv").write_bytes(b"k")
    files = VideoFiles(tmp_path / "v")
    assert files.get("sneaky") is None and files.get("ok") is not None


def test_serve_refuses_bad_start_up_input_in_one_line(text_search_work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(text_search_work)
    for argv, names in [(["--videos", str(tmp_path / "none")], "no such folder or mapping file"),
                        (["--encoder", str(tmp_path / "none")], "no such folder"),
                        (["--max-concurrency", "0"], "--max-concurrency 0")]:
        rc = cli.main(["serve", "--index", "index", *argv])
        err = capsys.readouterr().err.splitlines()
        assert rc == 1 and len(err) == 1 and names in err[0], err
