"""What the micro-batcher needs from a model: encode pairs, score a padded batch.

Encoding (tokenize, apply the prompt template, truncate) happens per request; scoring
happens per batch, which may mix pairs from many requests. Keeping them apart is what
lets the batcher merge concurrent requests and sort pairs by length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Encoded:
    """One (query, document) pair, tokenized and truncated, ready for the model."""

    # What the model reads for this pair: the whole templated, truncated sequence for
    # Qwen3 and cross-encoders; the document's ids alone for a bi-encoder.
    input_ids: tuple[int, ...]
    # Segment ids for cross-encoders that use them (BERT); None otherwise.
    token_type_ids: tuple[int, ...] | None = None
    # Bi-encoders only: the query's ids, shared by every pair of one request.
    query_ids: tuple[int, ...] | None = None
    # Tokens the model processes for this pair, reported as usage.
    tokens: int = 0

    @property
    def length(self) -> int:
        """Padded length this pair costs in a batch (for sorting and token budgets)."""
        return len(self.input_ids)


class Scorer(Protocol):
    """A loaded reranking model."""

    # "qwen3" (causal-LM yes/no), "cross-encoder" or "bi-encoder".
    kind: str
    # Whether `instruct` changes the scores.
    supports_instruct: bool
    # The model's window in tokens; longer pairs are truncated to it.
    max_length: int
    # The torch device the model runs on ("cpu", "cuda:0", ...).
    device: str
    # What it computes in: "float32", "bfloat16" or "float16".
    dtype: str
    # What runs the model: "torch", "onnx" or "onnx-int8" (forward.py).
    engine: str

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone, without special tokens (for the query-length limit)."""
        ...

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        """Tokenize each (query, document) pair; thread-safe, no torch work."""
        ...

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        """Relevance in [0, 1] for each pair, in order. Blocking; one batch at a time."""
        ...
