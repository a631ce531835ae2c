"""A small idiomatic client for rerank-service over the generated rerank.v1 stubs."""

from rerank_client.client import (
    AsyncRerankClient,
    RankedDocument,
    RerankClient,
    RerankItemError,
    RerankResult,
    StreamAnswer,
    field_violations,
)

__all__ = [
    "AsyncRerankClient",
    "RankedDocument",
    "RerankClient",
    "RerankItemError",
    "RerankResult",
    "StreamAnswer",
    "field_violations",
]
