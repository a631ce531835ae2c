"""DashScope's OpenAI-compatible rerank endpoint.

Request:  {model, query, documents, top_n, instruct, return_documents}
Response: {id, results: [{index, relevance_score}], usage: {total_tokens}}
Errors:   {error: {code, message, type}, request_id} or {code, message, request_id}
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dashscope import DashScope
from rerank_service.backends.upstream.dialect import (
    UpstreamAnswer,
    flat_body,
    json_object,
    optional_str,
    parse_total_tokens,
)
from rerank_service.core.domain import BackendRequest


class DashScopeCompatible(DashScope):
    name = "compatible"
    path = "/compatible-api/v1/reranks"

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        body = flat_body(request.model, request.query, request.documents, request.top_n)
        if request.instruct is not None:
            body["instruct"] = request.instruct
        return body

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        body = json_object(body)
        return UpstreamAnswer(
            scores=self.scores(body, request),
            total_tokens=parse_total_tokens(body.get("usage")),
            request_id=optional_str(body.get("id")) or optional_str(body.get("request_id")),
        )
