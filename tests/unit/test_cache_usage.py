"""A call's usage answered from the score cache fits the contract: cached_tokens is capped
at an int32 as total_tokens is, so an all-cached call whose pairs once cost more than
2**31 - 1 tokens is still answered, not failed in the servicer."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from rerank_service.api.grpc.servicer import to_proto
from rerank_service.cache import MemoryTier, ScoreCache
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import (
    MAX_TOKENS,
    BackendRequest,
    BackendResult,
    CacheOutcome,
    CallContext,
    ModelInfo,
    RerankRequest,
    ScoredDocument,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.readiness import Readiness
from rerank_service.observability.cache_metrics import CacheMetrics
from rerank_service.routing.cached_scores import CachedScores

MODEL = ModelInfo("m", max_documents=100, max_query_tokens=4000, supports_instruct=True, backend="fake")
HUGE = 2_000_000_000  # tokens an upstream reports for one document: each fits, two do not


class CachedBackend:
    """A backend behind the score cache that reports HUGE tokens for each request."""

    def __init__(self, max_documents: int | None) -> None:
        self.readiness = Readiness(True)
        self._limits = CallLimits(max_documents=max_documents)
        self._scores = CachedScores(
            ScoreCache(MemoryTier(1 << 20, ttl=3600)),
            lambda model: {"kind": "fake", "model": model},
            CacheMetrics(CollectorRegistry()),
        )
        self.sent = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def models(self) -> list[ModelInfo]:
        return [MODEL]

    def call_limits(self, model: str) -> CallLimits:
        return self._limits

    async def _score(self, request: BackendRequest, context: CallContext) -> BackendResult:
        self.sent += 1
        return BackendResult(
            scores=[ScoredDocument(index, 0.5) for index in range(len(request.documents))],
            total_tokens=HUGE,
        )

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        return await self._scores.rerank("m", request, context, self._score)


@pytest.mark.parametrize("max_documents", [None, 1], ids=["one-chunk", "chunked"])
async def test_an_all_cached_call_caps_cached_tokens_at_an_int32(max_documents: int | None) -> None:
    backend = CachedBackend(max_documents)
    engine = RerankEngine(backend, chunk_concurrency=4, max_fanout_factor=100)
    for document in ("first", "second"):  # each scored alone: HUGE tokens each, cached
        await engine.rerank(RerankRequest(model="m", query="q", documents=[document]), CallContext())
    assert backend.sent == 2

    outcome = await engine.rerank(
        RerankRequest(model="m", query="q", documents=["first", "second"]), CallContext()
    )

    assert backend.sent == 2  # answered whole from the cache
    assert outcome.cache is CacheOutcome.HIT
    assert (outcome.total_tokens, outcome.cached_tokens) == (0, MAX_TOKENS)
    assert to_proto(outcome, "id").usage.cached_tokens == MAX_TOKENS
