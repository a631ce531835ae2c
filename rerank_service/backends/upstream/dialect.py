"""What a wire dialect of a rerank HTTP API must provide, and the parsing they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol

from rerank_service.core.domain import BackendRequest, BackendResult, ScoredDocument


class MalformedResponse(Exception):
    """The upstream answered 2xx with a body that breaks its own contract."""


@dataclass(frozen=True, slots=True)
class UpstreamErrorBody:
    """The interesting parts of an upstream error body, whatever its dialect."""

    code: str | None = None
    message: str | None = None
    request_id: str | None = None


class Dialect(Protocol):
    """One wire format of a rerank HTTP API."""

    name: str
    # Path of the rerank endpoint, appended to the configured base URL.
    path: str

    def build_body(self, request: BackendRequest) -> dict[str, Any]:
        """The JSON request body."""
        ...

    def parse_result(self, body: Any, request: BackendRequest) -> BackendResult:
        """Turn a 2xx JSON body into a result; raise MalformedResponse if it is wrong."""
        ...


_INDEX, _SCORE = itemgetter("index"), itemgetter("relevance_score")
_INT: frozenset[type] = frozenset({int})
_FLOAT: frozenset[type] = frozenset({float})
_NUMBER: frozenset[type] = frozenset({int, float})


def parse_results(items: Any, request: BackendRequest) -> list[ScoredDocument]:
    """Check and convert a `results` array: indexes in range and unique, scores in [0, 1],
    one result per document (or per top_n when the request asked for fewer).

    The checks run over whole columns in C (types, min and max, a set for duplicates, a
    sum that is NaN if any score is); only an answer that fails one is walked item by
    item, to say what is wrong with which result.
    """
    document_count = len(request.documents)
    expected = document_count if request.top_n is None else min(request.top_n, document_count)
    if not isinstance(items, list):
        raise MalformedResponse("'results' is missing or not a list")
    if len(items) != expected:
        raise MalformedResponse(f"expected {expected} results, got {len(items)}")
    if not items:
        return []
    try:
        indexes = list(map(_INDEX, items))
        scores = list(map(_SCORE, items))
    except (KeyError, TypeError):  # an item that is not an object, or lacks a field
        return _check_each(items, document_count)
    score_types = set(map(type, scores))
    if not (
        set(map(type, indexes)) == _INT  # not bool, not float
        and min(indexes) >= 0
        and max(indexes) < document_count
        and len(set(indexes)) == len(indexes)
        and score_types <= _NUMBER
        and min(scores) >= 0.0
        and max(scores) <= 1.0
        and not math.isnan(sum(scores))  # min and max can step over a NaN
    ):
        return _check_each(items, document_count)
    if score_types != _FLOAT:
        scores = list(map(float, scores))
    return list(map(ScoredDocument, indexes, scores))


def _check_each(items: list[Any], document_count: int) -> list[ScoredDocument]:
    """The item-by-item check: raises MalformedResponse naming the first wrong result."""
    seen: set[int] = set()
    scores: list[ScoredDocument] = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise MalformedResponse(f"results[{position}] is not an object")
        index, score = item.get("index"), item.get("relevance_score")
        if not isinstance(index, int) or isinstance(index, bool):
            raise MalformedResponse(f"results[{position}].index is missing or not an integer")
        if not 0 <= index < document_count:
            raise MalformedResponse(
                f"results[{position}].index {index} is out of range for {document_count} documents"
            )
        if index in seen:
            raise MalformedResponse(f"results[{position}].index {index} appears twice")
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise MalformedResponse(f"results[{position}].relevance_score is missing or not a number")
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise MalformedResponse(f"results[{position}].relevance_score {score} is outside [0, 1]")
        seen.add(index)
        scores.append(ScoredDocument(index=index, score=float(score)))
    return scores


def parse_total_tokens(usage: Any) -> int:
    """`usage.total_tokens` as a non-negative int."""
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise MalformedResponse("'usage.total_tokens' is missing or not a non-negative integer")
    return tokens


def optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_error_body(body: Any) -> UpstreamErrorBody:
    """Read `{code, message, request_id}` (DashScope) or `{error: {code, message}}` (OpenAI style)."""
    if not isinstance(body, dict):
        return UpstreamErrorBody()
    nested = body.get("error")
    source = nested if isinstance(nested, dict) else body
    code = source.get("code")
    if code in (None, ""):
        code = source.get("type")  # OpenAI-style bodies often send "code": null
    return UpstreamErrorBody(
        code=str(code) if code not in (None, "") else None,
        message=optional_str(source.get("message")),
        request_id=optional_str(body.get("request_id")) or optional_str(body.get("id")),
    )
