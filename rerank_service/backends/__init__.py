"""Backends answer rerank requests; `build_backend` picks one from the settings."""

from __future__ import annotations

from rerank_service.config import Settings
from rerank_service.core.backend import Backend


def build_backend(settings: Settings) -> Backend:
    """The backend named by `settings.backend`."""
    if settings.backend == "local":
        from rerank_service.backends.local import LocalBackend

        return LocalBackend.from_settings(settings)
    if settings.backend == "upstream":
        from rerank_service.backends.upstream import UpstreamBackend

        return UpstreamBackend.from_settings(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")  # config.py rejects it first
