"""`prvr serve`: a search page and a JSON API over one index (docs/serve.md).

One process holds one SearchIndex and at most one TextEncoder, shared by every request.
Searches run one at a time under a lock (the model and faiss use the process's threads
already); uvicorn's `limit_concurrency` bounds the connections served at once, and more get
503. The web stack is FastAPI on uvicorn.

    GET  /                         the page
    GET  /api/search?query_id=ID&k=K   |   ?text=...&k=K
    POST /api/search               {"query_id": ..., "k": ...} or {"text": ..., "k": ...}
    GET  /api/index                the index's info, and what this server can do
    GET  /api/videos?id=A&id=B     which of these videos have a playable file
    GET  /videos/{video_id}        the file (HTTP Range requests, so the player can seek)
    GET  /healthz
"""

import logging
import os
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ..search.index import SearchError

log = logging.getLogger("prvr.serve")

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".ogv", ".avi")
MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg",
               ".mkv": "video/x-matroska", ".mov": "video/quicktime", ".avi": "video/x-msvideo"}
MAX_TEXT = 500          # characters of a typed query
MAX_K = 100             # hits a request may ask for
MAX_IDS = 200           # ids a /api/videos request may ask about


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class VideoFiles:
    """video id -> file, fixed at start-up. A folder gives `<video_id>.<ext>` for the usual
    containers (its top level); a mapping file gives `video_id<TAB>path` lines, paths relative to
    the file's folder. Every path must resolve inside that folder; an id is only ever looked up
    in this table, never joined to a path."""

    def __init__(self, source: str | os.PathLike):
        src = Path(source)
        self.files: dict[str, Path] = {}
        if src.is_dir():
            self.root = src.resolve()
            for f in sorted(self.root.iterdir()):
                if f.is_file() and f.suffix.lower() in VIDEO_EXTS and self._inside(f):
                    self.files.setdefault(f.stem, f.resolve())
        elif src.is_file():
            self.root = src.parent.resolve()
            try:
                lines = src.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise SearchError(f"{src}: unreadable video mapping ({exc})") from None
            for no, line in enumerate(lines, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                parts = line.split("\t") if "\t" in line else line.split(None, 1)
                if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                    raise SearchError(f"{src}:{no}: expected 'video_id<TAB>path'")
                vid, rel = parts[0].strip(), parts[1].strip()
                path = (self.root / rel).resolve()
                if not self._inside(path):
                    raise SearchError(f"{src}:{no}: {rel!r} is outside {self.root}")
                if path.suffix.lower() not in VIDEO_EXTS:
                    raise SearchError(f"{src}:{no}: {rel!r}: not a video container ({', '.join(VIDEO_EXTS)})")
                if not path.is_file():
                    raise SearchError(f"{src}:{no}: {rel!r}: no such file")
                self.files[vid] = path
        else:
            raise SearchError(f"--videos {source}: no such folder or mapping file")

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def get(self, video_id: str) -> Path | None:
        return self.files.get(video_id)


class Service:
    """The shared index and encoder, and the checked requests on them."""

    def __init__(self, index, encoder=None, videos: VideoFiles | None = None):
        self.index, self.encoder, self.videos = index, encoder, videos
        self.lock = threading.Lock()
        self.started = time.time()
        self.served = 0

    def _k(self, k: Any) -> int:
        if isinstance(k, str):
            try:
                k = int(k.strip())
            except ValueError:
                raise ApiError(400, f"k {k!r}: expected a whole number") from None
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ApiError(400, f"k {k!r}: expected a whole number from 1 to {MAX_K}")
        return min(k, len(self.index.video_ids))   # a k above the collection gives every video

    def search(self, query_id: Any = None, text: Any = None, k: Any = 10) -> dict[str, Any]:
        k = self._k(k)
        if (query_id is None) == (text is None):
            raise ApiError(400, "give exactly one of query_id and text")
        if query_id is not None:
            if not isinstance(query_id, str) or not query_id.strip():
                raise ApiError(400, "query_id: expected a caption id (its '#' percent-encoded as %23 in a URL)")
            try:
                with self.lock:
                    batch = self.index.query_features([query_id])
                    out = self.index.search_batch(batch, k)[0]
            except SearchError as exc:
                raise ApiError(404, str(exc)) from None
        else:
            if not isinstance(text, str):
                raise ApiError(400, "text: expected a string")
            text = text.strip()
            if not text:
                raise ApiError(400, "text: empty")
            if len(text) > MAX_TEXT:
                raise ApiError(400, f"text: {len(text)} characters, at most {MAX_TEXT}")
            if self.encoder is None:
                raise ApiError(400, "text queries need a text encoder: restart with `prvr serve --encoder DIR`")
            try:
                with self.lock:
                    out = self.index.search_texts([text], k, self.encoder)[0]
            except SearchError as exc:
                raise ApiError(400, str(exc)) from None
        self.served += 1
        return out

    def info(self) -> dict[str, Any]:
        return self.index.info() | {
            "text_queries": self.encoder is not None,
            "encoder": None if self.encoder is None else self.encoder.source,
            "videos": 0 if self.videos is None else len(self.videos.files),
            "max_k": MAX_K, "max_text": MAX_TEXT}


def create_app(service: Service):
    """The FastAPI application over `service`."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="prvr search", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("prvr.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    def index_page():
        return HTMLResponse(page)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "videos": len(service.index.video_ids), "served": service.served,
                "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/api/index")
    def api_index():
        return service.info()

    @app.get("/api/search")
    def api_search(query_id: str | None = None, text: str | None = None, k: str = "10"):
        return service.search(query_id=query_id, text=text, k=k)

    @app.post("/api/search")
    async def api_search_post(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "body: expected a JSON object such as {\"text\": \"...\", \"k\": 10}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body: expected a JSON object such as {\"text\": \"...\", \"k\": 10}")
        unknown = sorted(set(body) - {"query_id", "text", "k"})
        if unknown:
            raise ApiError(400, f"body: unknown fields {', '.join(unknown)} (known: query_id, text, k)")
        import anyio

        return await anyio.to_thread.run_sync(
            lambda: service.search(query_id=body.get("query_id"), text=body.get("text"), k=body.get("k", 10)))

    @app.get("/api/videos")
    def api_videos(id: list[str] = Query(default=[])):
        if len(id) > MAX_IDS:
            raise ApiError(400, f"id: {len(id)} ids, at most {MAX_IDS}")
        return {v: bool(service.videos and service.videos.get(v)) for v in id}

    @app.get("/videos/{video_id}")
    def video(video_id: str):
        path = service.videos.get(video_id) if service.videos else None
        if path is None:
            raise ApiError(404, f"video {video_id[:80]!r}: no file for it" if service.videos else
                           "no video files: restart with `prvr serve --videos DIR`")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    return app


def run_server(args) -> int:
    """`prvr serve`: open the index (and encoder, videos) once, then serve until stopped."""
    import uvicorn

    from ..cli import setup_logging
    from ..search import open_index

    setup_logging()
    t0 = time.perf_counter()
    if args.max_concurrency < 1:
        raise SearchError(f"--max-concurrency {args.max_concurrency}: expected >= 1")
    index = open_index(args.index, data_dir=args.data_dir)
    encoder = index.load_encoder(args.encoder) if args.encoder else None
    videos = VideoFiles(args.videos) if args.videos else None
    log.info("read %s (%d videos, %s)%s%s in %.1f s; serving on http://%s:%d/", args.index,
             len(index.video_ids), index.manifest["method"],
             f", encoder {args.encoder}" if encoder else ", no encoder (caption ids only)",
             f", {len(videos.files)} video files" if videos else "", time.perf_counter() - t0, args.host, args.port)
    app = create_app(Service(index, encoder, videos))
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_concurrency,
                log_level="warning", access_log=False)
    return 0
