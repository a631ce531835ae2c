"""Backend that runs reranking models in-process (needs the `local` extra: torch, transformers)."""

from rerank_service.backends.local.backend import LocalBackend, LocalModelSpec

__all__ = ["LocalBackend", "LocalModelSpec"]
