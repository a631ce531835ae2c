"""Splitting a request into chunks that fit one backend call."""

from __future__ import annotations

import pytest

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
    chunks = split("q", [huge] * 40, CallLimits(max_documents=500, max_tokens=120_000))

    assert max(sizes(chunks)) == 29  # 29 x 4,001 fits in 120,000, 30 x 4,001 does not


def test_a_single_document_over_the_budget_still_gets_a_chunk() -> None:
    chunks = split("q", ["x" * 30_000, "y"], CallLimits(max_documents=500, max_tokens=100))

    assert sizes(chunks) == [1, 1]


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
