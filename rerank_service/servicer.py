"""gRPC adaptation: proto ⇄ domain, errors → status. Nothing else lives here."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
from grpc.aio import ServicerContext
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.auth import bearer_token
from rerank_service.domain import CallContext, RerankOutcome, RerankRequest, ServiceError
from rerank_service.engine import RerankEngine
from rerank_service.interceptors import current_call
from rerank_service.logging import get_logger
from rerank_service.status import REQUEST_ID_KEY, trailing_metadata

_log = get_logger("rerank_service.servicer")


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, engine: RerankEngine) -> None:
        self._engine = engine

    async def Rerank(
        self,
        request: rerank_pb2.RerankRequest,
        context: ServicerContext[rerank_pb2.RerankRequest, rerank_pb2.RerankResponse],
    ) -> rerank_pb2.RerankResponse:
        call = current_call()
        domain_request = to_domain(request)
        call.documents, call.model = len(domain_request.documents), domain_request.model
        call_context = CallContext(
            deadline=_deadline(context), bearer_token=bearer_token(context.invocation_metadata())
        )
        try:
            outcome = await self._engine.rerank(domain_request, call_context)
        except ServiceError as error:
            call.request_id = error.request_id or uuid.uuid4().hex
            await _abort(context, error, call.request_id)
        except Exception:
            call.request_id = uuid.uuid4().hex
            _log.exception("unexpected error", request_id=call.request_id)
            await _abort(
                context,
                ServiceError(grpc.StatusCode.INTERNAL, f"internal error (request id {call.request_id})"),
                call.request_id,
            )
        call.request_id, call.total_tokens = outcome.request_id, outcome.total_tokens
        context.set_trailing_metadata(((REQUEST_ID_KEY, outcome.request_id),))
        return to_proto(outcome)

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


def _deadline(context: ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _abort(context: ServicerContext[Any, Any], error: ServiceError, request_id: str) -> None:
    await context.abort(error.code, error.message, trailing_metadata(error, request_id))
