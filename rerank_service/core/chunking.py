"""Split a request's documents into chunks that fit one backend call.

The hosted API takes at most 500 documents and about 120,000 tokens per call, where
a call costs query tokens x documents + document tokens, each item truncated at
4,000 tokens. Without the upstream's tokenizer, tokens are estimated from UTF-8
bytes / 3: about one token per CJK character (3 bytes) and an over-estimate for
English (about 4 characters a token), so chunks err on the small side.

Counting bytes is cheap: an ASCII string's UTF-8 size is its length (and
`str.isascii` is O(1) in CPython), so only other strings are encoded; and a call that
provably fits in one chunk is not counted document by document at all.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, filterfalse
from typing import NamedTuple

from rerank_service.core.domain import LongDocuments
from rerank_service.core.token_window import TokenWindow


@dataclass(frozen=True, slots=True)
class CallLimits:
    """What one backend call takes; None is no limit."""

    max_documents: int | None = None
    max_tokens: int | None = None
    # The upstream truncates each query and document at this many tokens.
    max_item_tokens: int = 4000
    # Most query tokens, estimated (`estimate_tokens`): for a backend without the model's
    # tokenizer (an upstream). None: not estimated (a local model counts with its own).
    max_query_tokens: int | None = None
    # Long documents (core/long_documents.py): the deployment's window for one document
    # (None: unknown, documents are sent as they are), and the route's defaults.
    window: TokenWindow | None = None
    long_documents: LongDocuments = LongDocuments.TRUNCATE
    max_tokens_per_doc: int | None = None


def text_bytes(text: str) -> int:
    """A text's UTF-8 size; an ASCII string's is its length, with nothing encoded."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def estimate_tokens(text: str) -> int:
    """Tokens where no tokenizer is known: one per 3 bytes of UTF-8, rounded up."""
    return -(-text_bytes(text) // 3)  # ceil(size / 3), in integers


class FanOut(NamedTuple):
    """The text bytes a call carries, and those its upstream requests carry together."""

    call_bytes: int
    upstream_bytes: int


def fan_out(query: str, instruct: str | None, documents: Sequence[str], requests: int) -> FanOut:
    """What a call split into `requests` sends: the query and instruct go with every
    request, each document with one."""
    shared = text_bytes(query) + (text_bytes(instruct) if instruct else 0)
    documents_bytes = sum(map(text_bytes, documents))
    return FanOut(shared + documents_bytes, requests * shared + documents_bytes)


def _item_tokens(text: str, cap: int) -> int:
    """min(estimate_tokens(text), cap); a text of 3 x cap characters or more is over it
    whatever its bytes (UTF-8 takes at least one byte a character)."""
    return cap if len(text) >= 3 * cap else min(estimate_tokens(text), cap)


def _fits_one_call(query_tokens: int, documents: Sequence[str], max_tokens: int) -> bool:
    """Whether every document together provably fits in `max_tokens`, from an upper bound.

    Each document costs query_tokens + min(ceil(bytes / 3), cap) <= query_tokens +
    (bytes + 2) / 3, so the call costs at most n x query_tokens + (B + 2n) / 3, with B
    the documents' UTF-8 bytes or more: an ASCII string's bytes are its length, any
    other's at most 4 a character. Only when this bound is over the budget are the
    documents counted one by one (which may still find that they fit).
    """
    count = len(documents)
    characters = sum(map(len, documents))
    wide = sum(map(len, filterfalse(str.isascii, documents)))  # characters of non-ASCII texts
    upper_bytes = characters + 3 * wide
    return count * query_tokens + (upper_bytes + 2 * count) // 3 <= max_tokens


def split(query: str, documents: Sequence[str], limits: CallLimits) -> list[range]:
    """Consecutive index ranges covering `documents`, each within `limits`.

    As few chunks as fit, balanced because the slowest chunk sets the call's latency:
    1,234 documents at 500 a call give 412 + 412 + 410, not 500 + 500 + 234; 120 documents
    of about 1,000 tokens at 120,000 tokens a call give 60 + 60, not 119 + 1.
    """
    count = len(documents)
    max_docs = limits.max_documents or count
    max_tokens = limits.max_tokens
    if max_tokens is None:
        if count <= max_docs:
            return [range(count)]
        size = math.ceil(count / math.ceil(count / max_docs))
        return [range(start, min(start + size, count)) for start in range(0, count, size)]
    query_cost = _item_tokens(query, limits.max_item_tokens)
    if count <= max_docs and _fits_one_call(query_cost, documents, max_tokens):
        return [range(count)]  # what counting each document finds, without counting them
    cap = limits.max_item_tokens
    # prefix[i]: the tokens of documents[:i], each costing the query's tokens and its own.
    prefix = list(accumulate((query_cost + _item_tokens(document, cap) for document in documents), initial=0))
    if count <= max_docs and prefix[count] <= max_tokens:
        return [range(count)]
    # The fewest chunks: each as long as the limits let it be, from the left.
    fewest, start = 0, 0
    while start < count:
        fewest, start = fewest + 1, _longest_end(prefix, start, max_docs, max_tokens)
    # lows[m]: the first index from which the documents left fit in m chunks (the same,
    # from the right). A chunk may end anywhere from there to its longest end: what is
    # left still fits in the chunks left (greedy is optimal, a shorter chunk still fits).
    lows = [count]
    for _ in range(fewest - 1):
        lows.append(_earliest_start(prefix, lows[-1], max_docs, max_tokens))
    # Split by the documents' count where it needs as many chunks (412 + 412 + 410), else
    # by tokens: each chunk ends nearest an equal share of the tokens left.
    per_chunk = math.ceil(count / fewest) if fewest == math.ceil(count / max_docs) else None
    chunks: list[range] = []
    start = 0
    for left in range(fewest, 1, -1):  # chunks left, this one included
        end = start + per_chunk if per_chunk is not None else _nearest_share(prefix, start, left)
        end = min(max(end, lows[left - 1], start + 1), _longest_end(prefix, start, max_docs, max_tokens))
        chunks.append(range(start, end))
        start = end
    chunks.append(range(start, count))
    return chunks


def _longest_end(prefix: list[int], start: int, max_docs: int, max_tokens: int) -> int:
    """Where the longest chunk from `start` within the limits ends (one document at least)."""
    stop = min(len(prefix) - 1, start + max_docs)
    return max(bisect_right(prefix, prefix[start] + max_tokens, start + 1, stop + 1) - 1, start + 1)


def _earliest_start(prefix: list[int], end: int, max_docs: int, max_tokens: int) -> int:
    """Where the longest chunk to `end` within the limits starts (one document at least)."""
    return min(bisect_left(prefix, prefix[end] - max_tokens, max(0, end - max_docs), end), end - 1)


def _nearest_share(prefix: list[int], start: int, left: int) -> int:
    """The end nearest 1/`left` of the tokens from `start` (taking a document that lands
    it as far past that share as short of it)."""
    count = len(prefix) - 1
    remaining = prefix[count] - prefix[start]
    # The first end past the share, then whether its last document is nearer in or out.
    end = bisect_right(prefix, prefix[start] + remaining // left, start + 1)
    if end > count:
        return count
    midpoint = prefix[end - 1] + prefix[end]  # twice its last document's middle
    return end if left * midpoint <= 2 * (left * prefix[start] + remaining) else end - 1
