"""The search service: a page and a JSON API over one index (prvr.serve.app; docs/serve.md)."""
from .app import ApiError, Service, VideoFiles, create_app, run_server

__all__ = ["ApiError", "Service", "VideoFiles", "create_app", "run_server"]
