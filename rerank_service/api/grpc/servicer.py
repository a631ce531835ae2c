"""gRPC translation: proto ⇄ domain, for each RerankService method. Naming, admitting,
refusing and recording calls is the pipeline's (pipeline/call.py), driven by the edge
(edge.py); the ranking is the engine's."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import SERVICE, Answer, answer_too_large, unsent
from rerank_service.api.grpc.status import retry_delay_ms
from rerank_service.core.domain import (
    CallContext,
    DeploymentInfo,
    DeploymentState,
    FieldViolation,
    LongDocuments,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    echo,
    every_state,
    invalid_argument,
)
from rerank_service.core.stream_window import answer_concurrently
from rerank_service.observability.logging import get_logger
from rerank_service.observability.request_id import new_request_id
from rerank_service.pipeline.auth import bearer_token
from rerank_service.pipeline.cache_control import cache_mode
from rerank_service.pipeline.call import Call, Pipeline, internal_error
from rerank_service.pipeline.callers import Caller

STREAM_ITEM_PATH = f"/{SERVICE.full_name}/RerankStream"
# The longest RerankStream item id taken: every answer echoes it whole, and one past
# --max-message-bytes would end the whole stream (grpc refuses to send it).
MAX_ITEM_ID_CHARS = 1024

_log = get_logger("rerank_service.servicer")


class StreamItems(Protocol):
    """A RerankStream's items as the edge hands them over (api/grpc/edge.py's _StreamItems)."""

    def __aiter__(self) -> AsyncIterator[rerank_pb2.RerankStreamRequest]: ...

    def refusal(self, item: rerank_pb2.RerankStreamRequest) -> ServiceError | None:
        """Why `item` may not run (admission had no slot for it), or None."""

    def answered(self, item: rerank_pb2.RerankStreamRequest) -> None:
        """`item`'s answer has been sent: what it held is given back."""

    def arrived(self, item: rerank_pb2.RerankStreamRequest) -> float | None:
        """When `item` was read (perf_counter's; None: not known), asked once."""

    def identify(self) -> Caller:
        """An item's caller, from the stream's credentials as the callers are now (a reload
        may have changed them since the stream opened); UNAUTHENTICATED if none."""

    def when_draining(self, callback: Callable[[], None]) -> None:
        """Have `callback` called once the server drains (at once if it does already)."""


