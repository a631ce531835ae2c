"""A local model's window for long documents: counted by its own tokenizer (core/token_window.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from rerank_service.core.long_documents import MIN_CHUNK_TOKENS
from rerank_service.core.token_window import (
    COUNTED_BY_MODEL,
    MAX_CHARACTERS_PER_TOKEN,
    CountsEach,
    Measure,
    SpansMeasure,
)

# The fewest tokens a document may be left beside the query and the instruction: a call
# with less is refused, never scored on its documents' first few tokens (or none). The
# same bound as the engine's for chunking.
MIN_DOCUMENT_TOKENS = MIN_CHUNK_TOKENS


def count_within(count: Callable[[str], int], text: str, limit: int) -> tuple[int, int]:
    """`count(text)`, or, for a text too long for `limit` tokens to hold, `count` of a prefix
    of it once that prefix alone has more than `limit`: a count over the limit either way,
    without tokenizing the rest (a caller's 12 MB query took seconds, under the model's
    tokenizer lock, to be refused for its first few thousand words). Returns the tokens and
    the characters they were counted in."""
    reach = (limit + 1) * MAX_CHARACTERS_PER_TOKEN  # holds over `limit` tokens (token_window.py)
    if len(text) > reach:
        # Cut before a space: a word cut in two may be more tokens than the whole word.
        space = text.rfind(" ", 0, reach)
        head = text[: space if space > 0 else reach]
        tokens = count(head)
        if tokens > limit:
            return tokens, len(head)
    return count(text), len(text)


@runtime_checkable
class ReadsDocuments(Protocol):
    """A scorer that says how many tokens a document may have, and where its tokens start."""

    def document_room(self, query: str, instruct: str | None) -> int: ...

    def token_starts(self, text: str) -> list[int]: ...


@runtime_checkable
class SharesRoomWithQuery(Protocol):
    """A scorer whose query and document share one window (Qwen3, a cross-encoder; not a
    bi-encoder, which reads them apart)."""

    def query_room(self) -> int:
        """Tokens query and document may have together (beside the default instruction)."""
        ...


@runtime_checkable
class ReadsQueryAlone(Protocol):
    """A scorer that reads the query in a window of its own (a bi-encoder)."""

    def query_window(self) -> int:
        """Tokens of the longest query it reads whole."""
        ...


class ScorerWindow:
    """A `TokenWindow` over a loaded scorer's tokenizer and template."""

    counted_by = COUNTED_BY_MODEL

    def __init__(self, scorer: ReadsDocuments) -> None:
        self._scorer = scorer

    def room(self, query: str, instruct: str | None) -> int:
        return self._scorer.document_room(query, instruct)

    def measure(self, text: str) -> Measure:
        return SpansMeasure(text, self._scorer.token_starts(text))

    def count_each(self, texts: Sequence[str]) -> list[int]:
        if isinstance(self._scorer, CountsEach):  # in one batch
            return self._scorer.count_each(texts)
        return [len(self._scorer.token_starts(text)) for text in texts]
