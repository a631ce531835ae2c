"""Split a request's documents into chunks that fit one backend call.

The hosted API takes at most 500 documents and about 120,000 tokens per call, where
a call costs query tokens x documents + document tokens, each item truncated at
4,000 tokens. Without the upstream's tokenizer, tokens are estimated from UTF-8
bytes / 3: about one token per CJK character (3 bytes) and an over-estimate for
English (about 4 characters a token), so chunks err on the small side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallLimits:
    """What one backend call takes; None is no limit."""

    max_documents: int | None = None
    max_tokens: int | None = None
    # The upstream truncates each query and document at this many tokens.
    max_item_tokens: int = 4000


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / 3)


def split(query: str, documents: Sequence[str], limits: CallLimits) -> list[range]:
    """Consecutive index ranges covering `documents`, each within `limits`.

    Chunks are balanced (1,234 documents at 500 a call give 412 + 412 + 410, not
    500 + 500 + 234) because the slowest chunk sets the call's latency.
    """
    count = len(documents)
    max_docs = limits.max_documents or count
    if limits.max_tokens is None and count <= max_docs:
        return [range(count)]
    target = math.ceil(count / math.ceil(count / max_docs)) if count else 0
    query_cost = min(estimate_tokens(query), limits.max_item_tokens)
    chunks: list[range] = []
    start, tokens = 0, 0
    for index, document in enumerate(documents):
        cost = query_cost + min(estimate_tokens(document), limits.max_item_tokens)
        size = index - start
        over_tokens = limits.max_tokens is not None and tokens + cost > limits.max_tokens
        if size and (size >= target or over_tokens):
            chunks.append(range(start, index))
            start, tokens = index, 0
        tokens += cost
    if start < count or not chunks:
        chunks.append(range(start, count))
    return chunks
