"""A local model's window for long documents: counted by its own tokenizer (core/token_window.py)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rerank_service.core.token_window import COUNTED_BY_MODEL, Measure, SpansMeasure


@runtime_checkable
class ReadsDocuments(Protocol):
    """A scorer that says how many tokens a document may have, and where its tokens start."""

    def document_room(self, query: str, instruct: str | None) -> int: ...

    def token_starts(self, text: str) -> list[int]: ...


class ScorerWindow:
    """A `TokenWindow` over a loaded scorer's tokenizer and template."""

    counted_by = COUNTED_BY_MODEL

    def __init__(self, scorer: ReadsDocuments) -> None:
        self._scorer = scorer

    def room(self, query: str, instruct: str | None) -> int:
        return self._scorer.document_room(query, instruct)

    def measure(self, text: str) -> Measure:
        return SpansMeasure(text, self._scorer.token_starts(text))
