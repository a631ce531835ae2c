"""gRPC adaptation: proto ⇄ domain, errors → status. Nothing else lives here."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.core.domain import (
    CallContext,
    FieldViolation,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    echo,
    invalid_argument,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.stream_window import answer_concurrently
from rerank_service.grpc.auth import bearer_token
from rerank_service.grpc.interceptors import log_call
from rerank_service.grpc.status import (
    INFERENCE_TIME_KEY,
    QUEUE_TIME_KEY,
    REQUEST_ID_KEY,
    TOTAL_TIME_KEY,
    UPSTREAM_IDS_KEY,
    UPSTREAM_TIME_KEY,
    Metadata,
    trailing_metadata,
)
from rerank_service.observability.logging import get_logger
from rerank_service.observability.metrics import (
    STREAM_ITEMS,
    CallRecord,
    current_call,
    enter_call,
    new_request_id,
)

_log = get_logger("rerank_service.grpc.servicer")


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, engine: RerankEngine, stream_concurrency: int = 32) -> None:
        self._engine = engine
        self._stream_concurrency = stream_concurrency
        # A local backend's time is the model's; any other backend's is the upstream's.
        self._local = all(model.backend == "local" for model in engine.models())

    async def Rerank(
        self,
        request: rerank_pb2.RerankRequest,
        context: ServicerContext[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse],
    ) -> rerank_pb2.RerankResponse:
        call = current_call()
        call.documents, call.model = len(request.documents), request.model
        result = await self._rerank(request, _call_context(context, call.request_id))
        if isinstance(result, _Failure):
            call.upstream_request_ids = [result.request_id] if result.request_id != call.request_id else None
            await context.abort(
                result.error.code,
                result.error.message,
                trailing_metadata(result.error, result.request_id) + self._timing(call),
            )
            raise AssertionError("unreachable: abort raises")
        call.total_tokens, call.upstream_request_ids = result.total_tokens, result.upstream_request_ids
        context.set_trailing_metadata(_outcome_metadata(result) + self._timing(call))
        return to_proto(result)

    async def RerankStream(
        self,
        request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest],
        context: ServicerContext[rerank_pb2.RerankStreamRequest, rerank_pb2.RerankStreamResponse],
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        # One deadline, one set of credentials and one trace context for the whole stream.
        call_context = _call_context(context, None)
        stream_call = current_call()

        async def handle(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            # Each item is a call of its own: its request id, its access-log line (tagged
            # with its id, carrying its timing: a stream item has no metadata), its metrics.
            # It runs in a task of its own, so the record set here is this item's only.
            record = CallRecord(
                stream_call.method,
                stream_call.peer,
                new_request_id(),
                time.perf_counter(),
                documents=len(item.request.documents),
                model=item.request.model,
                item_id=item.id,
            )
            enter_call(record)
            STREAM_ITEMS.started()
            code = grpc.StatusCode.INTERNAL  # unless it gets to the end
            try:
                result = await self._rerank(
                    item.request, dataclasses.replace(call_context, request_id=record.request_id)
                )
                if isinstance(result, _Failure):
                    code = result.error.code
                    log_call(record, code, time.perf_counter() - record.started, result.error.message)
                    return rerank_pb2.RerankStreamResponse(
                        id=item.id, error=to_error_proto(result.error, result.request_id)
                    )
                code = grpc.StatusCode.OK
                record.total_tokens, record.upstream_request_ids = (
                    result.total_tokens,
                    result.upstream_request_ids,
                )
                log_call(record, code, time.perf_counter() - record.started, None)
                return rerank_pb2.RerankStreamResponse(id=item.id, response=to_proto(result))
            except asyncio.CancelledError:  # the stream ended first (the client cancelled)
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                STREAM_ITEMS.finished(
                    code, time.perf_counter() - record.started, record.documents, record.total_tokens
                )

        def duplicate(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            error = invalid_argument(
                [FieldViolation("id", f"id {echo(item.id)!r} is already in flight on this stream")]
            )
            STREAM_ITEMS.started()  # answered at once, but an item answered all the same
            STREAM_ITEMS.finished(error.code, 0.0, len(item.request.documents), None)
            return rerank_pb2.RerankStreamResponse(id=item.id, error=to_error_proto(error, new_request_id()))

        def failed(item: rerank_pb2.RerankStreamRequest, exc: Exception) -> rerank_pb2.RerankStreamResponse:
            request_id = new_request_id()
            _log.error("unexpected error", request_id=request_id, error=type(exc).__name__)
            return rerank_pb2.RerankStreamResponse(
                id=item.id, error=to_error_proto(_internal(request_id), request_id)
            )

        async for answer in answer_concurrently(
            request_iterator, handle, key=lambda item: item.id, duplicate=duplicate, failed=failed,
            window=self._stream_concurrency,
        ):  # fmt: skip
            stream_call.items = (stream_call.items or 0) + 1
            yield answer

    async def _rerank(
        self, request: rerank_pb2.RerankRequest, call_context: CallContext
    ) -> RerankOutcome | _Failure:
        """One request through the engine: the outcome, or the error with its request id."""
        try:
            return await self._engine.rerank(to_domain(request), call_context)
        except ServiceError as error:
            return _Failure(error, error.request_id or call_context.request_id or new_request_id())
        except Exception:
            request_id = call_context.request_id or new_request_id()
            _log.exception("unexpected error", request_id=request_id)
            return _Failure(_internal(request_id), request_id)

    def _timing(self, call: CallRecord) -> Metadata:
        """Where the call's time went, in milliseconds: total, queued, upstream or in the model."""
        backend = (
            (INFERENCE_TIME_KEY, _ms(call.inference_seconds))
            if self._local
            else (UPSTREAM_TIME_KEY, _ms(call.upstream_seconds))
        )
        return (
            (TOTAL_TIME_KEY, _ms(time.perf_counter() - call.started)),
            (QUEUE_TIME_KEY, _ms(call.queue_seconds)),
            backend,
        )

    async def ListModels(
        self,
        request: rerank_pb2.ListModelsRequest,
        context: ServicerContext[rerank_pb2.ListModelsRequest, rerank_pb2.ListModelsResponse],
    ) -> rerank_pb2.ListModelsResponse:
        context.set_trailing_metadata(self._timing(current_call()))
        return rerank_pb2.ListModelsResponse(
            models=[
                rerank_pb2.ModelInfo(
                    name=model.name,
                    max_documents=model.max_documents,
                    max_query_tokens=model.max_query_tokens,
                    supports_instruct=model.supports_instruct,
                    backend=model.backend,
                )
                for model in self._engine.models()
            ]
        )