class RerankServicer:
    """RerankService's methods, registered through `RerankServiceEdge.handler`."""

    def __init__(
        self, pipeline: Pipeline, stream_concurrency: int, max_answer_bytes: int | None = None
    ) -> None:
        self._pipeline = pipeline
        self._stream_concurrency = stream_concurrency
        # The largest stream item grpc may send (None: no bound): one larger fails on its own.
        self._max_answer_bytes = max_answer_bytes

    async def Rerank(
        self,
        request: rerank_pb2.RerankRequest,
        context: ServicerContext[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse],
        call: Call,
    ) -> Answer[rerank_pb2.RerankResponse]:
        outcome = await call.rerank(read_request(request, call), call_context(context, call))
        return Answer(to_proto(outcome, outcome.upstream_request_id or call.request_id), outcome)

    async def RerankStream(
        self,
        request_iterator: StreamItems,
        context: ServicerContext[rerank_pb2.RerankStreamRequest, rerank_pb2.RerankStreamResponse],
        call: Call,
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        # One deadline, one set of credentials and one trace context for the whole stream.
        shared = call_context(context, call)
        peer = call.peer
        pipeline = self._pipeline
        item_metrics = pipeline.metrics.stream_items
        max_answer_bytes = self._max_answer_bytes
        # Each item's call, by the item (its object: two items may share an id), until its
        # answer is sent: recorded then, not when the answer is ready (it may never be sent),
        # in its task's context as it was opened (its request id and span current there).
        calls: dict[int, tuple[Call, contextvars.Context]] = {}

        def open_item(item: rerank_pb2.RerankStreamRequest) -> Call:
            # Each item is a call of its own in the pipeline, under the stream's trace.
            # Its time runs from when it was read: its waits for a slot or room count.
            return pipeline.open(
                STREAM_ITEM_PATH, peer, item_metrics, item_id=item.id, scoped=False,
                trace=(shared.traceparent, shared.tracestate), stream=call,
                started=request_iterator.arrived(item),
            )  # fmt: skip

        async def handle(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            # It runs in a task of its own, so the request id bound is this item's only.
            item_call = open_item(item)
            calls[id(item)] = (item_call, contextvars.copy_context())
            try:
                # Its caller as the callers are now: a key a reload removed is refused here.
                item_call.caller = request_iterator.identify()
                if (bad_id := long_id(item.id)) is not None:
                    # Its request was read: metered as any item is (as a duplicate id is).
                    item_call.model, item_call.documents = item.request.model, len(item.request.documents)
                    raise bad_id
                refusal = request_iterator.refusal(item)
                if refusal is not None:  # admission had no slot for it: this item fails, not the stream
                    raise refusal
                outcome = await item_call.rerank(read_request(item.request, item_call), shared)
                reported = outcome.upstream_request_id or item_call.request_id
                answer = rerank_pb2.RerankStreamResponse(id=item.id, response=to_proto(outcome, reported))
                if max_answer_bytes is not None and (size := answer.ByteSize()) > max_answer_bytes:
                    raise answer_too_large(size, max_answer_bytes)
                item_call.succeeded()
                return answer
            except ServiceError as error:
                item_call.failed(error)
                reported = error.upstream_request_id or item_call.request_id
                return rerank_pb2.RerankStreamResponse(
                    id=answer_id(item.id), error=to_error_proto(error, reported)
                )
            except Exception:
                bug = item_call.bug()
                return rerank_pb2.RerankStreamResponse(
                    id=answer_id(item.id), error=to_error_proto(bug, item_call.request_id)
                )

        def duplicate(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            # Refused at once, but a call of its own all the same: counted, and logged with
            # the request id its answer gives (the id a caller quotes must be in the log).
            # Recorded now, in the reader's task that opened it (its span ends there): a
            # refusal meters nothing as answered, whether its answer is sent or not.
            item_call = open_item(item)
            try:
                try:
                    # Its caller as the callers are now, as any item's (handle): a key a reload
                    # removed is refused as such, not billed a duplicate as the caller it was.
                    item_call.caller = request_iterator.identify()
                except ServiceError as refusal:
                    error = refusal
                else:
                    # Its request was read: metered as any item is (the usage log, the caller's metrics).
                    item_call.model, item_call.documents = item.request.model, len(item.request.documents)
                    error = long_id(item.id) or invalid_argument(
                        [FieldViolation("id", f"id {echo(item.id)!r} is already in flight on this stream")]
                    )
                item_call.failed(error)
                return rerank_pb2.RerankStreamResponse(
                    id=answer_id(item.id), error=to_error_proto(error, item_call.request_id)
                )
            finally:
                item_call.finish()

        def failed(item: rerank_pb2.RerankStreamRequest, exc: Exception) -> rerank_pb2.RerankStreamResponse:
            # The pipeline answers every failure of the work; this is a bug in answering it.
            request_id = new_request_id()
            _log.error("unexpected error", request_id=request_id, error=type(exc).__name__)
            return rerank_pb2.RerankStreamResponse(
                id=answer_id(item.id), error=to_error_proto(internal_error(request_id), request_id)
            )

        def sent(item: rerank_pb2.RerankStreamRequest) -> None:
            opened = calls.pop(id(item), None)
            if opened is not None:
                item_call, item_context = opened
                item_context.run(item_call.finish)
            request_iterator.answered(item)

        answers = answer_concurrently(
            request_iterator, handle, key=lambda item: item.id, duplicate=duplicate, failed=failed,
            window=self._stream_concurrency, sent=sent,
            # Draining, its items are answered without running: the window must not keep
            # the reader from its client's half-close (else the stream ends UNAVAILABLE).
            widen=request_iterator.when_draining,
        )  # fmt: skip
        try:
            # Closed with this generator, not whenever the collector finds it: its reader and
            # items in flight must end before the edge gives back what they hold.
            async with contextlib.aclosing(answers):
                async for answer in answers:
                    yield answer
        finally:
            # The stream ended (cancelled, its deadline, a stream-level error) before these
            # items' answers were sent, ready or not: not answered, whatever they were.
            for item_call, item_context in calls.values():
                unsent(item_call, context)
                item_context.run(item_call.finish)
            calls.clear()

    async def ListModels(
        self,
        request: rerank_pb2.ListModelsRequest,
        context: ServicerContext[rerank_pb2.ListModelsRequest, rerank_pb2.ListModelsResponse],
        call: Call,
    ) -> Answer[rerank_pb2.ListModelsResponse]:
        return Answer(
            rerank_pb2.ListModelsResponse(
                models=[
                    rerank_pb2.ModelInfo(
                        name=model.name,
                        max_documents=model.max_documents,
                        max_query_tokens=model.max_query_tokens,
                        supports_instruct=model.supports_instruct,
                        backend=model.backend,
                        format=model.format,
                        upstream_url=model.upstream_url,
                        deployments=[deployment_proto(deployment) for deployment in model.deployments],
                    )
                    for model in self._pipeline.engine.models()
                    if call.caller is None or call.caller.may_call(model.name)  # what it may call
                ]
            )
        )


def long_id(item_id: str) -> ServiceError | None:
    """The refusal of an item id longer than MAX_ITEM_ID_CHARS, or None."""
    if len(item_id) <= MAX_ITEM_ID_CHARS:
        return None
    return invalid_argument(
        [FieldViolation("id", f"has {len(item_id)} characters; at most {MAX_ITEM_ID_CHARS} are allowed")]
    )


def answer_id(item_id: str) -> str:
    """The id an item's error answer echoes: a refused longer one is cut (`long_id`)."""
    return item_id if len(item_id) <= MAX_ITEM_ID_CHARS else echo(item_id)


_DEPLOYMENT_STATES = every_state(
    {
        DeploymentState.HEALTHY: rerank_pb2.DEPLOYMENT_STATE_HEALTHY,
        DeploymentState.EJECTED: rerank_pb2.DEPLOYMENT_STATE_EJECTED,
        DeploymentState.DOWN: rerank_pb2.DEPLOYMENT_STATE_DOWN,
    }
)


def deployment_proto(deployment: DeploymentInfo) -> rerank_pb2.DeploymentInfo:
    return rerank_pb2.DeploymentInfo(
        name=deployment.name,
        backend=deployment.backend,
        format=deployment.format,
        upstream_url=deployment.upstream_url,
        priority=deployment.priority,
        weight=deployment.weight,
        state=_DEPLOYMENT_STATES[deployment.state],
    )


def read_request(request: rerank_pb2.RerankRequest, call: Call) -> RerankRequest:
    """to_domain, the call's model and documents recorded when it refuses the request (it
    was read: metered and logged as any refused request is)."""
    try:
        return to_domain(request)
    except ServiceError:
        call.model, call.documents = request.model, len(request.documents)
        raise


def to_domain(request: rerank_pb2.RerankRequest) -> RerankRequest:
    """The request as the pipeline takes it; INVALID_ARGUMENT for a `long_documents` value
    this service does not know (a newer client's mode): HTTP refuses one too, and taken for
    the route's default it would be answered as what the caller did not ask."""
    mode = request.long_documents
    if mode != rerank_pb2.LONG_DOCUMENTS_UNSPECIFIED and mode not in _LONG_DOCUMENTS:
        raise invalid_argument(
            [
                FieldViolation(
                    "long_documents",
                    f"unknown value {mode}: must be LONG_DOCUMENTS_TRUNCATE, LONG_DOCUMENTS_CHUNK "
                    "or LONG_DOCUMENTS_REJECT (or unset: the route's default)",
                )
            ]
        )
    return RerankRequest(
        model=request.model,
        query=request.query,
        documents=list(request.documents),
        top_n=request.top_n if request.HasField("top_n") else None,
        instruct=request.instruct if request.HasField("instruct") else None,
        return_documents=request.return_documents,
        long_documents=_LONG_DOCUMENTS.get(request.long_documents),
        max_tokens_per_doc=request.max_tokens_per_doc if request.HasField("max_tokens_per_doc") else None,
        chunk_overlap_tokens=(
            request.chunk_overlap_tokens if request.HasField("chunk_overlap_tokens") else None
        ),
    )


# LONG_DOCUMENTS_UNSPECIFIED is absent: the route's default (another value is refused).
_LONG_DOCUMENTS = {
    rerank_pb2.LONG_DOCUMENTS_TRUNCATE: LongDocuments.TRUNCATE,
    rerank_pb2.LONG_DOCUMENTS_CHUNK: LongDocuments.CHUNK,
    rerank_pb2.LONG_DOCUMENTS_REJECT: LongDocuments.REJECT,
}


def to_proto(outcome: RerankOutcome, request_id: str) -> rerank_pb2.RerankResponse:
    response = rerank_pb2.RerankResponse(request_id=request_id)
    response.output.SetInParent()  # present even when empty, as before
    response.usage.SetInParent()
    response.usage.total_tokens = outcome.total_tokens
    response.usage.cached_tokens = outcome.cached_tokens
    results = outcome.results
    if not results:
        return response
    add = response.output.results.add
    for ranked in results:
        result = add()
        result.index = ranked.index
        result.relevance_score = ranked.score
        result.chunks = ranked.chunks
        if ranked.text is not None:
            result.document.text = ranked.text
        if ranked.truncated:
            result.truncated = True
        if ranked.best_chunk is not None:
            best = ranked.best_chunk
            result.best_chunk.CopyFrom(rerank_pb2.BestChunk(index=best.index, start=best.start, end=best.end))
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
        message.retry_delay.FromMilliseconds(retry_delay_ms(error.retry_after))
    return message


def call_context(context: ServicerContext[Any, Any], call: Call) -> CallContext:
    """What the caller brings besides the request: deadline, credentials, and the trace
    context the edge read when it opened the call."""
    remaining = context.time_remaining()
    metadata = context.invocation_metadata()
    traceparent, tracestate = call.trace
    return CallContext(
        deadline=None if remaining is None else time.monotonic() + remaining,
        bearer_token=bearer_token(metadata),
        traceparent=traceparent,
        tracestate=tracestate,
        cache_mode=cache_mode(metadata),
        attempted=call.attempted,
    )
