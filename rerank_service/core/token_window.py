"""How a deployment reads one document: the tokens it takes beside a query, and how to count them.

A backend describes its window with a `TokenWindow` (in its `CallLimits`); the engine
asks it for the room a document has beside a query and for a `Measure` of a long
document, which says where a given number of tokens ends. Two measures cover every
backend: token offsets from a real tokenizer (a local model's, or the one an upstream
deployment names), or the service's estimate of one token per 3 bytes of UTF-8 where no
tokenizer is known (core/chunking.py's `estimate_tokens`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

# Where a window's counts come from: a local model's tokenizer, a tokenizer an upstream
# deployment names, or the estimate.
COUNTED_BY_MODEL = "model"
COUNTED_BY_TOKENIZER = "tokenizer"
COUNTED_BY_ESTIMATE = "estimate"

# Bytes of UTF-8 per estimated token (core/chunking.py's estimate).
BYTES_PER_TOKEN = 3
# No tokenizer in use puts more characters than this in one token on average: a bound
# that refuses a call that would make too many chunks before any tokenizing is done.
MAX_CHARACTERS_PER_TOKEN = 32


class Measure(Protocol):
    """Token positions in one text."""

    @property
    def tokens(self) -> int:
        """The text's tokens (for an estimate: estimated)."""
        ...

    def fit(self, start: int, tokens: int) -> int:
        """The furthest end such that text[start:end] holds at most `tokens` tokens."""
        ...

    def back(self, end: int, tokens: int) -> int:
        """A position about `tokens` tokens before `end` (0 at the furthest)."""
        ...


@runtime_checkable
class CountsEach(Protocol):
    """A window counted by a tokenizer that counts many texts' tokens at once (each alone)."""

    def count_each(self, texts: Sequence[str]) -> list[int]: ...


class TokenWindow(Protocol):
    """A deployment's window for one (query, document) pair."""

    @property
    def counted_by(self) -> str:
        """COUNTED_BY_MODEL, COUNTED_BY_TOKENIZER or COUNTED_BY_ESTIMATE."""
        ...

    def room(self, query: str, instruct: str | None) -> int:
        """Tokens a document may have beside this query (its tokens and the template's taken off)."""
        ...

    def measure(self, text: str) -> Measure:
        """Token positions in `text` (a tokenizer's pass over it, or the estimate's arithmetic)."""
        ...


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _estimate(text: str) -> int:
    return -(-_utf8_size(text) // BYTES_PER_TOKEN)


class EstimateMeasure:
    """One token per 3 bytes of UTF-8: arithmetic on an ASCII text, a binary search on another."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._ascii = text.isascii()
        self.tokens = _estimate(text)

    def fit(self, start: int, tokens: int) -> int:
        size = len(self._text)
        most = start + BYTES_PER_TOKEN * tokens  # a character is at least one byte
        if self._ascii or (most >= size and _estimate(self._text[start:]) <= tokens):
            return min(size, most)
        low, high = start, min(size, most)  # text[start:low] fits; text[start:high + 1] may not
        while low < high:
            middle = (low + high + 1) // 2
            if _estimate(self._text[start:middle]) <= tokens:
                low = middle
            else:
                high = middle - 1
        return low

    def back(self, end: int, tokens: int) -> int:
        if self._ascii:
            return max(0, end - BYTES_PER_TOKEN * tokens)
        low, high = max(0, end - BYTES_PER_TOKEN * tokens), end  # the furthest start that fits
        while low < high:
            middle = (low + high) // 2
            if _estimate(self._text[middle:end]) <= tokens:
                high = middle
            else:
                low = middle + 1
        return low


class SpansMeasure:
    """A tokenizer's offsets: the character at which each token of the text starts."""

    def __init__(self, text: str, starts: Sequence[int]) -> None:
        self._size = len(text)
        self._starts = starts
        self.tokens = len(starts)

    def fit(self, start: int, tokens: int) -> int:
        first = bisect_left(self._starts, start)
        past = first + tokens
        return self._size if past >= len(self._starts) else self._starts[past]

    def back(self, end: int, tokens: int) -> int:
        if tokens <= 0:  # no token back is `end` itself (at the text's end, past the last start)
            return end
        before = bisect_left(self._starts, end)
        return self._starts[before - tokens] if before > tokens else 0


def starts_by(tokenizer: Any, text: str) -> list[int]:
    """Where each token of `text` starts, by a `tokenizers.Tokenizer` (no special tokens; its
    truncation and padding off). encode_batch, not encode: encode holds Python's lock for the
    whole text (a 6 MB document: seconds in which no other thread runs, the event loop and
    its health checks included); encode_batch lets it go, and gives the same offsets."""
    return [start for start, _ in tokenizer.encode_batch([text], add_special_tokens=False)[0].offsets]


def counts_by(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text alone, by a `tokenizers.Tokenizer`, in one batch (Python's lock let go)."""
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class EstimatedWindow:
    """The window of a deployment without a tokenizer: `tokens` per document, estimated."""

    counted_by = COUNTED_BY_ESTIMATE

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def room(self, query: str, instruct: str | None) -> int:
        # An upstream cuts each document on its own, whatever the query.
        return self.tokens

    def measure(self, text: str) -> Measure:
        return EstimateMeasure(text)
