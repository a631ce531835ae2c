"""The engine that runs an encoder's forward pass: PyTorch eager or ONNX Runtime.

A cross- or bi-encoder scorer tokenizes, pads and turns the model's output into scores;
a `Forward` runs the model on the padded batch (input_ids, attention_mask and, where the
model reads them, token_type_ids) and returns one tensor: the logits of a cross-encoder,
the last hidden state of a bi-encoder. Swapping the Forward swaps the engine and nothing
else, so tokenization, truncation and the score formula are the same for every engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rerank_service.backends.local.common import (
    Output,
    accepts_argument,
    for_inference,
    loading,
    model_device,
    model_dtype,
    require_fast,
    require_vocabulary,
)
from rerank_service.backends.local.onnx_engine import OnnxOptions, onnx_forward


class Forward(Protocol):
    """One encoder forward pass, on whatever runs it."""

    # "torch", "onnx" or "onnx-int8": in the load log line and the benchmarks.
    engine: str
    # Where the inputs go, spelled as torch does ("cpu", "cuda:0").
    device: str
    # What the forward pass computes in: "float32", "bfloat16", "float16" (int8 graphs: float32
    # activations).
    dtype: str
    # Whether the model takes segment ids (BERT yes, RoBERTa/XLM-R no).
    reads_token_type_ids: bool

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The output for a padded batch; blocking, one batch at a time."""
        ...


class TorchForward:
    """A transformers model run by PyTorch eager."""

    engine = "torch"

    def __init__(
        self, model: PreTrainedModel, output: Output, device: str | torch.device | None = None
    ) -> None:
        self._model = for_inference(model, device)
        self._output = output
        self.device = model_device(self._model)
        self.dtype = model_dtype(self._model)
        self.reads_token_type_ids = accepts_argument(model, "token_type_ids")

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            result: torch.Tensor = getattr(self._model(**inputs), self._output)
        return result


def model_class(output: Output) -> type[AutoModelForSequenceClassification] | type[AutoModel]:
    """The transformers class whose forward pass gives `output`."""
    return AutoModelForSequenceClassification if output == "logits" else AutoModel


def load_forward(
    path: Path, output: Output, *, device: str | torch.device, dtype: torch.dtype, onnx: OnnxOptions | None
) -> tuple[Forward, PretrainedConfig]:
    """The engine for the model in `path` and the model's config: torch, or ONNX Runtime with `onnx`."""
    if onnx is None:
        model = model_class(output).from_pretrained(path, dtype=dtype, local_files_only=True)
        return TorchForward(model, output, device), model.config
    return onnx_forward(path, output, onnx), AutoConfig.from_pretrained(path, local_files_only=True)


def load_encoder(
    path: Path,
    what: str,
    output: Output,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    onnx: OnnxOptions | None,
) -> tuple[PreTrainedTokenizerBase, Forward, PretrainedConfig]:
    """An encoder directory's tokenizer, engine and config (never from the network); a
    failure is a ModelLoadError that names `what` and `path`."""
    with loading(what, path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        require_vocabulary(tokenizer, what, path)
        require_fast(tokenizer, what, path)
        forward, config = load_forward(path, output, device=device, dtype=dtype, onnx=onnx)
    return tokenizer, forward, config
