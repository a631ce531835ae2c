"""What a cross- and a bi-encoder scorer share: an engine, a guarded tokenizer, how they load.

Each subclass adds how it tokenizes a pair and turns its model's output into scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from rerank_service.backends.local.common import (
    CountsTokens,
    GuardedTokenizer,
    Output,
    encoder_window,
    using_as,
)
from rerank_service.backends.local.forward import Forward, load_encoder
from rerank_service.backends.local.onnx_engine import OnnxOptions


class EncoderScorer(CountsTokens):
    """A scorer whose model a `Forward` runs (torch or ONNX Runtime)."""

    kind: str
    # What its forward pass returns: a cross-encoder's logits, a bi-encoder's token embeddings.
    output: ClassVar[Output]
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
        self.max_length = encoder_window(config, tokenizer, max_length)
        self._pad = self._tokenizer.pad_token_id
        # Read once: document_room is asked on the event loop, which must not touch the
        # tokenizer a worker thread may be encoding with.
        self._single_specials: int = tokenizer.num_special_tokens_to_add(pair=False)
        self._fit(config, tokenizer)

    def _fit(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        """Read what the subclass needs from the model; a ModelLoadError where the model does not fit."""

    def document_room(self, query: str, instruct: str | None) -> int:
        """Tokens a document may have: a bi-encoder reads it alone, with its special tokens."""
        return self.max_length - self._single_specials

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        onnx: OnnxOptions | None = None,
    ) -> Self:
        """Load a model directory (never from the network); `onnx` runs it on ONNX Runtime."""
        path = Path(path)
        tokenizer, forward, config = load_encoder(
            path, cls.kind, cls.output, device=device, dtype=dtype, onnx=onnx
        )
        with using_as(cls.kind, path):
            return cls(forward, config, tokenizer, max_length=cls.window_asked(path, max_length))

    @classmethod
    def window_asked(cls, path: Path, max_length: int | None) -> int | None:
        """The window to ask for, given the directory and the caller's `max_length`."""
        return max_length
