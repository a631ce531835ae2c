"""Routes: the model a caller names, served by one or more deployments with fallback."""

from rerank_service.routing.router import Router

__all__ = ["Router"]
