"""DashScope's native text-rerank endpoint.

Request:  {model, input: {query, documents}, parameters: {top_n, return_documents, instruct}}
Response: {output: {results: [{index, relevance_score}]}, usage: {total_tokens}, request_id}
Errors:   {code, message, request_id}
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    MalformedResponse,
    optional_str,
    parse_results,
    parse_total_tokens,
)
from rerank_service.core.domain import BackendRequest, BackendResult


class DashScopeNative:
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

    def parse_result(self, body: Any, request: BackendRequest) -> BackendResult:
        if not isinstance(body, dict):
            raise MalformedResponse("the body is not a JSON object")
        output = body.get("output")
        if not isinstance(output, dict):
            raise MalformedResponse("'output' is missing or not an object")
        scores = parse_results(output.get("results"), request)
        return BackendResult(
            scores=scores,
            total_tokens=parse_total_tokens(body.get("usage")),
            upstream_request_id=optional_str(body.get("request_id")),
        )
