"""The rerank logic that is the same whichever backend answers.

Validate, pick the model, call the backend, then sort, cut to top_n and attach
the document texts. The engine never sees protobuf or HTTP.
"""

from __future__ import annotations

import uuid

import grpc

from rerank_service.backends.base import Backend
from rerank_service.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    FieldViolation,
    ModelInfo,
    RankedDocument,
    RerankOutcome,
    RerankRequest,
    ServiceError,
    invalid_argument,
    model_not_found,
)


class RerankEngine:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def ready(self) -> bool:
        return self._backend.ready

    def models(self) -> list[ModelInfo]:
        # Asked each time: a local backend learns what its models can do when it loads them.
        return self._backend.models()

    async def rerank(self, request: RerankRequest, context: CallContext) -> RerankOutcome:
        model = self._validate(request)
        if not self._backend.ready:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "the backend is not ready yet", reason="BACKEND_NOT_READY"
            )
        result = await self._backend.rerank(
            BackendRequest(
                model=model.name,
                query=request.query,
                documents=request.documents,
                instruct=request.instruct,
                top_n=request.top_n,
            ),
            context,
        )
        return RerankOutcome(
            request_id=result.request_id or uuid.uuid4().hex,
            results=rank(result, request),
            total_tokens=result.total_tokens,
        )

    def _validate(self, request: RerankRequest) -> ModelInfo:
        """Check every field, report all violations at once, then resolve the model."""
        violations: list[FieldViolation] = []
        if not request.model.strip():
            violations.append(FieldViolation("model", "must not be empty"))
        if not request.query.strip():
            violations.append(FieldViolation("query", "must not be empty or only whitespace"))
        if not request.documents:
            violations.append(FieldViolation("documents", "must hold at least one document"))
        violations.extend(
            FieldViolation(f"documents[{i}]", "must not be empty or only whitespace")
            for i, document in enumerate(request.documents)
            if not document.strip()
        )
        if request.top_n is not None and request.top_n < 1:
            violations.append(FieldViolation("top_n", f"must be at least 1 when set, got {request.top_n}"))
        served = {model.name: model for model in self._backend.models()}
        model = served.get(request.model)
        if model is not None and len(request.documents) > model.max_documents:
            violations.append(
                FieldViolation(
                    "documents",
                    f"holds {len(request.documents)} documents; model {model.name!r} takes at most "
                    f"{model.max_documents}",
                )
            )
        if violations:
            raise invalid_argument(violations)
        if model is None:
            raise model_not_found(request.model, list(served))
        return model


def rank(result: BackendResult, request: RerankRequest) -> list[RankedDocument]:
    """Sort by score (highest first, ties in input order), apply top_n, attach texts."""
    ordered = sorted(result.scores, key=lambda scored: (-scored.score, scored.index))
    if request.top_n is not None:
        ordered = ordered[: request.top_n]
    return [
        RankedDocument(
            index=scored.index,
            score=scored.score,
            text=request.documents[scored.index] if request.return_documents else None,
        )
        for scored in ordered
    ]
