"""Get a dataset's MS-SL collection in place and record where it is (data/<dataset>/source.json).

Three origins:
  generated  the demo corpus, written by `prvr.data.demo.generate_corpus` under data/<dataset>/corpus/
  folder     an MS-SL folder already under data_root (`<data_root>/<collection>/`); only a
             reference is written, features are never copied
  archive    a zip or tar(.gz) given as a local path or an http(s) URL with its sha256
             (`<dataset>.archive`, `<dataset>.sha256`): downloaded with resume, verified,
             checked for unsafe members and extracted atomically into data_root

source.json: {"dataset", "collection", "feature", "origin", "collection_dir" (absolute), and
  generated: "generator" {preset, seed[, scale]}; folder/archive: "data_root", "files"
  {path in collection: {size, mtime_ns}}; archive: "archive", "sha256"}.
  Readers go through `prvr.data.layout.locate`.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from tqdm import tqdm

from ..atomic import write_json_atomic
from .layout import (MSSL_DATA_PAGE, CollectionPaths, DataError, DEMO_CORPUS_SUBDIR, format_of,
                     source_file)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# What a damaged or truncated archive raises while it is read.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
                   OSError, UnicodeDecodeError)
_DOWNLOAD_DIR = ".prvr-downloads"


# ---------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: str | os.PathLike, progress: bool = True) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                      disable=not progress or size < 64 * _CHUNK) as bar:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _single_component(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DataError(f"params.yaml: {what} '{name}' must be a plain folder name")
    return name


def _is_url(spec: str) -> bool:
    return urllib.parse.urlparse(spec).scheme in ("http", "https")


def _normalise_sha256(sha256: str | None, where: str) -> str | None:
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DataError(f"params.yaml: {where} is not a sha256 hex digest (64 hex characters)")
    return value


# ---------------------------------------------------------------------------------------------
# download with resume


_TRANSIENT = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
              http.client.IncompleteRead, http.client.RemoteDisconnected)


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _download_attempt(url: str, part: Path, have: int, name: str, progress: bool,
                      timeout: float) -> None:
    """One request for `url`, appending to (or restarting) `part` which holds `have` bytes.

    Returns when `part` is complete; a transient failure raises one of _TRANSIENT.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "prvr-fetch"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is complete
            return
        if exc.code in (408, 429) or exc.code >= 500:
            raise ConnectionError(f"HTTP {exc.code}") from None
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206 and _content_range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
        else:  # the server sent the whole file
            have, mode = 0, "wb"
        total = int(length) + have if length and length.isdigit() else None
        got = _write_body(response, part, mode, have, total, name, progress)
        if total is not None and got < total:
            raise http.client.IncompleteRead(b"", total - got)


def _write_body(response: Any, part: Path, mode: str, have: int, total: int | None, name: str,
                progress: bool) -> int:
    """Stream the response body into `part` (opened with `mode`); returns the bytes it then holds."""
    with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                      desc=f"download {name}", disable=not progress) as bar:
        got = have
        while True:
            block = response.read(_CHUNK)
            if not block:
                break
            fh.write(block)
            got += len(block)
            bar.update(len(block))
    return got


