"""The one interface every backend implements."""

from __future__ import annotations

from typing import Protocol

from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import BackendRequest, BackendResult, CallContext, ModelInfo
from rerank_service.core.readiness import Readiness


class Backend(Protocol):
    """Scores a query against documents.

    The engine validates requests before a backend sees them: the model is one of
    `models()`, the query and documents are not blank, and there are no more
    documents than the model's `max_documents` nor than `call_limits` allows.
    """

    @property
    def readiness(self) -> Readiness:
        """Whether the backend can answer now; health follows its changes.

        `rerank` itself refuses while not ready, with the reason only the backend knows
        (a model still loading, an open circuit breaker and when to retry).
        """
        ...

    def models(self) -> list[ModelInfo]:
        """The models this backend serves, with their limits."""
        ...

    def call_limits(self, model: str) -> CallLimits:
        """What one `rerank` call may carry; the engine splits larger requests."""
        ...

    async def start(self) -> None:
        """Acquire what the backend needs (clients, models); after it, the backend is ready."""
        ...

    async def close(self) -> None:
        """Release everything `start` acquired."""
        ...

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        """Score `request.documents`; raise ServiceError with the right code on failure."""
        ...
