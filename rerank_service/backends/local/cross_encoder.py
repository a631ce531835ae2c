"""Cross-encoders: a sequence classifier reads query and document together.

One logit (ms-marco MiniLM, bge-reranker) is a relevance score, squashed by a sigmoid;
two logits are (irrelevant, relevant) classes, and the score is P(relevant).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from rerank_service.backends.local.common import (
    GuardedTokenizer,
    ModelLoadError,
    encoder_window,
    load_error,
    pad_batch,
)
from rerank_service.backends.local.forward import Forward, load_forward
from rerank_service.backends.local.onnx_engine import OnnxOptions
from rerank_service.backends.local.scorer import Encoded


class CrossEncoderScorer:
    """Scores pairs with an ...ForSequenceClassification model."""

    kind: str = "cross-encoder"
    supports_instruct: bool = False

    def __init__(
        self,
        forward: Forward,
        config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int | None = None,
    ) -> None:
        self._forward = forward
        self._tokenizer = GuardedTokenizer(tokenizer)
        self.device = forward.device
        self.dtype = forward.dtype
        self.engine = forward.engine
        labels = config.num_labels
        self._num_labels = labels if labels is not None else 2
        if self._num_labels not in (1, 2):
            raise ModelLoadError(
                f"the classifier has {self._num_labels} labels; a cross-encoder needs 1 (a relevance "
                "logit) or 2 (irrelevant, relevant)"
            )
        self.max_length = encoder_window(config, tokenizer, max_length)
        # Segment ids only for models that have them (BERT yes, RoBERTa/XLM-R no).
        self._token_types = "token_type_ids" in tokenizer.model_input_names and forward.reads_token_type_ids
        self._pair_specials = tokenizer.num_special_tokens_to_add(pair=True)
        self._pad = self._tokenizer.pad_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        onnx: OnnxOptions | None = None,
    ) -> CrossEncoderScorer:
        """Load a cross-encoder directory (never from the network); `onnx` runs it on ONNX Runtime."""
        path = Path(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            forward, config = load_forward(path, "logits", device=device, dtype=dtype, onnx=onnx)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise load_error("cross-encoder", path, exc) from exc
        try:
            return cls(forward, config, tokenizer, max_length=max_length)
        except ModelLoadError as exc:
            raise ModelLoadError(f"cannot use the model in {path} as a cross-encoder: {exc}") from exc

    def count_tokens(self, text: str) -> int:
        return self._tokenizer.count(text)

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
