"""A local model's window for long documents: counted by its own tokenizer (core/token_window.py)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rerank_service.core.long_documents import MIN_CHUNK_TOKENS
from rerank_service.core.token_window import COUNTED_BY_MODEL, Measure, SpansMeasure

# The fewest tokens a document may be left beside the query and the instruction: a call
# with less is refused, never scored on its documents' first few tokens (or none). The
# same bound as the engine's for chunking.
MIN_DOCUMENT_TOKENS = MIN_CHUNK_TOKENS


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
