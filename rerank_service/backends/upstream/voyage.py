"""Voyage AI's /v1/rerank.

Request:  {model, query, documents, top_k?, truncation: true, return_documents: false}
Response: {object: "list", data: [{index, relevance_score}], model, usage: {total_tokens}}
Errors:   {detail}

Voyage serves its own rerankers, which take no instruction.
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    DialectOptions,
    MalformedResponse,
    UpstreamAnswer,
    UpstreamErrorBody,
    optional_str,
    optional_total_tokens,
    parse_message_error,
    parse_results,
    score_shape,
)
from rerank_service.core.domain import BackendRequest


class Voyage:
    name = "voyage"
    path = "/v1/rerank"
    documents_per_call = 1000
    honours_instruct = False

    def __init__(self, options: DialectOptions | None = None) -> None:
        self._shape = score_shape(options or DialectOptions(), "data", "relevance_score")

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "query": request.query,
            "documents": request.documents,
            "truncation": True,
            "return_documents": False,
        }
        if request.top_n is not None:
            body["top_k"] = request.top_n
        return body

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        if not isinstance(body, dict):
            raise MalformedResponse("the body is not a JSON object")
        return UpstreamAnswer(
            scores=parse_results(body.get("data"), request, self._shape),
            total_tokens=optional_total_tokens(body.get("usage")),
            request_id=optional_str(body.get("id")),
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_message_error(body)
