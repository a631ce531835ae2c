"""The fixed payloads of the performance benchmark (`bench.perf`), shared by its parts.

One request per document count (a corpus query and that many corpus documents), the
DashScope-native JSON body the service sends upstream for it, and the static JSON
answer every fake upstream gives (one result per document, best first), so the
service, the baselines and the direct client all move the same bytes.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from rerank.v1 import rerank_pb2

from bench.corpus import documents, queries

MODEL = "qwen3-rerank"
RERANK_PATH = "/api/v1/services/rerank/text-rerank/text-rerank"
COHERE_PATH = "/v1/rerank"
UPSTREAM_KEY = "bench-upstream-key"


def http_client_library() -> Any:
    """The httpx-compatible module the HTTP baselines use: httpx, or BENCH_HTTPX's (httpx2)."""
    return importlib.import_module(os.environ.get("BENCH_HTTPX") or "httpx")


def request(count: int) -> rerank_pb2.RerankRequest:
    """The gRPC request every run sends: one query, `count` documents."""
    return rerank_pb2.RerankRequest(model=MODEL, query=queries(1)[0], documents=documents(count))


def upstream_request(message: rerank_pb2.RerankRequest) -> dict[str, Any]:
    """The DashScope-native body the service sends upstream for `message`."""
    return {
        "model": message.model,
        "input": {"query": message.query, "documents": list(message.documents)},
        "parameters": {"return_documents": False},
    }


def upstream_body(count: int) -> bytes:
    """The JSON the service sends upstream for `request(count)` (DashScope native)."""
    return json.dumps(upstream_request(request(count)), ensure_ascii=False).encode()


def _scores(count: int) -> list[tuple[int, float]]:
    # Distinct scores in (0, 1], best first; indexes shuffled deterministically so the
    # service's sort does real work.
    step = 7 if count % 7 else 11
    return [((i * step) % count, round(1.0 - i / (count + 1), 6)) for i in range(count)]


def upstream_answer(count: int) -> bytes:
    """The static upstream answer for `count` documents: DashScope native, compact."""
    body: dict[str, Any] = {
        "output": {"results": [{"index": i, "relevance_score": s} for i, s in _scores(count)]},
        "usage": {"total_tokens": 40 * count},
        "request_id": f"bench-{count}-0000-0000-000000000000",
    }
    return json.dumps(body, separators=(",", ":")).encode()


def cohere_answer(count: int) -> bytes:
    """The same answer in the Cohere-compatible format, as vLLM sends it (with usage)."""
    body: dict[str, Any] = {
        "id": f"bench-{count}-0000-0000-000000000000",
        "model": MODEL,
        "usage": {"total_tokens": 40 * count},
        "results": [{"index": i, "relevance_score": s} for i, s in _scores(count)],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def canned_response(count: int) -> rerank_pb2.RerankResponse:
    """What the service answers for `request(count)`, built once for the canned baseline."""
    return response_from(json.loads(upstream_answer(count)))


def response_from(answer: dict[str, Any]) -> rerank_pb2.RerankResponse:
    """The gRPC answer built from a decoded DashScope-native upstream answer."""
    return rerank_pb2.RerankResponse(
        request_id=answer["request_id"],
        output=rerank_pb2.RerankOutput(
            results=[
                rerank_pb2.RerankResult(index=item["index"], relevance_score=item["relevance_score"])
                for item in answer["output"]["results"]
            ]
        ),
        usage=rerank_pb2.RerankUsage(total_tokens=answer["usage"]["total_tokens"]),
    )
