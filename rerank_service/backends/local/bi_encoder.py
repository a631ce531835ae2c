"""Bi-encoders: query and document are embedded apart; score = their cosine, mapped to [0, 1].

Mean pooling over real tokens and L2 normalisation, as sentence-transformers models such
as all-MiniLM-L6-v2 are trained; (cosine + 1) / 2 keeps the score in [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from rerank_service.backends.local.common import Output, pad_batch
from rerank_service.backends.local.encoder import EncoderScorer
from rerank_service.backends.local.scorer import Encoded


class BiEncoderScorer(EncoderScorer):
    """Scores pairs with a sentence-embedding model (an AutoModel's mean-pooled output)."""

    kind: str = "bi-encoder"
    output: ClassVar[Output] = "last_hidden_state"

    @classmethod
    def window_asked(cls, path: Path, max_length: int | None) -> int | None:
        # A sentence-transformers directory says how long the model was meant to read
        # (all-MiniLM-L6-v2: 256 tokens); honour it as sentence-transformers does.
        trained = _sentence_transformers_max_length(path)
        if trained is None:
            return max_length
        return trained if max_length is None else min(max_length, trained)

    def query_window(self) -> int:
        """The window less a sequence's special tokens: a longer query would be cut, and
        scored on its start alone, so it is refused instead (backend.py)."""
        return self.max_length - self._single_specials

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        # `instruct` is ignored: the embeddings were not trained with one.
        if not documents:
            return []

        def tokenize(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[list[int]]]:
            options = {"truncation": True, "max_length": self.max_length, "return_attention_mask": False}
            query_ids: list[int] = tokenizer(query, **options)["input_ids"]
            document_ids: list[list[int]] = tokenizer(list(documents), **options)["input_ids"]
            return query_ids, document_ids

        query_ids, document_ids = self._tokenizer.run(tokenize)
        query_key = tuple(query_ids)
        return [
            # The query is embedded once per request, so its tokens count once: on the first pair
            # (of the call's first slice: the backend encodes ENCODE_SLICE documents at a time).
            Encoded(
                input_ids=tuple(ids),
                query_ids=query_key,
                tokens=len(ids) + (len(query_key) if i == 0 else 0),
            )
            for i, ids in enumerate(document_ids)
        ]

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        # A batch may mix requests: embed each distinct query once.
        queries: dict[tuple[int, ...], int] = {}
        for item in batch:
            if item.query_ids is None:
                raise ValueError("a bi-encoder pair needs query_ids; encode it with this scorer")
            queries.setdefault(item.query_ids, len(queries))
        with torch.inference_mode():
            query_vectors = self._embed(list(queries))
            document_vectors = self._embed([item.input_ids for item in batch])
        rows = torch.tensor([queries[item.query_ids] for item in batch if item.query_ids is not None])
        cosine = (document_vectors * query_vectors[rows.to(query_vectors.device)]).sum(dim=-1)
        scores = ((cosine + 1) / 2).clamp(0.0, 1.0)
        result: list[float] = scores.cpu().tolist()
        return result

    def _embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Unit-length mean-pooled embeddings (float32) of tokenized texts."""
        input_ids, mask = pad_batch(rows, self._pad, left=False, device=torch.device(self.device))
        hidden = self._forward({"input_ids": input_ids, "attention_mask": mask}).float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)


def _sentence_transformers_max_length(path: Path) -> int | None:
    """max_seq_length from sentence_bert_config.json, when the directory has a valid one."""
    try:
        value = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and value > 0 else None