def download(url: str, dest: str | os.PathLike, sha256: str, progress: bool = True,
             retries: int = 3, timeout: float = 60.0, retry_wait: float = 1.0) -> Path:
    """Download `url` to `dest`, resuming a `<dest>.part` left by an earlier attempt.

    Uses HTTP Range to resume (after a dropped connection, within this call up to `retries`
    times, or in a later call); a server that ignores Range restarts from zero. The file is
    verified against `sha256` before it is renamed to `dest`; on a mismatch the partial file is
    deleted and DataError is raised, so nothing unverified is left behind.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        if sha256_file(dest, progress) == sha256:
            log.info("already downloaded: %s", dest)
            return dest
        dest.unlink()
    attempt = 0
    while True:
        attempt += 1
        have = part.stat().st_size if part.exists() else 0
        try:
            _download_attempt(url, part, have, dest.name, progress, timeout)
            break
        except _TRANSIENT as exc:
            if attempt > retries:
                raise DataError(f"{url}: download failed after {attempt} attempts ({exc}); "
                                f"run again to resume from {part}") from None
            log.warning("download of %s interrupted (%s); resuming (attempt %d of %d)",
                        url, exc, attempt + 1, retries + 1)
            time.sleep(retry_wait)
    digest = sha256_file(part, progress)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise DataError(f"{url}: sha256 mismatch (got {digest}, expected {sha256}); "
                        "the download was deleted")
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# safe extraction


def _member_problem(name: str) -> str | None:
    """Why an archive member name is unsafe, or None."""
    if "\x00" in name:
        return "has a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return "is an absolute path"
    if ".." in PurePosixPath(norm).parts:
        return "escapes the target folder ('..')"
    return None


def _link_escapes(member_name: str, target: str, relative_to_member: bool) -> bool:
    norm_target = target.replace("\\", "/")
    if norm_target.startswith("/") or re.match(r"^[A-Za-z]:", norm_target):
        return True
    base = PurePosixPath(member_name.replace("\\", "/")).parent if relative_to_member else PurePosixPath()
    depth = 0
    for part in (*base.parts, *PurePosixPath(norm_target).parts):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return True
    return False


def check_archive(path: str | os.PathLike) -> str:
    """Raise DataError for an archive with a member that could write outside its folder.

    Rejects absolute names, '..' components, links (symbolic or hard) whose target leaves the
    folder, and device/fifo members; a damaged archive is a DataError too. Returns the format:
    'zip' or 'tar'.
    """
    path = Path(path)
    try:
        return _check_archive(path)
    except _ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: damaged or unreadable archive ({exc})") from None


def _check_archive(path: Path) -> str:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                why = _member_problem(info.filename)
                if why:
                    raise DataError(f"{path}: member '{info.filename[:120]}' {why}; refusing to extract")
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    target = zf.read(info).decode("utf-8", "replace")
                    if _link_escapes(info.filename, target, True):
                        raise DataError(f"{path}: link '{info.filename[:120]}' points outside the "
                                        "archive folder; refusing to extract")
        return "zip"
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not is_tar:
        raise DataError(f"{path}: not a zip or tar archive")
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                why = _member_problem(member.name)
                if why:
                    raise DataError(f"{path}: member '{member.name[:120]}' {why}; refusing to extract")
                if member.issym() and _link_escapes(member.name, member.linkname, True):
                    raise DataError(f"{path}: link '{member.name[:120]}' points outside the archive "
                                    "folder; refusing to extract")
                if member.islnk() and (_member_problem(member.linkname)
                                       or _link_escapes(member.name, member.linkname, False)):
                    raise DataError(f"{path}: hard link '{member.name[:120]}' points outside the "
                                    "archive folder; refusing to extract")
                if member.ischr() or member.isblk() or member.isfifo():
                    raise DataError(f"{path}: member '{member.name[:120]}' is a device or fifo; "
                                    "refusing to extract")
    except tarfile.TarError as exc:
        raise DataError(f"{path}: damaged tar archive ({exc})") from None
    return "tar"


def _extract_all(archive: Path, kind: str, dest: Path, progress: bool) -> None:
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in tqdm(members, desc=f"extract {archive.name}", unit="file",
                             disable=not progress or len(members) < 50):
                zf.extract(info, dest)
    else:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in tqdm(members, desc=f"extract {archive.name}", unit="file",
                               disable=not progress or len(members) < 50):
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: belt and braces
                    tf.extract(member, dest, filter="data")
                else:  # pragma: no cover - members were checked by check_archive
                    tf.extract(member, dest)


def extract_collection(archive: str | os.PathLike, data_root: str | os.PathLike, collection: str,
                       feature: str, progress: bool = True, feature_format: str = "bigfile",
                       query_feature: str | None = None) -> Path:
    """Extract `archive` so that `<data_root>/<collection>/` appears, atomically.

    The archive may hold `<collection>/...` or the collection's contents at its top level.
    Extraction goes to a temporary folder inside data_root, which is renamed into place only
    when the collection is complete; on any failure nothing is left behind.
    """
    archive = Path(archive)
    data_root = Path(data_root)
    kind = check_archive(archive)
    data_root.mkdir(parents=True, exist_ok=True)
    target = data_root / collection
    tmp = Path(tempfile.mkdtemp(prefix=f".{collection}.extract-", dir=data_root))
    try:
        try:
            _extract_all(archive, kind, tmp, progress)
        except _ARCHIVE_ERRORS as exc:
            raise DataError(f"{archive}: extraction failed ({exc})") from None
        if (tmp / collection).is_dir():
            found = tmp / collection
        elif (tmp / "TextData").is_dir() or (tmp / "FeatureData").is_dir():
            found = tmp
        else:
            raise DataError(f"{archive}: no '{collection}/' folder (nor TextData/, FeatureData/) "
                            "at the top of the archive")
        missing = CollectionPaths(found, collection, feature, feature_format, query_feature).missing()
        if missing:
            rel = ", ".join(str(p.relative_to(found)) for p in missing[:4])
            raise DataError(f"{archive}: the archive's collection '{collection}' lacks {rel}")
        if target.exists():
            raise DataError(f"{target}: already exists; not overwriting it with {archive}")
        if found == tmp:
            os.rename(tmp, target)
        else:
            os.rename(found, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# the fetch stage's logic


def fingerprint(paths: CollectionPaths) -> dict[str, dict[str, int]]:
    """Size and modification time (ns) of each file of the layout, by path in the collection.

    Written into source.json for folder and archive origins so that a pipeline re-running the
    fetch stage sees a changed source.json (and re-validates) exactly when the features change.
    """
    out = {}
    for f in paths.required_files():
        st = f.stat()
        out[f.relative_to(paths.collection_dir).as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def missing_dataset_message(settings: dict[str, Any], folder: Path, missing: list[Path] | None = None) -> str:
    ds, collection, feature = settings["dataset"], settings["collection"], settings["feature"]
    root = Path(settings["data_root"]).expanduser()
    if missing:
        rel = ", ".join(str(p.relative_to(folder)) for p in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        what = f"the MS-SL collection at {folder} is incomplete (missing {rel}{more})"
    else:
        what = (f"no MS-SL collection at {folder} (looked for {folder}/TextData and "
                f"{folder}/FeatureData/{feature})")
    return (f"dataset '{ds}': {what}; get {collection}.zip from the MS-SL data page {MSSL_DATA_PAGE} "
            f"and unzip it under {root} (data_root), or set {ds}.archive and {ds}.sha256 in params.yaml")


def _archive_from_settings(settings: dict[str, Any], data_root: Path, progress: bool
                           ) -> tuple[Path, bool]:
    """(local archive path, whether it was downloaded by us)."""
    ds = settings["dataset"]
    spec = str(settings["archive"])
    sha = _normalise_sha256(settings.get("sha256"), f"{ds}.sha256")
    if _is_url(spec):
        if sha is None:
            raise DataError(f"params.yaml: {ds}.archive is a URL; set {ds}.sha256 to its checksum")
        name = PurePosixPath(urllib.parse.urlparse(spec).path).name
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "archive"
        dest = data_root / _DOWNLOAD_DIR / name
        log.info("downloading %s -> %s", spec, dest)
        return download(spec, dest, sha, progress=progress), True
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise DataError(f"{path}: archive not found ({ds}.archive in params.yaml)")
    if sha is not None:
        digest = sha256_file(path, progress)
        if digest != sha:
            raise DataError(f"{path}: sha256 mismatch (got {digest}, expected {sha})")
    return path, False


def _generate_collection(settings: dict[str, Any], generator: dict[str, Any], data_dir: Path,
                         fmt: dict[str, Any], progress: bool,
                         generate: Callable[..., Path] | None) -> dict[str, Any]:
    """Generate the demo corpus named by `{ds}.generator`; returns the source.json fields."""
    ds, collection, feature = str(settings["dataset"]), str(settings["collection"]), str(settings["feature"])
    if generate is None:
        from .demo import generate_corpus as generate
    out_dir = (data_dir / ds / DEMO_CORPUS_SUBDIR).absolute()
    preset = str(generator.get("preset", ds))
    seed = int(generator.get("seed", 0))
    kwargs = {"scale": float(generator["scale"])} if "scale" in generator else {}
    # demo options for the honest-numbers checks (prvr.data.demo), and `moments` (each test
    # caption's moment, the search's ground truth); off unless set
    kwargs.update({k: bool(generator[k]) for k in ("dense_gt", "val_is_test", "moments") if generator.get(k)})
    if fmt["feature_format"] == "hdf5":   # the CLIP layout, under the dataset's file names
        kwargs.update(layout="hdf5", video_file=feature, query_file=fmt["query_feature"])
    elif fmt["feature_format"] == "bigfile_hdf5":   # feature.hdf5 + video2frames.txt
        kwargs.update(layout="bigfile_hdf5")
    log.info("generating the %s corpus (preset %s, seed %d) under %s", ds, preset, seed, out_dir)
    try:
        collection_dir = Path(generate(out_dir, preset=preset, seed=seed, progress=progress, **kwargs))
    except ValueError as exc:  # unknown preset, bad scale
        raise DataError(f"params.yaml: {ds}.generator: {exc}") from None
    if collection_dir.name != collection:
        raise DataError(f"params.yaml: {ds}.collection is '{collection}' but the generator preset "
                        f"'{preset}' writes '{collection_dir.name}'")
    return dict(origin="generated", collection_dir=str(collection_dir.absolute()),
                generator={"preset": preset, "seed": seed, **kwargs})


def _find_or_extract_collection(settings: dict[str, Any], fmt: dict[str, Any],
                                progress: bool) -> dict[str, Any]:
    """Reference `<data_root>/<collection>`, extracting `{ds}.archive` there when it is absent;
    returns the source.json fields."""
    collection, feature = str(settings["collection"]), str(settings["feature"])
    data_root = Path(settings["data_root"]).expanduser().absolute()
    folder = data_root / collection
    paths = CollectionPaths(folder, collection, feature, **fmt)
    if folder.is_dir():
        missing = paths.missing()
        if missing:
            raise DataError(missing_dataset_message(settings, folder, missing))
        log.info("found the MS-SL collection at %s (referenced, not copied)", folder)
        return dict(origin="folder", collection_dir=str(folder), data_root=str(data_root),
                    files=fingerprint(paths))
    if settings.get("archive"):
        archive, downloaded = _archive_from_settings(settings, data_root, progress)
        log.info("extracting %s into %s", archive, data_root)
        extract_collection(archive, data_root, collection, feature, progress=progress, **fmt)
        if downloaded:
            archive.unlink(missing_ok=True)
        return dict(origin="archive", collection_dir=str(folder), data_root=str(data_root),
                    archive=str(settings["archive"]), sha256=settings.get("sha256"),
                    files=fingerprint(paths))
    raise DataError(missing_dataset_message(settings, folder))


def fetch(settings: dict[str, Any], data_dir: str | os.PathLike = "data", progress: bool = True,
          generate: Callable[..., Path] | None = None) -> dict[str, Any]:
    """Make the dataset's collection available and write data/<dataset>/source.json atomically.

    Returns the record written. Raises DataError (one line) when the dataset cannot be found.
    """
    ds = str(settings["dataset"])
    collection = _single_component(str(settings["collection"]), f"{ds}.collection")
    feature = _single_component(str(settings["feature"]), f"{ds}.feature")
    data_dir = Path(data_dir)
    fmt = format_of(settings)
    if fmt["query_feature"]:
        fmt["query_feature"] = _single_component(str(fmt["query_feature"]), f"{ds}.query_feature")
    CollectionPaths(data_dir, collection, feature, **fmt)   # an unknown feature_format fails here
    record: dict[str, Any] = {"dataset": ds, "collection": collection, "feature": feature}
    if fmt["feature_format"] != "bigfile":
        record.update(feature_format=fmt["feature_format"], query_feature=fmt["query_feature"])

    generator = settings.get("generator")
    if generator:
        record.update(_generate_collection(settings, generator, data_dir, fmt, progress, generate))
    else:
        record.update(_find_or_extract_collection(settings, fmt, progress))
    out = source_file(settings, data_dir)
    write_json_atomic(out, record)
    log.info("wrote %s", out)
    return record
