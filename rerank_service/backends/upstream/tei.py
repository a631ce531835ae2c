"""Hugging Face text-embeddings-inference (TEI) /rerank.

Request:  {query, texts, truncate: true, raw_scores: false, return_text: false}
Response: [{index, score}] for every text, best first (TEI has no top_n: the service cuts)
Errors:   {error, error_type}

TEI serves one model (no `model` field) and reports no usage: the backend estimates it.
It takes at most its --max-client-batch-size texts a call (32 unless its operator says).
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    DialectOptions,
    MalformedResponse,
    UpstreamAnswer,
    UpstreamErrorBody,
    parse_message_error,
    parse_results,
    score_shape,
)
from rerank_service.core.domain import BackendRequest
from rerank_service.core.qwen3_prompt import upstream_strings


class TextEmbeddingsInference:
    name = "tei"
    path = "/rerank"
    documents_per_call = 32  # TEI's default --max-client-batch-size

    def __init__(self, options: DialectOptions | None = None) -> None:
        options = options or DialectOptions()
        self._template = options.prompt_template == "qwen3"
        self.honours_instruct = self._template
        self._shape = score_shape(options, "answer", "score", honours_top_n=False)

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        query, texts = (
            upstream_strings(request.query, request.documents, request.instruct)
            if self._template
            else (request.query, request.documents)
        )
        # raw_scores false: TEI applies the model's activation, so scores are in [0, 1].
        return {"query": query, "texts": texts, "truncate": True, "raw_scores": False, "return_text": False}

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        if not isinstance(body, list):
            raise MalformedResponse("the body is not a JSON list")
        return UpstreamAnswer(
            scores=parse_results(body, request, self._shape), total_tokens=None, request_id=None
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_message_error(body)
