"""DashScope's OpenAI-compatible rerank endpoint.

Request:  {model, query, documents, top_n, instruct, return_documents}
Response: {id, results: [{index, relevance_score}], usage: {total_tokens}}
Errors:   {error: {code, message, type}, request_id} or {code, message, request_id}
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    DialectOptions,
    MalformedResponse,
    UpstreamAnswer,
    UpstreamErrorBody,
    optional_str,
    parse_error_body,
    parse_results,
    parse_total_tokens,
    score_shape,
)
from rerank_service.core.domain import BackendRequest


class DashScopeCompatible:
    name = "compatible"
    path = "/compatible-api/v1/reranks"
    documents_per_call = 500
    honours_instruct = True  # a field of its own

    def __init__(self, options: DialectOptions | None = None) -> None:
        self._shape = score_shape(options or DialectOptions(), "results", "relevance_score")

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "query": request.query,
            "documents": request.documents,
            "return_documents": False,
        }
        if request.top_n is not None:
            body["top_n"] = request.top_n
        if request.instruct is not None:
            body["instruct"] = request.instruct
        return body

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        if not isinstance(body, dict):
            raise MalformedResponse("the body is not a JSON object")
        return UpstreamAnswer(
            scores=parse_results(body.get("results"), request, self._shape),
            total_tokens=parse_total_tokens(body.get("usage")),
            request_id=optional_str(body.get("id")) or optional_str(body.get("request_id")),
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_error_body(body)
