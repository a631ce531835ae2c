"""Voyage AI's /v1/rerank.

Request:  {model, query, documents, top_k?, truncation: true, return_documents: false}
Response: {object: "list", data: [{index, relevance_score}], model, usage: {total_tokens}}
Errors:   {detail}

Voyage serves its own rerankers, which take no instruction.
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    DialectBase,
    UpstreamAnswer,
    UpstreamErrorBody,
    flat_body,
    json_object,
    optional_str,
    optional_total_tokens,
    parse_message_error,
)
from rerank_service.core.domain import BackendRequest


class Voyage(DialectBase):
    name = "voyage"
    path = "/v1/rerank"
    documents_per_call = 1000
    honours_instruct = False
    list_name = "data"

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        return flat_body(
            request.model,
            request.query,
            request.documents,
            request.top_n,
            top_n_name="top_k",
            truncation=True,
        )

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        body = json_object(body)
        return UpstreamAnswer(
            scores=self.scores(body, request),
            total_tokens=optional_total_tokens(body.get("usage")),
            request_id=optional_str(body.get("id")),
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_message_error(body)
