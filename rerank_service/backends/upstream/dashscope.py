"""DashScope's native text-rerank endpoint.

Request:  {model, input: {query, documents}, parameters: {top_n, return_documents, instruct}}
Response: {output: {results: [{index, relevance_score}]}, usage: {total_tokens}, request_id}
Errors:   {code, message, request_id}
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    DialectBase,
    MalformedResponse,
    UpstreamAnswer,
    UpstreamErrorBody,
    json_object,
    optional_str,
    parse_error_body,
    parse_results,
    parse_total_tokens,
)
from rerank_service.core.domain import BackendRequest


class DashScope(DialectBase):
    """What DashScope's two endpoints share: the limits, the instruction, the error body."""

    documents_per_call = 500
    honours_instruct = True  # a field (or parameter) of its own

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_error_body(body)


class DashScopeNative(DashScope):
    name = "dashscope"
    path = "/api/v1/services/rerank/text-rerank/text-rerank"

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        # Documents are never asked back: the engine already holds their text.
        parameters: dict[str, Any] = {"return_documents": False}
        if request.top_n is not None:
            parameters["top_n"] = request.top_n
        if request.instruct is not None:
            parameters["instruct"] = request.instruct
        return {
            "model": request.model,
            "input": {"query": request.query, "documents": request.documents},
            "parameters": parameters,
        }

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        body = json_object(body)
        output = body.get("output")
        if not isinstance(output, dict):
            raise MalformedResponse("'output' is missing or not an object")
        scores = parse_results(output.get("results"), request, self._shape)
        return UpstreamAnswer(
            scores=scores,
            total_tokens=parse_total_tokens(body.get("usage")),
            request_id=optional_str(body.get("request_id")),
        )
