"""Hugging Face text-embeddings-inference (TEI) /rerank.

Request:  {query, texts, truncate: true, raw_scores: false, return_text: false}
          (raw_scores true under --upstream-score-transform sigmoid: the service applies it)
Response: [{index, score}] for every text, best first (TEI has no top_n: the service cuts)
Errors:   {error, error_type}: 413 Validation, 422 Tokenizer, 400 Empty, 429 Overloaded,
          503 Unhealthy, and 424 Backend when inference fails (errors.py: a server fault)

TEI serves one model (no `model` field) and reports no usage: the backend estimates it.
It takes at most its --max-client-batch-size texts a call (32 unless its operator says).
"""

from __future__ import annotations

from typing import Any

from rerank_service.backends.upstream.dialect import (
    MalformedResponse,
    TemplatedDialect,
    UpstreamAnswer,
    UpstreamErrorBody,
    parse_message_error,
    parse_results,
)
from rerank_service.core.domain import BackendRequest


class TextEmbeddingsInference(TemplatedDialect):
    name = "tei"
    path = "/rerank"
    documents_per_call = 32  # TEI's default --max-client-batch-size
    list_name = "answer"  # the body is the list: what error messages call it
    score_name = "score"
    honours_top_n = False

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        query, texts = self.strings(request)
        # raw_scores false: TEI applies the model's activation, so scores are in [0, 1]. TEI
        # has no setting of its own for raw scores: they are asked for per request, so under
        # the sigmoid transform they are, or the activation would be applied twice.
        raw = self.options.score_transform == "sigmoid"
        return {"query": query, "texts": texts, "truncate": True, "raw_scores": raw, "return_text": False}

    def parse_answer(self, body: Any, request: BackendRequest) -> UpstreamAnswer:
        if not isinstance(body, list):
            raise MalformedResponse("the body is not a JSON list")
        return UpstreamAnswer(
            scores=parse_results(body, request, self._shape), total_tokens=None, request_id=None
        )

    def parse_error(self, body: Any) -> UpstreamErrorBody:
        return parse_message_error(body)
