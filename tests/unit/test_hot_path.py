"""The lean per-document code gives exactly what the plain code it replaced gave.

Each reference below is the straightforward version (one object, one check, one
encode per document); the service's version takes shortcuts over whole columns.
Hypothesis drives both with the same inputs, derandomized.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.servicer import to_proto
from rerank_service.backends.upstream.dialect import MalformedResponse, parse_results
from rerank_service.core.chunking import CallLimits, split
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    RankedDocument,
    RerankOutcome,
    RerankRequest,
    ScoredDocument,
)
from rerank_service.core.engine import merge, rank

_REPRODUCIBLE = settings(
    derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- references: the plain code -----------------------------------------------------------------


def reference_split(query: str, documents: list[str], limits: CallLimits) -> list[range]:
    def estimate(text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / 3)

    count = len(documents)
    max_docs = limits.max_documents or count
    if limits.max_tokens is None:
        if count <= max_docs:
            return [range(count)]
        size = math.ceil(count / math.ceil(count / max_docs))
        return [range(start, min(start + size, count)) for start in range(0, count, size)]
    max_tokens = limits.max_tokens
    query_cost = min(estimate(query), limits.max_item_tokens)
    costs = [query_cost + min(estimate(document), limits.max_item_tokens) for document in documents]

    def fits(start: int, end: int) -> bool:
        return end - start == 1 or (end - start <= max_docs and sum(costs[start:end]) <= max_tokens)

    def fewest(start: int) -> int:  # chunks documents[start:] take, each filled in turn
        chunks = 0
        while start < count:
            end = start + 1
            while end < count and fits(start, end + 1):
                end += 1
            chunks, start = chunks + 1, end
        return chunks

    total = fewest(0)
    if total <= 1:
        return [range(count)]
    per_chunk = math.ceil(count / total) if total == math.ceil(count / max_docs) else None
    chunks: list[range] = []
    start = 0
    for left in range(total, 1, -1):
        if per_chunk is not None:
            aim = start + per_chunk
        else:  # take each document whose middle is within the chunk's share of the tokens left
            share = Fraction(sum(costs[start:]), left)
            aim, tokens = start, 0
            while aim < count and tokens + Fraction(costs[aim], 2) <= share:
                aim, tokens = aim + 1, tokens + costs[aim]
        ends = [end for end in range(start + 1, count) if fits(start, end) and fewest(end) <= left - 1]
        end = min(max(aim, ends[0]), ends[-1])
        chunks.append(range(start, end))
        start = end
    chunks.append(range(start, count))
    return chunks


def reference_parse(items: list[Any], document_count: int) -> list[ScoredDocument]:
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


def reference_rank(result: BackendResult, request: RerankRequest) -> list[RankedDocument]:
    ordered = sorted(result.scores, key=lambda scored: (-scored.score, scored.index))
    if request.top_n is not None:
        ordered = ordered[: request.top_n]
    return [
        RankedDocument(
            index=scored.index,
            score=scored.score,
            text=request.documents[scored.index] if request.return_documents else None,
        )
        for scored in ordered
    ]


def reference_to_proto(outcome: RerankOutcome, request_id: str) -> rerank_pb2.RerankResponse:
    return rerank_pb2.RerankResponse(
        request_id=request_id,
        output=rerank_pb2.RerankOutput(
            results=[
                rerank_pb2.RerankResult(
                    index=ranked.index,
                    relevance_score=ranked.score,
                    document=rerank_pb2.RerankDocument(text=ranked.text) if ranked.text is not None else None,
                    chunks=ranked.chunks,
                )
                for ranked in outcome.results
            ]
        ),
        usage=rerank_pb2.RerankUsage(total_tokens=outcome.total_tokens),
    )


# --- split ----------------------------------------------------------------------------------------

TEXTS = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=400),  # ASCII
    st.text(max_size=200),  # any plane
    st.builds(lambda n: "x" * n, st.integers(0, 40_000)),  # long ASCII
    st.builds(lambda n: "文" * n, st.integers(0, 15_000)),  # long, 3 bytes a character
)
LIMITS = st.builds(
    CallLimits,
    max_documents=st.one_of(st.none(), st.integers(1, 60)),
    max_tokens=st.one_of(st.none(), st.integers(1, 60_000)),
    max_item_tokens=st.integers(1, 5000),
)


@_REPRODUCIBLE
@given(query=TEXTS, documents=st.lists(TEXTS, max_size=60), limits=LIMITS)
def test_split_gives_the_chunks_of_counting_every_document(
    query: str, documents: list[str], limits: CallLimits
) -> None:
    assert split(query, documents, limits) == reference_split(query, documents, limits)


@pytest.mark.parametrize("max_tokens", [8_999, 9_000, 9_001, 10_000, 20_000])
def test_split_at_the_edge_of_the_one_call_bound(max_tokens: int) -> None:
    # 100 documents of 89 ASCII bytes (30 tokens each, and the query 60): 9,000 in all.
    documents, query = ["y" * 89] * 100, "q" * 180
    limits = CallLimits(max_documents=500, max_tokens=max_tokens)
    assert split(query, documents, limits) == reference_split(query, documents, limits)


# --- parse_results -----------------------------------------------------------------------------

SCORES = st.one_of(
    st.floats(0.0, 1.0),
    st.sampled_from([0, 1, 0.0, -0.0, 1.0, 2, -1, 1.0001, -0.0001, True, False, None, "0.5"]),
    st.sampled_from([math.inf, -math.inf, math.nan]),
)
INDEXES = st.one_of(st.integers(-2, 12), st.sampled_from([True, False, None, 1.0, "1", 2**70]))


@st.composite
def answers(draw: st.DrawFn) -> tuple[list[Any], int]:
    """Mostly well-formed `results` arrays (a permutation, scores in [0, 1]), some broken."""
    count = draw(st.integers(1, 12))
    indexes: list[Any] = draw(st.permutations(range(count)))
    scores: list[Any] = draw(st.lists(st.floats(0.0, 1.0), min_size=count, max_size=count))
    items: list[Any] = [{"index": i, "relevance_score": s} for i, s in zip(indexes, scores, strict=True)]
    for _ in range(draw(st.integers(0, 2))):  # break a few
        position = draw(st.integers(0, count - 1))
        fault = draw(st.sampled_from(["index", "score", "drop index", "drop score", "item"]))
        if not isinstance(items[position], dict):  # already replaced by a non-object: leave it
            continue
        if fault == "index":
            items[position]["index"] = draw(INDEXES)
        elif fault == "score":
            items[position]["relevance_score"] = draw(SCORES)
        elif fault == "drop index":
            items[position].pop("index", None)
        elif fault == "drop score":
            items[position].pop("relevance_score", None)
        else:
            items[position] = draw(st.sampled_from([None, [], "x", 3, [1, 0.5]]))
    return items, count


@_REPRODUCIBLE
@given(answer=answers())
def test_parse_results_accepts_and_refuses_as_the_item_by_item_check(answer: tuple[list[Any], int]) -> None:
    items, count = answer
    request = BackendRequest("m", "q", ["d"] * count, None, None)
    try:
        expected: list[ScoredDocument] | str = reference_parse(items, count)
    except MalformedResponse as exc:
        expected = str(exc)
    try:
        got: list[ScoredDocument] | str = parse_results(items, request)
    except MalformedResponse as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, list):
        assert all(type(scored.score) is float for scored in got)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_nan_score_anywhere_is_refused(position: int) -> None:
    items = [{"index": i, "relevance_score": 0.5} for i in range(3)]
    items[position]["relevance_score"] = math.nan
    with pytest.raises(MalformedResponse, match=rf"results\[{position}\]\.relevance_score nan"):
        parse_results(items, BackendRequest("m", "q", ["d"] * 3, None, None))


# --- rank and merge -----------------------------------------------------------------------------


@_REPRODUCIBLE
@given(
    scores=st.lists(st.sampled_from([0.0, -0.0, 0.1, 0.5, 0.5000001, 1.0]) | st.floats(0, 1), max_size=40),
    top_n=st.one_of(st.none(), st.integers(1, 50)),
    return_documents=st.booleans(),
    seed=st.randoms(use_true_random=False),
)
def test_rank_orders_by_score_then_index(
    scores: list[float], top_n: int | None, return_documents: bool, seed: Any
) -> None:
    scored = [ScoredDocument(index, score) for index, score in enumerate(scores)]
    seed.shuffle(scored)  # backends answer in any order
    request = RerankRequest("m", "q", [f"d{i}" for i in range(len(scores))], top_n, None, return_documents)
    result = BackendResult(scores=scored, total_tokens=1)
    assert rank(result, request) == reference_rank(result, request)


def test_merge_moves_each_chunks_indexes_back_into_the_callers_list() -> None:
    results = [
        BackendResult([ScoredDocument(1, 0.2), ScoredDocument(0, 0.9)], 3, "a"),
        BackendResult([ScoredDocument(0, 0.4), ScoredDocument(1, 0.1)], 4, "b"),
        BackendResult([ScoredDocument(0, 0.7)], 5, "c"),
    ]
    merged = merge(results, [range(0, 2), range(2, 4), range(4, 5)])
    assert merged.scores == [
        ScoredDocument(1, 0.2),
        ScoredDocument(0, 0.9),
        ScoredDocument(2, 0.4),
        ScoredDocument(3, 0.1),
        ScoredDocument(4, 0.7),
    ]
    assert merged.total_tokens == 12


# --- to_proto -----------------------------------------------------------------------------------

BOUNDARY_INDEXES = [0, 1, 127, 128, 16_383, 16_384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**31 - 1]


@_REPRODUCIBLE
@given(
    results=st.lists(
        st.builds(
            RankedDocument,
            index=st.one_of(st.integers(0, 20_000), st.sampled_from(BOUNDARY_INDEXES)),
            score=st.one_of(st.floats(0, 1), st.sampled_from([0.0, -0.0, 1.0, 5e-324])),
            text=st.none(),
        ),
        max_size=80,  # below and above the count where the wire format starts
    ),
    texts=st.one_of(st.none(), st.sampled_from(["", "text", "文本"])),
    total_tokens=st.integers(0, 2**31 - 1),
)
def test_to_proto_gives_the_message_and_bytes_of_building_each_result(
    results: list[RankedDocument], texts: str | None, total_tokens: int
) -> None:
    if texts is not None:
        results = [RankedDocument(r.index, r.score, texts) for r in results]
    outcome = RerankOutcome(results, total_tokens)
    got, expected = to_proto(outcome, "req-1"), reference_to_proto(outcome, "req-1")
    assert got == expected
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert got.HasField("output")
    assert got.HasField("usage")


@pytest.mark.parametrize("count", [1, 31, 32, 500])
@pytest.mark.parametrize("index", BOUNDARY_INDEXES)
def test_to_proto_keeps_every_index_and_score(index: int, count: int) -> None:
    ranked = [RankedDocument(index, 0.25)] + [RankedDocument(i, i / count) for i in range(1, count)]
    response = to_proto(RerankOutcome(ranked, 7), "r")
    assert [(r.index, r.relevance_score) for r in response.output.results] == [
        (r.index, r.score) for r in ranked
    ]
    assert not any(r.HasField("document") for r in response.output.results)
    assert response == reference_to_proto(RerankOutcome(ranked, 7), "r")
