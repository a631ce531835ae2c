"""Splitting a request into chunks that fit one backend call."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rerank_service.core.chunking import CallLimits, FanOut, estimate_tokens, fan_out, split


def sizes(chunks: list[range]) -> list[int]:
    return [len(chunk) for chunk in chunks]


def test_a_request_within_the_limits_is_one_chunk() -> None:
    assert split("q", ["d"] * 500, CallLimits(max_documents=500)) == [range(500)]


def test_no_limits_means_one_chunk() -> None:
    assert split("q", ["d"] * 20_000, CallLimits()) == [range(20_000)]


def test_chunks_are_balanced_consecutive_and_cover_every_document() -> None:
    chunks = split("q", ["d"] * 1234, CallLimits(max_documents=500))

    assert sizes(chunks) == [412, 412, 410]
    assert [i for chunk in chunks for i in chunk] == list(range(1234))


@pytest.mark.parametrize("count", [1, 499, 500, 501, 999, 1000, 1001, 10_000])
def test_no_chunk_exceeds_the_document_limit(count: int) -> None:
    chunks = split("q", ["d"] * count, CallLimits(max_documents=500))

    assert all(0 < len(chunk) <= 500 for chunk in chunks)
    assert sum(sizes(chunks)) == count
    assert len(chunks) == -(-count // 500)  # the fewest chunks that fit


def test_the_token_budget_splits_long_documents_sooner() -> None:
    document = "x" * 3000  # about 1,000 estimated tokens
    chunks = split("q", [document] * 50, CallLimits(max_documents=500, max_tokens=10_000))

    assert all(len(chunk) * (estimate_tokens(document) + 1) <= 10_000 for chunk in chunks)
    assert sum(sizes(chunks)) == 50
    assert len(chunks) == 6


def test_the_query_is_counted_once_per_document() -> None:
    query = "q" * 300  # 100 tokens
    chunks = split(query, ["d" * 3] * 100, CallLimits(max_documents=500, max_tokens=1010))

    assert max(sizes(chunks)) == 10  # 10 x (100 + 1) = 1010 tokens


def test_items_are_counted_at_most_the_per_item_truncation() -> None:
    huge = "x" * 300_000  # 100,000 estimated tokens, truncated upstream to 4,000
    chunks = split("q", [huge] * 58, CallLimits(max_documents=500, max_tokens=120_000))

    assert sizes(chunks) == [29, 29]  # 29 x 4,001 fits in 120,000, 30 x 4,001 does not


def test_a_single_document_over_the_budget_still_gets_a_chunk() -> None:
    chunks = split("q", ["x" * 30_000, "y"], CallLimits(max_documents=500, max_tokens=100))

    assert sizes(chunks) == [1, 1]


def test_a_split_the_token_budget_forces_is_balanced() -> None:
    # 120 documents of about 1,000 tokens: 119 fit in 120,000 tokens, but 119 + 1 would
    # make one chunk the call's whole latency.
    documents = ["x" * 2997 + f"{i:03d}" for i in range(120)]

    assert sizes(split("q", documents, CallLimits(max_documents=500, max_tokens=120_000))) == [60, 60]
    assert sizes(split("q", documents[:30], CallLimits(max_documents=500, max_tokens=30_000))) == [15, 15]
    assert sizes(split("q", documents * 2, CallLimits(max_documents=500, max_tokens=120_000))) == [80, 80, 80]


def test_a_token_split_balances_tokens_not_documents() -> None:
    # 40 documents of 4,001 tokens (the query's 1 and 4,000), then 200 of 101: 180,240
    # tokens in 120,000-token calls. 120 + 120 documents would not fit.
    documents = ["x" * 12_000] * 40 + ["d" * 300] * 200
    limits = CallLimits(max_documents=500, max_tokens=120_000)
    chunks = split("q", documents, limits)
    tokens = [sum(1 + estimate_tokens(documents[i]) for i in chunk) for chunk in chunks]

    assert len(chunks) == 2
    assert all(count <= 120_000 for count in tokens)
    assert max(tokens) - min(tokens) <= 4001  # within one document of an even share


def test_documents_of_uneven_sizes_still_fit_the_limits() -> None:
    documents = ["x" * (300 * (i % 7) + 3 * i) for i in range(300)]
    limits = CallLimits(max_documents=40, max_tokens=20_000)
    chunks = split("q" * 30, documents, limits)

    assert [i for chunk in chunks for i in chunk] == list(range(300))
    assert all(len(chunk) <= 40 for chunk in chunks)
    assert all(sum(10 + estimate_tokens(documents[i]) for i in chunk) <= 20_000 for chunk in chunks)
    assert len(chunks) == greedy_count(costs("q" * 30, documents, limits), limits)


def test_a_split_the_document_limit_forces_is_unchanged_by_a_token_budget() -> None:
    limits = CallLimits(max_documents=500, max_tokens=120_000)

    assert sizes(split("q", ["d"] * 1234, limits)) == [412, 412, 410]
    assert sizes(split("q", ["d" * 300] * 1000, limits)) == [500, 500]  # 100,500 tokens each


def costs(query: str, documents: list[str], limits: CallLimits) -> list[int]:
    def cost(text: str) -> int:
        return min(estimate_tokens(text), limits.max_item_tokens)

    return [cost(query) + cost(document) for document in documents]


def greedy_count(costs: list[int], limits: CallLimits) -> int:
    """The chunks of filling each as far as the limits let it: the fewest that fit."""
    max_docs = limits.max_documents or len(costs)
    chunks, size, tokens = 0, 0, 0
    for cost in costs:
        if (
            not chunks
            or size == max_docs
            or (limits.max_tokens is not None and tokens + cost > limits.max_tokens)
        ):
            chunks, size, tokens = chunks + 1, 0, 0
        size, tokens = size + 1, tokens + cost
    return max(chunks, 1)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(
    query=st.integers(0, 3000),
    lengths=st.lists(st.one_of(st.integers(0, 300), st.integers(0, 15_000)), max_size=80),
    max_documents=st.one_of(st.none(), st.integers(1, 30)),
    max_tokens=st.one_of(st.none(), st.integers(1, 40_000)),
    max_item_tokens=st.integers(1, 5000),
)
def test_every_chunk_fits_in_order_and_as_few_as_greedy_filling(
    query: int, lengths: list[int], max_documents: int | None, max_tokens: int | None, max_item_tokens: int
) -> None:
    documents = ["x" * length for length in lengths]
    limits = CallLimits(max_documents=max_documents, max_tokens=max_tokens, max_item_tokens=max_item_tokens)
    chunks = split("q" * query, documents, limits)
    document_costs = costs("q" * query, documents, limits)

    assert [i for chunk in chunks for i in chunk] == list(range(len(documents)))
    assert all(chunk for chunk in chunks) or chunks == [range(0)]
    for chunk in chunks:
        assert max_documents is None or len(chunk) <= max_documents
        # A single document over the budget still gets its own chunk.
        assert max_tokens is None or len(chunk) == 1 or sum(document_costs[i] for i in chunk) <= max_tokens
    assert len(chunks) == greedy_count(document_costs, limits)


def test_tokens_are_estimated_from_utf8_bytes() -> None:
    assert estimate_tokens("abc") == 1
    assert estimate_tokens("文本排序") == 4  # one token per CJK character


def test_the_estimate_is_one_token_per_3_bytes_rounded_up() -> None:
    # What max_query_tokens means where no tokenizer is known: 4,000 tokens are 12,000 bytes.
    assert estimate_tokens("a" * 12_000) == 4000
    assert estimate_tokens("a" * 12_001) == 4001
    assert estimate_tokens("é" * 6000) == 4000  # two bytes a character


def test_fan_out_counts_the_query_and_instruct_once_per_request_and_each_document_once() -> None:
    documents = ["ab", "文本", "c"]  # 2 + 6 + 1 bytes

    assert fan_out("q" * 100, None, documents, requests=1) == FanOut(call_bytes=109, upstream_bytes=109)
    assert fan_out("q" * 100, None, documents, requests=3) == FanOut(call_bytes=109, upstream_bytes=309)
    assert fan_out("q" * 100, "i" * 20, documents, requests=3) == FanOut(call_bytes=129, upstream_bytes=369)
