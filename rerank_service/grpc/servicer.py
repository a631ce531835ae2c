"""gRPC adaptation: proto ⇄ domain. Naming, admitting, refusing and recording calls is
the edge's (edge.py); the ranking is the engine's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2

from rerank_service.core.domain import (
    CallContext,
    DeploymentInfo,
    FieldViolation,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    echo,
    invalid_argument,
)
from rerank_service.core.engine import RerankEngine
from rerank_service.core.stream_window import answer_concurrently
from rerank_service.frontdoor.auth import bearer_token
from rerank_service.grpc.edge import SERVICE, Answer, ItemEdge
from rerank_service.grpc.status import internal_error
from rerank_service.observability.logging import get_logger
from rerank_service.observability.request_id import current_request_id, new_request_id
from rerank_service.observability.trace_context import trace_context

STREAM_ITEM_PATH = f"/{SERVICE.full_name}/RerankStream"

_log = get_logger("rerank_service.servicer")


class RerankServicer:
    """RerankService's methods, registered through `RerankServiceEdge.handler`."""

    def __init__(self, engine: RerankEngine, stream_concurrency: int = 32) -> None:
        self._engine = engine
        self._stream_concurrency = stream_concurrency

    async def Rerank(
        self,
        request: rerank_pb2.RerankRequest,
        context: ServicerContext[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse],
    ) -> Answer[rerank_pb2.RerankResponse]:
        outcome = await self._engine.rerank(to_domain(request), call_context(context))
        request_id = outcome.upstream_request_id or current_request_id() or new_request_id()
        return Answer(to_proto(outcome, request_id), outcome)

    async def RerankStream(
        self,
        request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest],
        context: ServicerContext[rerank_pb2.RerankStreamRequest, rerank_pb2.RerankStreamResponse],
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        # One deadline, one set of credentials and one trace context for the whole stream.
        shared = call_context(context)
        items = ItemEdge(STREAM_ITEM_PATH, context.peer())

        async def handle(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            # Runs in a task of its own, so the request id the item edge binds is this item's only.
            def answer(outcome: RerankOutcome, request_id: str) -> rerank_pb2.RerankStreamResponse:
                return rerank_pb2.RerankStreamResponse(id=item.id, response=to_proto(outcome, request_id))

            def refuse(error: ServiceError, request_id: str) -> rerank_pb2.RerankStreamResponse:
                return rerank_pb2.RerankStreamResponse(id=item.id, error=to_error_proto(error, request_id))

            return await items.serve(
                item.id,
                len(item.request.documents),
                item.request.model,
                lambda: self._engine.rerank(to_domain(item.request), shared),
                answer,
                refuse,
            )

        def duplicate(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            error = invalid_argument(
                [FieldViolation("id", f"id {echo(item.id)!r} is already in flight on this stream")]
            )
            request_id = items.refused_at_once(len(item.request.documents))
            return rerank_pb2.RerankStreamResponse(id=item.id, error=to_error_proto(error, request_id))

        def failed(item: rerank_pb2.RerankStreamRequest, exc: Exception) -> rerank_pb2.RerankStreamResponse:
            # The item edge answers every failure of the work; this is a bug in answering it.
            request_id = new_request_id()
            _log.error("unexpected error", request_id=request_id, error=type(exc).__name__)
            return rerank_pb2.RerankStreamResponse(
                id=item.id, error=to_error_proto(internal_error(request_id), request_id)
            )

        async for answer in answer_concurrently(
            request_iterator, handle, key=lambda item: item.id, duplicate=duplicate, failed=failed,
            window=self._stream_concurrency,
        ):  # fmt: skip
            yield answer

    async def ListModels(
        self,
        request: rerank_pb2.ListModelsRequest,
        context: ServicerContext[rerank_pb2.ListModelsRequest, rerank_pb2.ListModelsResponse],
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
                    for model in self._engine.models()
                ]
            )
        )


_DEPLOYMENT_STATES = {
    "healthy": rerank_pb2.DEPLOYMENT_STATE_HEALTHY,
    "ejected": rerank_pb2.DEPLOYMENT_STATE_EJECTED,
    "down": rerank_pb2.DEPLOYMENT_STATE_DOWN,
}


def deployment_proto(deployment: DeploymentInfo) -> rerank_pb2.DeploymentInfo:
    return rerank_pb2.DeploymentInfo(
        name=deployment.name,
        backend=deployment.backend,
        format=deployment.format,
        upstream_url=deployment.upstream_url,
        priority=deployment.priority,
        weight=deployment.weight,
        state=_DEPLOYMENT_STATES.get(deployment.state, rerank_pb2.DEPLOYMENT_STATE_UNSPECIFIED),
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


def to_proto(outcome: RerankOutcome, request_id: str) -> rerank_pb2.RerankResponse:
    response = rerank_pb2.RerankResponse(request_id=request_id)
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


def call_context(context: ServicerContext[Any, Any]) -> CallContext:
    """What the caller brings besides the request: deadline, credentials, trace context."""
    remaining = context.time_remaining()
    metadata = context.invocation_metadata()
    traceparent, tracestate = trace_context(metadata)
    return CallContext(
        deadline=None if remaining is None else time.monotonic() + remaining,
        bearer_token=bearer_token(metadata),
        traceparent=traceparent,
        tracestate=tracestate,
    )
