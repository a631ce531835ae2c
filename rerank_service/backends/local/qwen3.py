"""Qwen3-Reranker: a causal LM asked whether a document meets the query; score = P("yes").

The prompt, truncation and scoring follow the Qwen3-Reranker model card exactly, so
scores match the reference implementation; only the batching differs (see score()).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rerank_service.backends.local.common import (
    CountsTokens,
    GuardedTokenizer,
    ModelLoadError,
    accepts_argument,
    for_inference,
    loading,
    max_positions,
    model_device,
    model_dtype,
    pad_batch,
    require_fast,
    require_vocabulary,
    using_as,
)
from rerank_service.backends.local.scorer import Encoded
from rerank_service.backends.local.window import count_within
from rerank_service.core.domain import DEFAULT_INSTRUCT
from rerank_service.core.qwen3_prompt import PREFIX, SUFFIX, format_pair

# The model card's window.
DEFAULT_MAX_LENGTH = 8192


class Qwen3Scorer(CountsTokens):
    """Scores pairs with a Qwen3-Reranker (or any causal LM trained on the same prompt)."""

    kind: str = "qwen3"
    supports_instruct: bool = True
    # Always PyTorch: the ONNX engine is proven equal for encoders only (onnx_engine.py).
    engine: str = "torch"

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_length: int | None = None
    ) -> None:
        self._model = for_inference(model)
        self._tokenizer = GuardedTokenizer(tokenizer)
        self.device = model_device(model)
        self.dtype = model_dtype(model)
        limit = max_length if max_length is not None else DEFAULT_MAX_LENGTH
        positions = max_positions(model.config)
        self.max_length = min(limit, positions) if positions is not None else limit
        self._prefix: list[int] = tokenizer.encode(PREFIX, add_special_tokens=False)
        self._suffix: list[int] = tokenizer.encode(SUFFIX, add_special_tokens=False)
        # What the pair text may use once the template is around it.
        self._pair_budget = self.max_length - len(self._prefix) - len(self._suffix)
        if self._pair_budget < 1:
            raise ModelLoadError(
                f"max_length {self.max_length} leaves no room for a pair: the prompt template alone "
                f"takes {len(self._prefix) + len(self._suffix)} tokens"
            )
        self._yes = _token_id(tokenizer, "yes")
        self._no = _token_id(tokenizer, "no")
        self._pad = self._tokenizer.pad_token_id
        # Only the last position's logits are needed: asking for them alone avoids a
        # (batch, length, vocabulary) tensor, which is gigabytes for a 150k vocabulary.
        self._logits_to_keep = accepts_argument(model, "logits_to_keep")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ) -> Qwen3Scorer:
        """Load a Qwen3-Reranker directory (never from the network)."""
        path = Path(path)
        with loading("qwen3 reranker", path):
            # Left padding keeps every pair's last token in the last column.
            tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", local_files_only=True)
            require_vocabulary(tokenizer, "qwen3 reranker", path)
            require_fast(tokenizer, "qwen3 reranker", path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        with using_as("qwen3 reranker", path):
            return cls(for_inference(model, device), tokenizer, max_length=max_length)

    def document_room(self, query: str, instruct: str | None) -> int:
        """The window less the template, the instruction and the query (one token spare: the
        document's first token may merge with the template's last). An instruction and query
        over the window are counted no further than it: the room is negative either way."""
        empty = format_pair(instruct or DEFAULT_INSTRUCT, query, "")
        tokens, _ = count_within(self.count_tokens, empty, self._pair_budget)
        return self._pair_budget - tokens - 1

    def query_room(self) -> int:
        """What query and document share beside the template and the default instruction."""
        return self.document_room("", None)

    def encode(self, query: str, documents: Sequence[str], instruct: str | None) -> list[Encoded]:
        if not documents:
            return []
        instruction = instruct or DEFAULT_INSTRUCT
        texts = [format_pair(instruction, query, document) for document in documents]

        def tokenize(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
            ids: list[list[int]] = tokenizer(
                texts,
                padding=False,
                truncation="longest_first",
                return_attention_mask=False,
                max_length=self._pair_budget,
            )["input_ids"]
            return ids

        encoded = []
        for ids in self._tokenizer.run(tokenize):
            full = (*self._prefix, *ids, *self._suffix)
            encoded.append(Encoded(input_ids=full, tokens=len(full)))
        return encoded

    def score(self, batch: Sequence[Encoded]) -> list[float]:
        if not batch:
            return []
        device = torch.device(self.device)
        input_ids, mask = pad_batch([e.input_ids for e in batch], self._pad, left=True, device=device)
        # transformers numbers positions 0..width-1 whatever the mask says, so a left-padded
        # pair would start at position `padding`. Derive them from the mask instead: every
        # pair then sees the positions it has alone, which keeps scores batch-invariant.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with torch.inference_mode():
            output = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            )
            last = output.logits[:, -1, :].float()
            pair = torch.stack([last[:, self._no], last[:, self._yes]], dim=1)
            scores = torch.softmax(pair, dim=1)[:, 1]
        result: list[float] = scores.cpu().tolist()
        return result


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of a single vocabulary token that the scoring reads a logit of."""
    value = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(value, int) or value == tokenizer.unk_token_id:
        raise ModelLoadError(f"its tokenizer has no {token!r} token to read the answer from")
    return value
