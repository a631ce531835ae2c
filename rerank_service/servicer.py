"""gRPC adaptation: proto ⇄ domain, errors → status. Nothing else lives here."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.auth import bearer_token
from rerank_service.domain import (
    CallContext,
    FieldViolation,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    invalid_argument,
)
from rerank_service.engine import RerankEngine
from rerank_service.interceptors import CallRecord, current_call, log_call
from rerank_service.logging import get_logger
from rerank_service.status import REQUEST_ID_KEY, UPSTREAM_IDS_KEY, trailing_metadata
from rerank_service.stream import answer_concurrently

_log = get_logger("rerank_service.servicer")


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, engine: RerankEngine, stream_concurrency: int = 32) -> None:
        self._engine = engine
        self._stream_concurrency = stream_concurrency

    async def Rerank(
        self,
        request: rerank_pb2.RerankRequest,
        context: ServicerContext[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse],
    ) -> rerank_pb2.RerankResponse:
        call = current_call()
        call.documents, call.model = len(request.documents), request.model
        result = await self._rerank(request, _call_context(context))
        if isinstance(result, _Failure):
            call.request_id = result.request_id
            await context.abort(
                result.error.code, result.error.message, trailing_metadata(result.error, result.request_id)
            )
            raise AssertionError("unreachable: abort raises")
        call.request_id, call.total_tokens = result.request_id, result.total_tokens
        context.set_trailing_metadata(_outcome_metadata(result))
        return to_proto(result)

    async def RerankStream(
        self,
        request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest],
        context: ServicerContext[rerank_pb2.RerankStreamRequest, rerank_pb2.RerankStreamResponse],
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        # One deadline and one set of credentials for the whole stream.
        call_context = _call_context(context)
        stream_call = current_call()

        async def handle(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            started = time.perf_counter()
            result = await self._rerank(item.request, call_context)
            # Each item gets the access-log line a unary call gets, tagged with its id.
            record = CallRecord(
                method=stream_call.method,
                peer=stream_call.peer,
                item_id=item.id,
                documents=len(item.request.documents),
                model=item.request.model,
                request_id=result.request_id,
            )
            seconds = time.perf_counter() - started
            if isinstance(result, _Failure):
                log_call(record, result.error.code, seconds, result.error.message)
                return rerank_pb2.RerankStreamResponse(
                    id=item.id, error=to_error_proto(result.error, result.request_id)
                )
            record.total_tokens = result.total_tokens
            log_call(record, grpc.StatusCode.OK, seconds, None)
            return rerank_pb2.RerankStreamResponse(id=item.id, response=to_proto(result))

        def duplicate(item: rerank_pb2.RerankStreamRequest) -> rerank_pb2.RerankStreamResponse:
            error = invalid_argument(
                [FieldViolation("id", f"id {item.id!r} is already in flight on this stream")]
            )
            return rerank_pb2.RerankStreamResponse(id=item.id, error=to_error_proto(error, uuid.uuid4().hex))

        def failed(item: rerank_pb2.RerankStreamRequest, exc: Exception) -> rerank_pb2.RerankStreamResponse:
            request_id = uuid.uuid4().hex
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
            return _Failure(error, error.request_id or uuid.uuid4().hex)
        except Exception:
            request_id = uuid.uuid4().hex
            _log.exception("unexpected error", request_id=request_id)
            return _Failure(_internal(request_id), request_id)

    async def ListModels(
        self,
        request: rerank_pb2.ListModelsRequest,
        context: ServicerContext[rerank_pb2.ListModelsRequest, rerank_pb2.ListModelsResponse],
    ) -> rerank_pb2.ListModelsResponse:
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
    return rerank_pb2.RerankResponse(
        request_id=outcome.request_id,
        output=rerank_pb2.RerankOutput(
            results=[
                rerank_pb2.RerankResult(
                    index=ranked.index,
                    relevance_score=ranked.score,
                    document=rerank_pb2.RerankDocument(text=ranked.text) if ranked.text is not None else None,
                )
                for ranked in outcome.results
            ]
        ),
        usage=rerank_pb2.RerankUsage(total_tokens=outcome.total_tokens),
    )


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


def _call_context(context: ServicerContext[Any, Any]) -> CallContext:
    remaining = context.time_remaining()
    return CallContext(
        deadline=None if remaining is None else time.monotonic() + remaining,
        bearer_token=bearer_token(context.invocation_metadata()),
    )


def _outcome_metadata(outcome: RerankOutcome) -> tuple[tuple[str, str | bytes], ...]:
    metadata: list[tuple[str, str | bytes]] = [(REQUEST_ID_KEY, outcome.request_id)]
    if outcome.upstream_request_ids:
        metadata.append((UPSTREAM_IDS_KEY, ",".join(outcome.upstream_request_ids)))
    return tuple(metadata)
