"""The MS-SL feature layout: where its files are and how to read them safely.

A collection folder (see docs/msssl_layout.md)::

    <collection_dir>/TextData/<collection>{train,val,test}.caption.txt
    <collection_dir>/TextData/roberta_<collection>_query_feat.hdf5
    <collection_dir>/FeatureData/<feature>/{shape.txt,id.txt,feature.bin,video2frames.txt}

or, with ``feature_format: hdf5`` (the CLIP ViT-B/32 files of DL-DKD), one HDF5 file of
per-video (frames, D) datasets and one of per-caption query features::

    <collection_dir>/FeatureData/<feature>          e.g. new_clip_vit_32_tvr_vid_features.hdf5
    <collection_dir>/TextData/<query_feature>       e.g. clip_ViT_B_32_tvr_query_feat.hdf5

or, with ``feature_format: bigfile_hdf5`` (the layout of recent releases such as Holmes and
RAL: the MS-SL folders with the BigFile frames converted to HDF5), the BigFile folder with
feature.bin/shape.txt/id.txt replaced by one HDF5 file holding one (n_frames, D) float32
dataset per video id, rows in the order video2frames.txt lists the video's frames::

    <collection_dir>/FeatureData/<feature>/{feature.hdf5,video2frames.txt}
    <collection_dir>/TextData/roberta_<collection>_query_feat.hdf5

(`python -m prvr.data.convert_bigfile FeatureData/<feature>` writes feature.hdf5 from a
BigFile folder.)

Every reader here treats file contents as data. `video2frames.txt` is a Python dict literal
in the public release; it is parsed by a strict scanner that accepts only
``{str: [str, ...], ...}`` and never evaluates anything. Nothing read from a data file is
ever turned into a filesystem path.
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SPLITS = ("train", "val", "test")

MSSL_DATA_PAGE = "https://github.com/HuiGuanLab/ms-sl"

# Where the demo corpus is generated (relative to the data folder of the pipeline).
DEMO_CORPUS_SUBDIR = "corpus"

# Visual feature formats: an MS-SL BigFile folder, or one HDF5 file of per-video datasets.
# "bigfile_hdf5": the BigFile folder's frames in FeatureData/<feature>/feature.hdf5 instead.
FEATURE_FORMATS = ("bigfile", "hdf5", "bigfile_hdf5")

# The per-video HDF5 file of a feature folder (feature_format bigfile_hdf5).
FRAMES_H5 = "feature.hdf5"


def default_query_feature(collection: str, feature_format: str = "bigfile") -> str:
    """The query feature file of a collection in TextData/ (RoBERTa for BigFile, CLIP for HDF5)."""
    if feature_format == "hdf5":
        return f"clip_ViT_B_32_{collection}_query_feat.hdf5"
    return f"roberta_{collection}_query_feat.hdf5"


def default_h5_feature(collection: str) -> str:
    """The CLIP ViT-B/32 video feature file of a collection in FeatureData/ (DL-DKD's name)."""
    return f"new_clip_vit_32_{collection}_vid_features.hdf5"


class DataError(ValueError):
    """A data file that cannot be used; the message is one line naming the file and the problem."""


# ---------------------------------------------------------------------------------------------
# paths


@dataclass(frozen=True)
class CollectionPaths:
    """Paths of one MS-SL collection folder for one visual feature.

    `feature` is a folder of FeatureData/ (feature_format 'bigfile') or an HDF5 file in it
    ('hdf5'); `query_feature` a file of TextData/ (default: see default_query_feature)."""

    collection_dir: Path
    collection: str
    feature: str
    feature_format: str = "bigfile"
    query_feature: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "collection_dir", Path(self.collection_dir))
        if self.feature_format not in FEATURE_FORMATS:
            raise DataError(f"params.yaml: feature_format '{self.feature_format}' is not one of "
                            f"{', '.join(FEATURE_FORMATS)}")

    @property
    def text_dir(self) -> Path:
        return self.collection_dir / "TextData"

    def caption_file(self, split: str) -> Path:
        return self.text_dir / f"{self.collection}{split}.caption.txt"

    @property
    def caption_files(self) -> dict[str, Path]:
        return {split: self.caption_file(split) for split in SPLITS}

    @property
    def query_feat_file(self) -> Path:
        return self.text_dir / (self.query_feature
                                or default_query_feature(self.collection, self.feature_format))

    @property
    def is_hdf5(self) -> bool:
        return self.feature_format == "hdf5"

    @property
    def reads_video2frames(self) -> bool:
        """The feature folder's video2frames.txt lists each video's frames (bigfile, bigfile_hdf5)."""
        return self.feature_format in ("bigfile", "bigfile_hdf5")

    @property
    def video_feat_file(self) -> Path:
        """The per-video HDF5 file: FeatureData/<feature> ('hdf5'),
        FeatureData/<feature>/feature.hdf5 ('bigfile_hdf5')."""
        if self.feature_format == "bigfile_hdf5":
            return self.feature_dir / FRAMES_H5
        return self.collection_dir / "FeatureData" / self.feature

    @property
    def video_h5_files(self) -> list[Path]:
        """The per-video HDF5 files of the layout (none for bigfile)."""
        return [] if self.feature_format == "bigfile" else [self.video_feat_file]

    @property
    def feature_dir(self) -> Path:
        return self.collection_dir / "FeatureData" / self.feature

    @property
    def shape_file(self) -> Path:
        return self.feature_dir / "shape.txt"

    @property
    def id_file(self) -> Path:
        return self.feature_dir / "id.txt"

    @property
    def feature_file(self) -> Path:
        return self.feature_dir / "feature.bin"

    @property
    def video2frames_file(self) -> Path:
        return self.feature_dir / "video2frames.txt"

    def required_files(self) -> list[Path]:
        if self.is_hdf5:
            return [*self.caption_files.values(), self.query_feat_file, self.video_feat_file]
        if self.feature_format == "bigfile_hdf5":
            return [*self.caption_files.values(), self.query_feat_file, self.video_feat_file,
                    self.video2frames_file]
        return [*self.caption_files.values(), self.query_feat_file, self.shape_file,
                self.id_file, self.feature_file, self.video2frames_file]

    def missing(self) -> list[Path]:
        return [p for p in self.required_files() if not p.is_file()]


