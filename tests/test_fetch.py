"""The fetch stage: folder reference, demo generation, verified resumable download, safe extraction."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from msssl_factory import write_collection, write_params
from prvr.config import load_settings
from prvr.data.fetch import check_archive, download, extract_collection, fetch
from prvr.data.layout import MSSL_DATA_PAGE, DataError, locate

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "fetch.py"


def run_stage(tmp_path: Path, params: Path):
    return subprocess.run([sys.executable, str(STAGE), "--params", str(params), "--data-dir",
                           str(tmp_path / "data"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


# ---------------------------------------------------------------------------------------------
# a local HTTP server: serves one blob, can drop the first connection, honours Range or not


class Blob:
    def __init__(self, data: bytes, drop_after: int | None = None, ranges: bool = True):
        self.data = data
        self.drop_after = drop_after
        self.ranges = ranges
        self.requests: list[str | None] = []  # the Range header of each request


@pytest.fixture
def server():
    state: dict[str, Blob] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output quiet
            pass

        def do_GET(self):
            blob = state.get(self.path)
            if blob is None:
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            blob.requests.append(rng)
            start = 0
            if rng and blob.ranges:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(blob.data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(blob.data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(blob.data) - 1}/{len(blob.data)}")
            else:
                self.send_response(200)
            body = blob.data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if blob.drop_after is not None:
                cut, blob.drop_after = blob.drop_after, None  # drop only the first time
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def serve(name: str, blob: Blob) -> str:
        state["/" + name] = blob
        return f"http://127.0.0.1:{httpd.server_address[1]}/{name}"

    yield serve
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _payload(n: int = 300_000) -> tuple[bytes, str]:
    data = bytes((i * 7919) % 251 for i in range(n))
    return data, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# download


def test_download_resumes_after_a_dropped_connection(tmp_path, server):
    data, sha = _payload()
    blob = Blob(data, drop_after=100_000)
    url = server("features.zip", blob)
    out = download(url, tmp_path / "features.zip", sha, progress=False, retry_wait=0)
    assert out.read_bytes() == data
    assert blob.requests == [None, "bytes=100000-"]
    assert not (tmp_path / "features.zip.part").exists()


def test_download_resumes_a_part_left_by_an_earlier_run(tmp_path, server):
    data, sha = _payload()
    blob = Blob(data)
    url = server("a.tar.gz", blob)
    (tmp_path / "a.tar.gz.part").write_bytes(data[:123_456])
    download(url, tmp_path / "a.tar.gz", sha, progress=False, retry_wait=0)
    assert (tmp_path / "a.tar.gz").read_bytes() == data
    assert blob.requests == ["bytes=123456-"]


def test_download_restarts_when_the_server_ignores_range(tmp_path, server):
    data, sha = _payload()
    blob = Blob(data, ranges=False)
    url = server("b.zip", blob)
    (tmp_path / "b.zip.part").write_bytes(b"stale bytes from another file")
    download(url, tmp_path / "b.zip", sha, progress=False, retry_wait=0)
    assert (tmp_path / "b.zip").read_bytes() == data


def test_download_refuses_a_wrong_checksum_and_keeps_nothing(tmp_path, server):
    data, _ = _payload()
    url = server("c.zip", Blob(data, drop_after=5000))
    with pytest.raises(DataError, match="sha256 mismatch"):
        download(url, tmp_path / "c.zip", "0" * 64, progress=False, retry_wait=0)
    assert list(tmp_path.iterdir()) == []


def test_download_gives_up_with_one_line_after_retries(tmp_path, server):
    url = server("missing.zip", Blob(b"x"))[:-len("missing.zip")] + "nothing-here.zip"
    with pytest.raises(DataError, match="HTTP 404"):
        download(url, tmp_path / "d.zip", "0" * 64, progress=False, retry_wait=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# archives


def _zip_of(folder: Path, top: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(top).as_posix())
    return buf.getvalue()


def _tar_gz_of(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return buf.getvalue()


def test_fetch_downloads_verifies_and_extracts_a_zip(tmp_path, server):
    paths = write_collection(tmp_path / "src")
    data = _zip_of(paths.collection_dir, tmp_path / "src")
    url = server("toy.zip", Blob(data, drop_after=len(data) // 3))
    root = tmp_path / "root"
    params = write_params(tmp_path / "params.yaml", root, archive=url,
                          sha256=hashlib.sha256(data).hexdigest().upper())
    settings = load_settings(params)
    record = fetch(settings, tmp_path / "data", progress=False)
    assert record["origin"] == "archive" and record["collection_dir"] == str(root / "toy")
    assert (root / "toy" / "FeatureData" / "toyfeat" / "feature.bin").read_bytes() == \
        paths.feature_file.read_bytes()
    # nothing else is left in data_root: no temp folder, no download, no .part
    assert sorted(p.name for p in root.iterdir()) == [".prvr-downloads", "toy"]
    assert list((root / ".prvr-downloads").iterdir()) == []
    assert json.loads((tmp_path / "data" / "toy" / "source.json").read_text()) == record
    assert locate(settings, tmp_path / "data").collection_dir == root / "toy"


def test_fetch_extracts_a_local_tar_gz_with_the_collection_at_top_level(tmp_path):
    paths = write_collection(tmp_path / "src")
    archive = tmp_path / "toy.tar.gz"
    archive.write_bytes(_tar_gz_of(paths.collection_dir, "."))
    root = tmp_path / "root"
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    settings = load_settings(write_params(tmp_path / "params.yaml", root, archive=str(archive), sha256=sha))
    record = fetch(settings, tmp_path / "data", progress=False)
    assert record["origin"] == "archive"
    assert (root / "toy" / "TextData" / "toytrain.caption.txt").read_text() == \
        paths.caption_file("train").read_text()
    assert archive.exists()  # a user's local archive is never deleted
    assert [p.name for p in root.iterdir()] == ["toy"]


def test_fetch_refuses_a_local_archive_with_a_wrong_checksum(tmp_path):
    paths = write_collection(tmp_path / "src")
    archive = tmp_path / "toy.zip"
    archive.write_bytes(_zip_of(paths.collection_dir, tmp_path / "src"))
    root = tmp_path / "root"
    params = write_params(tmp_path / "params.yaml", root, archive=str(archive), sha256="ab" * 32)
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "sha256 mismatch" in proc.stderr and str(archive) in proc.stderr
    assert not root.exists() or list(root.iterdir()) == []
    assert not (tmp_path / "data" / "toy" / "source.json").exists()


def test_url_archive_needs_a_checksum(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", archive="https://example.org/toy.zip")
    with pytest.raises(DataError, match="set toy.sha256"):
        fetch(load_settings(params), tmp_path / "data", progress=False)


def _zip_with(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return buf.getvalue()


def _tar_with(entries: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info in entries:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def _tarinfo(name, kind=tarfile.REGTYPE, linkname="", size=1):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("kind, build, why", [
    ("zip", lambda: _zip_with({"toy/ok.txt": b"1", "toy/../../evil.txt": b"x"}), "escapes"),
    ("zip", lambda: _zip_with({"/abs/evil.txt": b"x"}), "absolute"),
    ("zip", lambda: _zip_with({"toy/ok.txt": b"1"}, {"toy/link": "../../../etc/passwd"}), "outside"),
    ("tar", lambda: _tar_with([_tarinfo("toy/../../evil.txt")]), "escapes"),
    ("tar", lambda: _tar_with([_tarinfo("/tmp/evil.txt")]), "absolute"),
    ("tar", lambda: _tar_with([_tarinfo("toy/link", tarfile.SYMTYPE, "../../outside")]), "outside"),
    ("tar", lambda: _tar_with([_tarinfo("toy/link", tarfile.SYMTYPE, "/etc/passwd")]), "outside"),
    ("tar", lambda: _tar_with([_tarinfo("toy/hard", tarfile.LNKTYPE, "../outside")]), "outside"),
    ("tar", lambda: _tar_with([_tarinfo("toy/dev", tarfile.CHRTYPE)]), "device"),
])
def test_unsafe_archive_members_are_rejected_before_extraction(tmp_path, kind, build, why):
    archive = tmp_path / f"evil.{kind}"
    archive.write_bytes(build())
    root = tmp_path / "deep" / "root"
    with pytest.raises(DataError, match=why) as err:
        extract_collection(archive, root, "toy", "toyfeat", progress=False)
    assert str(archive) in str(err.value)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not root.exists() or list(root.iterdir()) == []


def test_safe_internal_links_pass_the_check(tmp_path):
    archive = tmp_path / "ok.tar"
    archive.write_bytes(_tar_with([_tarinfo("toy/a/file"),
                                   _tarinfo("toy/a/link", tarfile.SYMTYPE, "file"),
                                   _tarinfo("toy/b/up", tarfile.SYMTYPE, "../a/file")]))
    assert check_archive(archive) == "tar"


def test_incomplete_archive_leaves_nothing_behind(tmp_path):
    archive = tmp_path / "partial.zip"
    archive.write_bytes(_zip_with({"toy/TextData/toytrain.caption.txt": b"v#0 text\n"}))
    root = tmp_path / "root"
    with pytest.raises(DataError, match="lacks"):
        extract_collection(archive, root, "toy", "toyfeat", progress=False)
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# folder and demo origins, missing dataset


def test_fetch_references_an_existing_folder_without_copying(tmp_path):
    paths = write_collection(tmp_path / "root")
    params = write_params(tmp_path / "params.yaml", tmp_path / "root")
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "source.json" in proc.stderr
    record = json.loads((tmp_path / "data" / "toy" / "source.json").read_text())
    assert record["origin"] == "folder" and record["feature"] == "toyfeat"
    assert record["collection_dir"] == str(paths.collection_dir.absolute())
    assert [p.name for p in (tmp_path / "data" / "toy").iterdir()] == ["source.json"]
    assert record["files"]["FeatureData/toyfeat/feature.bin"]["size"] == paths.feature_file.stat().st_size
    # re-running on unchanged features writes the same record; changed features change it
    assert run_stage(tmp_path, params).returncode == 0
    assert json.loads((tmp_path / "data" / "toy" / "source.json").read_text()) == record
    with open(paths.feature_file, "ab") as fh:
        fh.write(bytes(4 * 8))
    assert run_stage(tmp_path, params).returncode == 0
    assert json.loads((tmp_path / "data" / "toy" / "source.json").read_text()) != record


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "VisualSearch")
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1
    assert str(tmp_path / "VisualSearch" / "toy") in lines[0] and MSSL_DATA_PAGE in lines[0]
    assert "unzip it under" in lines[0]
    assert not (tmp_path / "data").exists()


def test_incomplete_folder_names_the_missing_files(tmp_path):
    paths = write_collection(tmp_path / "root")
    paths.id_file.unlink()
    params = write_params(tmp_path / "params.yaml", tmp_path / "root")
    with pytest.raises(DataError, match="incomplete.*missing FeatureData/toyfeat/id.txt"):
        fetch(load_settings(params), tmp_path / "data", progress=False)


def test_demo_is_generated_then_validates(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", dataset="demo", collection="demo",
                          feature="demo_feats", visual_dim=256, text_dim=128,
                          generator={"preset": "demo", "seed": 3, "scale": 0.02})
    proc = run_stage(tmp_path, params)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "data" / "demo" / "source.json").read_text())
    assert record["origin"] == "generated"
    assert record["collection_dir"] == str((tmp_path / "data" / "demo" / "corpus" / "demo").absolute())
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "validate.py"), "--params", str(params),
                           "--data-dir", str(tmp_path / "data"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "data" / "demo" / "validation.json").read_text())
    assert report["ok"] and report["splits"]["train"]["captions"] > 0


def test_demo_with_an_unknown_preset_is_a_one_line_error(tmp_path):
    params = write_params(tmp_path / "params.yaml", tmp_path / "root", dataset="demo", collection="demo",
                          feature="demo_feats", generator={"preset": "nope", "seed": 3})
    with pytest.raises(DataError, match="demo.generator: unknown preset 'nope'"):
        fetch(load_settings(params), tmp_path / "data", progress=False)


@pytest.mark.parametrize("name", ["toy.tar.gz", "toy.zip"])
def test_damaged_archive_is_a_one_line_error_and_leaves_nothing(tmp_path, name):
    paths = write_collection(tmp_path / "src")
    full = (_tar_gz_of(paths.collection_dir, "toy") if name.endswith(".tar.gz")
            else _zip_of(paths.collection_dir, tmp_path / "src"))
    archive = tmp_path / name
    if name.endswith(".zip"):  # corrupt the compressed data of the first member, keep the directory
        data = bytearray(full)
        data[40:400] = bytes(360)
        archive.write_bytes(bytes(data))
    else:
        archive.write_bytes(full[: len(full) // 2])
    root = tmp_path / "root"
    with pytest.raises(DataError) as err:
        extract_collection(archive, root, "toy", "toyfeat", progress=False)
    assert str(err.value).startswith(f"{archive}: ") and "\n" not in str(err.value)
    assert "damaged" in str(err.value) or "extraction failed" in str(err.value)
    assert not root.exists() or list(root.iterdir()) == []


def test_download_of_a_complete_part_file_verifies_it(tmp_path, server):
    data, sha = _payload()
    blob = Blob(data)
    url = server("done.zip", blob)
    (tmp_path / "done.zip.part").write_bytes(data)
    download(url, tmp_path / "done.zip", sha, progress=False, retry_wait=0)
    assert (tmp_path / "done.zip").read_bytes() == data and blob.requests == [f"bytes={len(data)}-"]
