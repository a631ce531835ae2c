"""Backend that forwards to a rerank HTTP API (DashScope native or OpenAI-compatible)."""

from rerank_service.backends.upstream.backend import UpstreamBackend

__all__ = ["UpstreamBackend"]
