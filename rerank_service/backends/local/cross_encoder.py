"""Cross-encoders: a sequence classifier reads query and document together.

One logit (ms-marco MiniLM, bge-reranker) is a relevance score, squashed by a sigmoid;
two logits are (irrelevant, relevant) classes, and the score is P(relevant).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from rerank_service.backends.local.common import ModelLoadError, Output, pad_batch
from rerank_service.backends.local.encoder import EncoderScorer
from rerank_service.backends.local.scorer import Encoded
from rerank_service.backends.local.window import count_within


class CrossEncoderScorer(EncoderScorer):
    """Scores pairs with an ...ForSequenceClassification model."""

    kind: str = "cross-encoder"
    output: ClassVar[Output] = "logits"

    def _fit(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        labels = config.num_labels
        self._num_labels = labels if labels is not None else 2
        if self._num_labels not in (1, 2):
            raise ModelLoadError(
                f"the classifier has {self._num_labels} labels; a cross-encoder needs 1 (a relevance "
                "logit) or 2 (irrelevant, relevant)"
            )
        # Segment ids only for models that have them (BERT yes, RoBERTa/XLM-R no).
        self._token_types = (
            "token_type_ids" in tokenizer.model_input_names and self._forward.reads_token_type_ids
        )
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)

    def document_room(self, query: str, instruct: str | None) -> int:
        """The window less the query's tokens and the pair's special tokens (a query over the
        window counted no further than it: the room is negative either way)."""
        query_tokens, _ = count_within(self.count_tokens, query, self.max_length)
        return self.max_length - query_tokens - self._pair_specials

    def query_room(self) -> int:
        """The window less the pair's special tokens: what query and document share."""
        return self.max_length - self._pair_specials

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        # `instruct` is ignored: a cross-encoder has no place for it.
        if not documents:
            return []

        def tokenize(tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], list[list[int]] | None]:
            query_tokens = len(tokenizer(query, add_special_tokens=False, truncation=False)["input_ids"])
            # Cut the document, never the query; only a query that fills the window alone
            # (where "only_second" fails) has to give way too.
            fits = query_tokens + self._pair_specials < self.max_length
            batch = tokenizer(
                [query] * len(documents),
                list(documents),
                padding=False,
                truncation="only_second" if fits else "longest_first",
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=self._token_types,
            )
            return batch["input_ids"], batch["token_type_ids"] if self._token_types else None

        ids, types = self._tokenizer.run(tokenize)
        return [
            Encoded(
                input_ids=tuple(row),
                token_type_ids=tuple(types[i]) if types is not None else None,
                tokens=len(row),
            )
            for i, row in enumerate(ids)
        ]

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        device = torch.device(self.device)
        # Right padding: absolute position embeddings then match the unpadded pair.
        input_ids, mask = pad_batch([e.input_ids for e in batch], self._pad, left=False, device=device)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if self._token_types:
            types = [e.token_type_ids or (0,) * len(e.input_ids) for e in batch]
            inputs["token_type_ids"], _ = pad_batch(types, 0, left=False, device=device)
        logits = self._forward(inputs).float()
        relevant = torch.sigmoid(logits[:, 0]) if self._num_labels == 1 else torch.softmax(logits, -1)[:, 1]
        result: list[float] = relevant.cpu().tolist()
        return result