# ---------------------------------------------------------------------------------------------
# small readers


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _decode_text(raw: bytes) -> str:
    """UTF-8 (with or without BOM); bytes that are not UTF-8 are read as ISO-8859-1."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("iso-8859-1")


def caption_key_alias(cap_id: str) -> str | None:
    """The other key a caption's query features may be stored under: DL-DKD's CLIP query files
    key TVR / ActivityNet captions ``<video>#enc#<n>`` as ``<video>#<n>``."""
    return "#".join(cap_id.split("#enc#")) if "#enc#" in cap_id else None


def video_id_of(cap_id: str) -> str:
    """The video of a caption: its id up to the first '#'."""
    return cap_id.split("#", 1)[0]


_NEWLINE = re.compile(r"\r\n|\r|\n")


def parse_caption_lines(path: str | os.PathLike
                        ) -> tuple[list[tuple[str, str, str]], list[tuple[int, str]]]:
    """Read a caption file leniently: (captions, [(line_no, what is wrong), ...]).

    Blank lines are skipped. A line is ``<cap_id><whitespace><free text>``; a line without text
    or with an empty video id (cap_id starting with '#') is reported, not returned.
    """
    path = Path(path)
    text = _decode_text(_read_bytes(path))
    captions: list[tuple[str, str, str]] = []
    bad: list[tuple[int, str]] = []
    # Only \n, \r\n and \r end a line (as Python's text mode reads it); str.splitlines would also
    # split on characters such as U+0085 or U+2028 inside a caption's text.
    for no, line in enumerate(_NEWLINE.split(text), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            bad.append((no, f"caption '{parts[0][:60]}' has no text"))
            continue
        cap_id, caption = parts
        vid = video_id_of(cap_id)
        if not vid:
            bad.append((no, f"caption id '{cap_id[:60]}' has an empty video id"))
            continue
        captions.append((cap_id, vid, caption.strip()))
    return captions, bad


def read_captions(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """[(cap_id, video_id, text), ...] in file order; a malformed line raises DataError(file:line)."""
    captions, bad = parse_caption_lines(path)
    if bad:
        no, what = bad[0]
        more = f" (and {len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise DataError(f"{path}:{no}: {what}{more}")
    return captions


def split_video_ids(captions: Iterable[tuple[str, str, str]]) -> list[str]:
    """Distinct video ids in order of first appearance."""
    return list(dict.fromkeys(vid for _, vid, _ in captions))


def read_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(N, D) from shape.txt: two non-negative integers on the first line."""
    path = Path(path)
    text = _decode_text(_read_bytes(path)).strip()
    first = text.splitlines()[0] if text else ""
    parts = first.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DataError(f"{path}: expected 'N D' (two non-negative integers), got '{first[:60]}'")
    n, d = int(parts[0]), int(parts[1])
    if d == 0:
        raise DataError(f"{path}: feature dimension is 0")
    return n, d


def read_ids(path: str | os.PathLike) -> list[str]:
    """Frame ids of id.txt (ISO-8859-1, separated by white space), in row order."""
    return _read_bytes(Path(path)).decode("iso-8859-1").split()


# ---------------------------------------------------------------------------------------------
# video2frames.txt: a strict scanner for {str: [str, ...], ...}

# A Python string literal without prefix, on one line: '...' or "..." with backslash escapes.
_STR = r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*\""""
_ENTRY = re.compile(
    r"\s*(?P<key>" + _STR + r")\s*:\s*\[(?P<body>\s*(?:(?:" + _STR + r")\s*,\s*)*(?:(?:"
    + _STR + r")\s*)?)\]\s*(?P<sep>,|\})",
)
_STR_IN_BODY = re.compile(_STR)
# Fast path for the common case (single-quoted ids without quotes, backslashes or ']').
_FAST_ENTRY = re.compile(r"\s*'(?P<key>[^'\\\n]*)'\s*:\s*\[(?P<body>[^\]\\\"]*)\]\s*(?P<sep>,|\})")
_SQ_SPLIT = re.compile(r"'([^'\\\n]*)'")
_OPEN = re.compile(r"\s*\{")
_CLOSE_EMPTY = re.compile(r"\s*\}")
_TAIL = re.compile(r"\s*\Z")


def _unquote(token: str) -> str:
    if "\\" not in token:
        return token[1:-1]
    # The token matched _STR: a single plain string literal, which literal_eval reads as data.
    value = ast.literal_eval(token)
    if not isinstance(value, str):  # pragma: no cover - _STR admits only str literals
        raise ValueError("not a string")
    return value


def _fast_body(body: str) -> list[str] | None:
    """Frames of a list body made only of single-quoted strings; None when it is not that."""
    parts = _SQ_SPLIT.split(body)
    seps = parts[0::2]
    if len(seps) == 1:
        return [] if not seps[0].strip() else None
    if seps[0].strip() or seps[-1].strip() not in ("", ","):
        return None
    if any(sep.strip() != "," for sep in seps[1:-1]):
        return None
    return parts[1::2]


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"{line}:{col}"


def _next_entry(text: str, pos: int, source: str) -> tuple[str, list[str], re.Match]:
    """(key, frames, match) of the ``'video': [...]`` entry at pos; fast path first."""
    fm = _FAST_ENTRY.match(text, pos)
    if fm is not None:
        frames = _fast_body(fm.group("body"))
        if frames is not None:
            return fm.group("key"), frames, fm
    m = _ENTRY.match(text, pos)
    if not m:
        # Point at the first non-blank character where the grammar stopped.
        stop = pos + (len(text[pos:pos + 200]) - len(text[pos:pos + 200].lstrip()))
        snippet = text[stop:stop + 40].split("\n", 1)[0]
        raise DataError(f"{source}:{_line_col(text, stop)}: not a dict of string -> list of "
                        f"strings near '{snippet}' (video2frames.txt is data; it is never "
                        "evaluated)")
    try:
        key = _unquote(m.group("key"))
        frames = [_unquote(t) for t in _STR_IN_BODY.findall(m.group("body"))]
    except (ValueError, SyntaxError):
        raise DataError(f"{source}:{_line_col(text, m.start('key'))}: bad string escape") from None
    return key, frames, m


def parse_video2frames_text(text: str, source: str = "video2frames.txt"
                            ) -> tuple[dict[str, list[str]], list[str]]:
    """Parse the literal; returns (mapping, duplicate keys in order seen).

    Accepts exactly ``{ 'video': ['frame', ...], ... }`` (single or double quoted strings,
    optional trailing commas). Anything else (names, calls, attribute access, numbers, nested
    containers, comments, prefixes such as b'' or f'') raises DataError naming line:column.
    Nothing is evaluated.
    """
    m = _OPEN.match(text)
    if not m:
        raise DataError(f"{source}:{_line_col(text, len(text) - len(text.lstrip()))}: "
                        "expected a dict literal starting with '{'")
    pos = m.end()
    out: dict[str, list[str]] = {}
    dups: list[str] = []
    end = _CLOSE_EMPTY.match(text, pos)
    if end:
        pos = end.end()
    else:
        while True:
            key, frames, m = _next_entry(text, pos, source)
            if key in out:
                dups.append(key)
            out[key] = frames
            pos = m.end()
            if m.group("sep") == "}":
                break
            close = _CLOSE_EMPTY.match(text, pos)  # trailing comma before '}'
            if close:
                pos = close.end()
                break
    if not _TAIL.match(text, pos):
        raise DataError(f"{source}:{_line_col(text, pos)}: unexpected text after the dict literal")
    return out, dups


def read_video2frames(path: str | os.PathLike) -> dict[str, list[str]]:
    """{video_id: [frame_id, ...]} from video2frames.txt, parsed as data only.

    A repeated video id keeps its last list (as Python would); the validate stage reports it.
    """
    path = Path(path)
    mapping, _ = parse_video2frames_text(_decode_text(_read_bytes(path)), source=str(path))
    return mapping


# ---------------------------------------------------------------------------------------------
# locating the corpus of the resolved settings


def source_file(settings: dict[str, Any], data_dir: str | os.PathLike = "data") -> Path:
    """data/<dataset>/source.json, written by the fetch stage."""
    return Path(data_dir) / str(settings["dataset"]) / "source.json"


def default_collection_dir(settings: dict[str, Any], data_dir: str | os.PathLike = "data") -> Path:
    """Where the collection lives when no source.json says otherwise."""
    if settings.get("generator") or settings["dataset"] == "demo":
        return (Path(data_dir) / str(settings["dataset"]) / DEMO_CORPUS_SUBDIR
                / str(settings["collection"])).absolute()
    return Path(settings["data_root"]).expanduser().absolute() / str(settings["collection"])


def read_source(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("collection_dir"), str) \
            or not isinstance(record.get("feature"), str):
        raise DataError(f"{path}: expected an object with 'collection_dir' and 'feature' strings")
    return record


def format_of(settings: dict[str, Any]) -> dict[str, Any]:
    """The feature format keys of a dataset's settings (defaults: BigFile, RoBERTa queries)."""
    return {"feature_format": str(settings.get("feature_format") or "bigfile"),
            "query_feature": settings.get("query_feature") or None}


def locate(settings: dict[str, Any], data_dir: str | os.PathLike = "data",
           must_exist: bool = True) -> CollectionPaths:
    """The collection of the resolved settings.

    Reads data/<dataset>/source.json written by the fetch stage when present (it must agree
    with the settings' collection and feature, else the fetch stage is stale); otherwise the
    default place: data/demo/corpus/<collection> for the demo, <data_root>/<collection> else.
    With must_exist, a missing folder or file raises DataError saying where it looked.
    """
    collection = str(settings["collection"])
    feature = str(settings["feature"])
    src = source_file(settings, data_dir)
    if src.is_file():
        record = read_source(src)
        if record.get("dataset", settings["dataset"]) != settings["dataset"] \
                or record["feature"] != feature \
                or record.get("collection", collection) != collection:
            raise DataError(f"{src}: written for dataset '{record.get('dataset')}' collection "
                            f"'{record.get('collection')}' feature '{record['feature']}', but the "
                            f"settings ask for '{settings['dataset']}' '{collection}' '{feature}'; "
                            "run the fetch stage again")
        collection_dir = Path(record["collection_dir"])
        if not collection_dir.is_absolute():
            raise DataError(f"{src}: collection_dir must be an absolute path")
        if record.get("origin") == "generated":
            # A generated corpus lives next to source.json (data/<dataset>/corpus/<collection>);
            # resolve it from here so that a copied or moved workspace (dvc exp run --temp)
            # finds its own copy, not the absolute path of the workspace that generated it.
            collection_dir = (src.parent / DEMO_CORPUS_SUBDIR / collection).absolute()
    else:
        collection_dir = default_collection_dir(settings, data_dir)
    paths = CollectionPaths(collection_dir, collection, feature, **format_of(settings))
    if must_exist:
        if not collection_dir.is_dir():
            raise DataError(f"{collection_dir}: no MS-SL collection folder here "
                            f"(dataset '{settings['dataset']}'); run the fetch stage")
        missing = paths.missing()
        if missing:
            rel = ", ".join(str(p.relative_to(collection_dir)) for p in missing[:4])
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            raise DataError(f"{collection_dir}: incomplete MS-SL collection, missing {rel}{more}")
    return paths
