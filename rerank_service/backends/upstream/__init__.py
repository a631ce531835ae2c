"""Backend that forwards to a rerank HTTP API: DashScope (native or OpenAI-compatible), the
Cohere-compatible family (Cohere, vLLM, Infinity, Jina, OpenVINO), text-embeddings-inference or Voyage."""

from rerank_service.backends.upstream.backend import UpstreamBackend

__all__ = ["UpstreamBackend"]