def to_domain(request: rerank_pb2.RerankRequest) -> RerankRequest:
    return RerankRequest(
        model=request.model,
        query=request.query,
        documents=list(request.documents),
        top_n=request.top_n if request.HasField("top_n") else None,
        instruct=request.instruct if request.HasField("instruct") else None,
        return_documents=request.return_documents,
    )


def to_proto(outcome: RerankOutcome) -> rerank_pb2.RerankResponse:
    response = rerank_pb2.RerankResponse(request_id=outcome.request_id)
    response.output.SetInParent()  # present even when empty, as before
    response.usage.SetInParent()
    response.usage.total_tokens = outcome.total_tokens
    results = outcome.results
    if not results:
        return response
    add = response.output.results.add
    for ranked in results:
        result = add()
        result.index = ranked.index
        result.relevance_score = ranked.score
        if ranked.text is not None:
            result.document.text = ranked.text
    return response


def to_error_proto(error: ServiceError, request_id: str) -> rerank_pb2.RerankError:
    """A failed stream item: the status Rerank would have returned, with its details."""
    message = rerank_pb2.RerankError(
        code=error.code.value[0],
        message=error.message,
        field_violations=[
            rerank_pb2.RerankError.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ],
        reason=error.reason or "",
        metadata=error.metadata,
        request_id=request_id,
    )
    if error.retry_after is not None:
        message.retry_delay.FromMilliseconds(round(error.retry_after * 1000))
    return message


@dataclass(frozen=True, slots=True)
class _Failure:
    error: ServiceError
    request_id: str


def _internal(request_id: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def _call_context(context: ServicerContext[Any, Any], request_id: str | None) -> CallContext:
    remaining = context.time_remaining()
    metadata = context.invocation_metadata()
    traceparent, tracestate = trace_context(metadata)
    return CallContext(
        deadline=None if remaining is None else time.monotonic() + remaining,
        bearer_token=bearer_token(metadata),
        request_id=request_id,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def _outcome_metadata(outcome: RerankOutcome) -> Metadata:
    if outcome.upstream_request_ids:
        return (
            (REQUEST_ID_KEY, outcome.request_id),
            (UPSTREAM_IDS_KEY, ",".join(outcome.upstream_request_ids)),
        )
    return ((REQUEST_ID_KEY, outcome.request_id),)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


# W3C Trace Context, version 00: version-traceid-parentid-flags, lowercase hex only.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID, _ZERO_PARENT_ID = "0" * 32, "0" * 16
# A tracestate list member: key=value, the key simple or tenant@system, the value
# printable ASCII without ',' or '=' and not ending in a space.
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACESTATE_CHARS = 512


def trace_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str | None]:
    """The caller's (traceparent, tracestate), each None unless it is well-formed.

    They are copied into upstream HTTP headers, so anything malformed is dropped
    silently rather than forwarded: a stray CR/LF would be a header-injection vector.
    Two traceparents are malformed; several tracestates are one list, as in HTTP.
    """
    traceparent: str | bytes | None = None
    states: list[str] = []
    for key, value in metadata or ():
        if key == "traceparent":
            if traceparent is not None:
                return None, None
            traceparent = value
        elif key == "tracestate" and isinstance(value, str):
            states.append(value)
    if not isinstance(traceparent, str) or not valid_traceparent(traceparent):
        return None, None
    return traceparent, valid_tracestate(",".join(states)) if states else None


def valid_traceparent(value: str) -> bool:
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != _ZERO_TRACE_ID and match[2] != _ZERO_PARENT_ID


def valid_tracestate(value: str) -> str | None:
    """The tracestate with empty members and optional spaces dropped, or None if malformed."""
    if len(value) > MAX_TRACESTATE_CHARS:
        return None
    members = [member for member in (part.strip(" \t") for part in value.split(",")) if member]
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    if not all(_TRACESTATE_MEMBER.fullmatch(member) for member in members):
        return None
    return ",".join(members)
