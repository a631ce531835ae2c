"""DashScope's native text-rerank endpoint.

Request:  {model, input: {query, documents}, parameters: {top_n, return_documents, instruct}}
Response: {output: {results: [{index, relevance_score}]}, usage: {total_tokens}, request_id}
Errors:   {code, message, request_id}
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


class DashScopeNative:
    name = "dashscope"
    path = "/api/v1/services/rerank/text-rerank/text-rerank"
    documents_per_call = 500
    honours_instruct = True  # a parameter of its own

    def __init__(self, options: DialectOptions | None = None) -> None:
        self._shape = score_shape(options or DialectOptions(), "results", "relevance_score")

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
        if not isinstance(body, dict):
            raise MalformedResponse("the body is not a JSON object")
        output = body.get("output")
        if not isinstance(output, dict):
            raise MalformedResponse("'output' is missing or not an object")
        scores = parse_results(output.get("results"), request, self._shape)
        return UpstreamAnswer(
            scores=scores,
            total_tokens=parse_total_tokens(body.get("usage")),
            request_id=optional_str(body.get("request_id")),
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_error_body(body)
