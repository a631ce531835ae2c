"""Admission control: a hard bound on RerankService calls in flight.

Past the bound a call is refused at once with RESOURCE_EXHAUSTED instead of joining
an unbounded queue: under overload the caller learns immediately (and can try
another replica), and the server's memory stays bounded. Health checks and
reflection are never counted or refused, so probes keep working under overload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc.aio import ServicerContext

from rerank_service.core.domain import ServiceError
from rerank_service.grpc.interceptors import (
    LOGGED_SERVICE_PREFIX,
    Behavior,
    Continuation,
    Handler,
    StreamBehavior,
    _rewrap,
)
from rerank_service.grpc.status import trailing_metadata
from rerank_service.observability.metrics import current_call, new_request_id

# What refused callers are told to wait before trying again (a hint, as RetryInfo).
OVERLOAD_RETRY_AFTER = 0.05


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(LOGGED_SERVICE_PREFIX):
            return handler

        def wrap(behavior: Behavior) -> Behavior:
            async def admitted(request: Any, context: ServicerContext[Any, Any]) -> Any:
                if self.in_flight >= self.max_in_flight:
                    await self._refuse(context)
                self.in_flight += 1
                try:
                    return await behavior(request, context)
                finally:
                    self.in_flight -= 1

            return admitted

        def wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def admitted_stream(
                requests: Any, context: ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if self.in_flight >= self.max_in_flight:
                    await self._refuse(context)
                self.in_flight += 1
                try:
                    async for response in behavior(requests, context):
                        yield response
                finally:
                    self.in_flight -= 1

            return admitted_stream

        return _rewrap(handler, wrap, wrap_stream)

    async def _refuse(self, context: ServicerContext[Any, Any]) -> None:
        error = ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"overloaded: {self.max_in_flight} calls in flight (--max-concurrent-requests); retry shortly",
            reason="OVERLOADED",
            retry_after=OVERLOAD_RETRY_AFTER,
        )
        # The call's own id (made by the access log, outermost), so the refusal and its log line match.
        request_id = current_call().request_id or new_request_id()
        await context.abort(error.code, error.message, trailing_metadata(error, request_id))
