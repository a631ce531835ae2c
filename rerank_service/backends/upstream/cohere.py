"""The cohere-style rerank API: Cohere /v1|v2/rerank, vLLM /v1/rerank, Jina, Infinity
/rerank, OpenVINO Model Server /v3/rerank.

Request:  {model, query, documents: [str], top_n?, return_documents: false}
          (no return_documents at a path ending /v2/rerank: Cohere's v2 API)
Response: {id?, results: [{index, relevance_score, document?}], usage?: {total_tokens},
           meta?: {billed_units: {search_units?, input_tokens?}}}
Errors:   {message} (Cohere), {error: {message, type, code}} or {object: "error", message,
          type, code} (vLLM), {detail} (FastAPI servers)

No instruction field: with `prompt_template="qwen3"` (vLLM serving Qwen3-Reranker) the
instruction is written into the query and documents as the model's chat template.
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    DialectOptions,
    TemplatedDialect,
    UpstreamAnswer,
    UpstreamErrorBody,
    flat_body,
    json_object,
    non_negative_int,
    optional_str,
    optional_total_tokens,
    parse_message_error,
)
from rerank_service.core.domain import BackendRequest

# Cohere's v2 API, at this path, has no `return_documents` (it never sends document text
# back) and refuses any field it does not know with 422 "unknown field": the field is left
# out there. Every other server of the format takes it, and one needs it false: Jina sends
# each document's text back unless told not to (Cohere v1, Infinity and OpenVINO Model
# Server default to false; vLLM, which mounts this path too, ignores the field either way).
COHERE_V2_PATH = "/v2/rerank"


class Cohere(TemplatedDialect):
    name = "cohere"
    path = "/v1/rerank"
    documents_per_call = 1000

    def __init__(self, options: DialectOptions | None = None) -> None:
        super().__init__(options)
        endpoint = self.options.url_path.rstrip("/") + (self.options.path or self.path)
        self._return_documents_field = not endpoint.rstrip("/").endswith(COHERE_V2_PATH)

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        query, documents = self.strings(request)
        return flat_body(
            request.model,
            query,
            documents,
            request.top_n,
            return_documents_field=self._return_documents_field,
        )

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        body = json_object(body)
        return UpstreamAnswer(
            scores=self.scores(body, request),
            total_tokens=_total_tokens(body),
            request_id=optional_str(body.get("id")),
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_message_error(body)


def _total_tokens(body: dict[str, Any]) -> int | None:
    """`usage.total_tokens` (vLLM, Jina, Infinity), else Cohere's billed input tokens, else none."""
    tokens = optional_total_tokens(body.get("usage"))
    if tokens is not None:
        return tokens
    meta = body.get("meta")
    billed = meta.get("billed_units") if isinstance(meta, dict) else None
    billed_tokens = billed.get("input_tokens") if isinstance(billed, dict) else None
    if billed_tokens is None:
        return None  # Cohere bills search units, not tokens
    return non_negative_int(billed_tokens, "meta.billed_units.input_tokens")
