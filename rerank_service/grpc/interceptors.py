"""Server interceptors: one access-log line and the call metrics per call, and bearer-key auth.

The access log makes each call's `CallRecord` (metrics.py) and keeps it in a context
variable for the duration of the call: it carries the call's request id (made here,
at the start, so every log line of the call can carry it) and the servicer and the
backends fill in what only they know (documents, tokens, time queued or upstream).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError
from grpc.aio import ServicerContext

from rerank_service.grpc.auth import KeyChecker, bearer_token
from rerank_service.observability import metrics
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import (
    CallRecord,
    current_call,
    enter_call,
    leave_call,
    new_request_id,
)

# Services anyone may call: probes and tooling must work without a key.
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
LOGGED_SERVICE_PREFIX = "/rerank.v1."

_log = get_logger("rerank_service.access")

__all__ = ["AccessLogInterceptor", "AuthInterceptor", "CallRecord", "current_call", "log_call"]


Behavior = Callable[[Any, ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, ServicerContext[Any, Any]], AsyncIterator[Any]]
# Strings: grpc's runtime classes are not generic, only its type stubs are.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


# What a request message that does not parse (bad protobuf, invalid UTF-8 in a string)
# is handed on as: grpc would answer UNKNOWN; the access log answers INVALID_ARGUMENT.
UNDECODABLE: Any = object()
_UNDECODABLE_MESSAGE = (
    "the request is not a valid protobuf message (bad encoding or invalid UTF-8 in a string)"
)


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return UNDECODABLE

    return parse


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
        "request_deserializer": _tolerant(handler.request_deserializer),
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
    """Logs and counts every RerankService call once: method, peer, code, latency, documents,
    tokens, request id; the one place where call metrics are recorded."""

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(LOGGED_SERVICE_PREFIX):
            return handler
        measured = metrics.for_method(method)

        def wrap(behavior: Behavior) -> Behavior:
            async def logged(request: Any, context: ServicerContext[Any, Any]) -> Any:
                record = CallRecord(method, context.peer(), new_request_id(), time.perf_counter())
                token = enter_call(record)
                measured.started()
                code: grpc.StatusCode | int = grpc.StatusCode.UNKNOWN
                try:
                    if request is UNDECODABLE:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE_MESSAGE)
                    response = await behavior(request, context)
                    code = _final_code(context, grpc.StatusCode.OK)
                    return response
                except BaseException:
                    code = _final_code(context, grpc.StatusCode.CANCELLED)
                    raise
                finally:
                    leave_call(token)
                    seconds = time.perf_counter() - record.started
                    measured.finished(code, seconds, record.documents, record.total_tokens)
                    details = None if code in (grpc.StatusCode.OK, 0) else context.details()
                    log_call(record, code, seconds, details)

            return logged

        def wrap_stream(behavior: StreamBehavior) -> StreamBehavior:
            async def logged_stream(requests: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                record = CallRecord(method, context.peer(), new_request_id(), time.perf_counter(), items=0)
                # Not reset afterwards: the stream's task ends with the call, and a
                # generator may be finalised from another context, where reset() fails.
                enter_call(record)
                measured.started()
                code: grpc.StatusCode | int = grpc.StatusCode.UNKNOWN
                try:
                    async for response in behavior(_refuse_undecodable(requests, context), context):
                        yield response
                    code = _final_code(context, grpc.StatusCode.OK)
                except BaseException:
                    code = _final_code(context, grpc.StatusCode.CANCELLED)
                    raise
                finally:
                    seconds = time.perf_counter() - record.started
                    measured.finished(code, seconds, None, None)
                    details = None if code in (grpc.StatusCode.OK, 0) else context.details()
                    log_call(record, code, seconds, details, event="stream")

            return logged_stream

        return _rewrap(handler, wrap, wrap_stream)


async def _refuse_undecodable(requests: Any, context: ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    """The stream's requests; one that does not parse ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        if request is UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE_MESSAGE)
        yield request


def _final_code(context: ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode | int:
    """The code the call ends with: set by abort()/set_code(), else `default`."""
    code: grpc.StatusCode | int | None = context.code()
    return default if code is None else code


def log_call(
    record: CallRecord, code: grpc.StatusCode | int, seconds: float, details: Any, event: str = "call"
) -> None:
    extra: dict[str, Any] = (
        {"details": details.decode() if isinstance(details, bytes) else details} if details else {}
    )
    if record.items is not None:
        extra["items"] = record.items
    if record.item_id is not None:
        extra["item_id"] = record.item_id
    # Where the time went; the same numbers a unary answer carries as x-*-time metadata.
    if record.queue_seconds:
        extra["queue_ms"] = round(record.queue_seconds * 1000, 3)
    if record.upstream_seconds:
        extra["upstream_ms"] = round(record.upstream_seconds * 1000, 3)
    if record.inference_seconds:
        extra["inference_ms"] = round(record.inference_seconds * 1000, 3)
    if record.upstream_request_ids:
        extra["upstream_request_ids"] = record.upstream_request_ids
    _log.info(
        event,
        method=record.method,
        peer=record.peer,
        code=metrics.code_name(code),
        latency_ms=round(seconds * 1000, 3),
        documents=record.documents,
        total_tokens=record.total_tokens,
        request_id=record.request_id,
        model=record.model,
        **extra,
    )


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
