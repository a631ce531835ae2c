"""Server interceptors: one access-log line per call, and bearer-key auth.

The access log keeps a `CallRecord` in a context variable for the duration of the
call; the servicer fills in what only it knows (documents, tokens, request id).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from grpc.aio import ServicerContext

from rerank_service.auth import KeyChecker, bearer_token
from rerank_service.logging import get_logger

# Services anyone may call: probes and tooling must work without a key.
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
LOGGED_SERVICE_PREFIX = "/rerank.v1."

_log = get_logger("rerank_service.access")


@dataclass
class CallRecord:
    method: str
    peer: str
    documents: int | None = None
    total_tokens: int | None = None
    request_id: str | None = None
    model: str | None = None
    items: int | None = None  # responses sent on a stream
    item_id: str | None = None  # the RerankStream item this line is about


_current_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "rerank_current_call", default=None
)


def current_call() -> CallRecord:
    """The record of the call being served (a throwaway one outside a logged call)."""
    return _current_call.get() or CallRecord(method="", peer="")


Behavior = Callable[[Any, ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, ServicerContext[Any, Any]], AsyncIterator[Any]]
# Strings: grpc's runtime classes are not generic, only its type stubs are.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


def _rewrap(
    handler: Handler,
    wrap: Callable[[Behavior], Behavior],
    wrap_stream: Callable[[StreamBehavior], StreamBehavior],
) -> Handler:
    """The same handler with its behaviour wrapped: `wrap` for the kinds that answer once
    (a coroutine), `wrap_stream` for those that answer with a stream (a generator).

    Every kind is covered, so a new RPC of any shape can never skip auth or the log.
    """
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(cast(Behavior, handler.unary_unary)), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(cast(Behavior, handler.stream_unary)), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(cast(StreamBehavior, handler.unary_stream)), **serializers
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(cast(StreamBehavior, handler.stream_stream)), **serializers
        )
    raise ValueError(f"a method handler with no behaviour: {handler!r}")


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs every RerankService call once: method, peer, code, latency, documents, tokens, id."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(LOGGED_SERVICE_PREFIX):
            return handler

        def wrap(behavior: Behavior) -> Behavior:
            async def logged(request: Any, context: ServicerContext[Any, Any]) -> Any:
                record = CallRecord(method=method, peer=context.peer())
                token = _current_call.set(record)
                started = time.perf_counter()
                code: grpc.StatusCode | int = grpc.StatusCode.UNKNOWN
                try:
                    response = await behavior(request, context)
                    code = _final_code(context, grpc.StatusCode.OK)
                    return response
                except BaseException:
                    code = _final_code(context, grpc.StatusCode.CANCELLED)
                    raise
                finally:
                    _current_call.reset(token)
                    details = None if code in (grpc.StatusCode.OK, 0) else context.details()
                    log_call(record, code, time.perf_counter() - started, details)

            return logged

        def wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def logged_stream(requests: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                record = CallRecord(method=method, peer=context.peer(), items=0)
                # Not reset afterwards: the stream's task ends with the call, and a
                # generator may be finalised from another context, where reset() fails.
                _current_call.set(record)
                started = time.perf_counter()
                code: grpc.StatusCode | int = grpc.StatusCode.UNKNOWN
                try:
                    async for response in behavior(requests, context):
                        yield response
                    code = _final_code(context, grpc.StatusCode.OK)
                except BaseException:
                    code = _final_code(context, grpc.StatusCode.CANCELLED)
                    raise
                finally:
                    details = None if code in (grpc.StatusCode.OK, 0) else context.details()
                    log_call(record, code, time.perf_counter() - started, details, event="stream")

            return logged_stream

        return _rewrap(handler, wrap, wrap_stream)


def _final_code(context: ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode | int:
    """The code the call ends with: set by abort()/set_code(), else `default`."""
    code: grpc.StatusCode | int | None = context.code()
    return default if code is None else code


def log_call(
    record: CallRecord, code: grpc.StatusCode | int, seconds: float, details: Any, event: str = "call"
) -> None:
    name = code.name if isinstance(code, grpc.StatusCode) else _code_name(code)
    extra: dict[str, Any] = (
        {"details": details.decode() if isinstance(details, bytes) else details} if details else {}
    )
    if record.items is not None:
        extra["items"] = record.items
    if record.item_id is not None:
        extra["item_id"] = record.item_id
    _log.info(
        event,
        method=record.method,
        peer=record.peer,
        code=name,
        latency_ms=round(seconds * 1000, 3),
        documents=record.documents,
        total_tokens=record.total_tokens,
        request_id=record.request_id,
        model=record.model,
        **extra,
    )


def _code_name(value: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == value:
            return str(status.name)
    return str(value)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without an accepted bearer key, except to open services."""

    def __init__(self, checker: KeyChecker) -> None:
        self._checker = checker

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if self._checker.accepts(token):
            return handler
        message = (
            "missing 'authorization: Bearer <key>' metadata"
            if token is None
            else "the bearer key is not accepted"
        )

        async def deny(request: Any, context: ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(requests: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # type: ignore[unreachable]  # abort raises; the yield gives a streaming handler's shape

        return _rewrap(handler, lambda _: deny, lambda _: deny_stream)
