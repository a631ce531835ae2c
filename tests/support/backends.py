"""Backends for tests that need to hold a real backend back."""

from __future__ import annotations

import asyncio
import threading

from rerank_service.backends.upstream import UpstreamBackend
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import BackendRequest, BackendResult, CallContext, ModelInfo
from rerank_service.core.readiness import Readiness


class GatedBackend:
    """An upstream backend whose start() waits until the test opens the gate."""

    def __init__(self, inner: UpstreamBackend) -> None:
        self.inner = inner
        self.gate = threading.Event()

    @property
    def readiness(self) -> Readiness:
        return self.inner.readiness

    def models(self) -> list[ModelInfo]:
        return self.inner.models()

    def call_limits(self, model: str) -> CallLimits:
        return self.inner.call_limits(model)

    async def start(self) -> None:
        await asyncio.to_thread(self.gate.wait, 10)
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        return await self.inner.rerank(request, context)
