"""Load a reranking model from a directory, the local Hugging Face cache, or the bundled one.

`load_scorer` is the entry point: it finds the files (never downloading), picks the
scorer from config.json's `architectures`, and places the model on a device and dtype.
Importing this module imports torch and transformers.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from transformers.utils import logging as transformers_logging

from rerank_service.backends.local.bi_encoder import BiEncoderScorer
from rerank_service.backends.local.common import ModelLoadError
from rerank_service.backends.local.cross_encoder import CrossEncoderScorer
from rerank_service.backends.local.model_files import BUNDLED, bundled_model_path, resolve_source
from rerank_service.backends.local.onnx_engine import OnnxOptions
from rerank_service.backends.local.qwen3 import Qwen3Scorer
from rerank_service.backends.local.scorer import Scorer
from rerank_service.observability.logging import CALLER_LOG_INTERVAL, RateLimit, get_logger

__all__ = [
    "BUNDLED",
    "BiEncoderScorer",
    "CrossEncoderScorer",
    "Engine",
    "ModelLoadError",
    "OnnxOptions",
    "Qwen3Scorer",
    "bundled_model_path",
    "detect_kind",
    "load_scorer",
    "resolve_source",
    "select_device",
    "select_dtype",
    "set_threads",
]

Engine = Literal["torch", "onnx"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_scorer(
    source: str,
    device: str = "auto",
    dtype: str = "auto",
    *,
    max_length: int | None = None,
    engine: Engine = "torch",
    onnx: OnnxOptions | None = None,
) -> Scorer:
    """Load the model `source` names, ready to score.

    `source` is a local directory, a Hugging Face hub id already in the local cache, or
    "bundled". `device` is "auto" (cuda when available), "cpu", "cuda", "cuda:N"...;
    `dtype` is "auto", "float32", "float16" or "bfloat16". `max_length` lowers the
    model's window. `engine` "onnx" runs a cross- or bi-encoder on ONNX Runtime (CPU) with
    `onnx`'s options; Qwen3-Reranker always runs on torch. Raises ModelLoadError with one
    sentence saying why it cannot.
    """
    log_transformers_as_the_service()
    path = resolve_source(source)
    kind = detect_kind(_read_config(path))
    if kind == Qwen3Scorer.kind:
        target = select_device(device)
        return Qwen3Scorer.from_pretrained(
            path, device=target, dtype=select_dtype(dtype, target), max_length=max_length
        )
    if engine == "onnx":
        if device not in ("auto", "cpu"):
            raise ModelLoadError(f"the onnx engine runs on the CPU; device {device!r} needs the torch engine")
        if dtype not in ("auto", "float32"):
            raise ModelLoadError(f"the onnx engine runs in float32 (or int8); dtype {dtype!r} needs torch")
        options = onnx or OnnxOptions()
        scorer_class: type[CrossEncoderScorer | BiEncoderScorer] = (
            CrossEncoderScorer if kind == CrossEncoderScorer.kind else BiEncoderScorer
        )
        return scorer_class.from_pretrained(path, max_length=max_length, onnx=options)
    target = select_device(device)
    precision = select_dtype(dtype, target)
    if kind == CrossEncoderScorer.kind:
        return CrossEncoderScorer.from_pretrained(path, device=target, dtype=precision, max_length=max_length)
    return BiEncoderScorer.from_pretrained(path, device=target, dtype=precision, max_length=max_length)


def log_transformers_as_the_service() -> None:
    """transformers' own log records as the service's log lines (JSON where the service writes
    JSON), not as text on stderr: its LOAD REPORT (a table of the weights a checkpoint lacks,
    the only word that a classifier head was left random) broke the one-JSON-object-a-line
    log. Its progress bars are turned off. Idempotent."""
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers_logging.disable_default_handler()
    library = logging.getLogger("transformers")
    library.propagate = False  # not also as text through the root or last-resort handler
    if not any(isinstance(handler, _AsServiceLines) for handler in library.handlers):
        library.addHandler(_AsServiceLines(RateLimit(CALLER_LOG_INTERVAL)))


# Terminal colours in transformers' messages (its LOAD REPORT's bold title).
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
# What a caller's long text makes the tokenizer say, once per tokenizer, wrongly here: the
# service counts such a text without truncating it on purpose, and truncates what it scores.
_CALLER_CAUSED = ("Token indices sequence length is longer than the specified maximum",)


class _AsServiceLines(logging.Handler):
    """One transformers record as one service log line: its first line the event, the rest (a
    report's table) in `details`; at most one line per kind in each interval."""

    def __init__(self, limit: RateLimit) -> None:
        super().__init__()
        self._limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = _COLOURS.sub("", record.getMessage()).strip()
            if message.startswith(_CALLER_CAUSED):
                return
            event, _, details = message.partition("\n")
            left_out = self._limit.allow((record.name, event[:200]))
            if left_out is None:
                return
            fields: dict[str, Any] = {"details": details.strip()} if details.strip() else {}
            if left_out:
                fields["left_out"] = left_out
            level = "error" if record.levelno >= logging.ERROR else "warning"
            if record.levelno < logging.WARNING:
                level = "info" if record.levelno >= logging.INFO else "debug"
            getattr(get_logger(record.name), level)(event.strip(), **fields)
        except Exception:
            self.handleError(record)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 keeps its default); the number both engines use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def runs_on_torch(source: str) -> bool:
    """Whether the model `source` names runs on torch whatever `--local-engine` says:
    Qwen3-Reranker does (the onnx engine runs cross- and bi-encoders only)."""
    return detect_kind(_read_config(resolve_source(source))) == Qwen3Scorer.kind


def detect_kind(config: dict[str, Any]) -> str:
    """ "qwen3", "cross-encoder" or "bi-encoder", from a config.json's `architectures`."""
    architectures = config.get("architectures") or []
    names = [name for name in architectures if isinstance(name, str)]
    if any(name.endswith("ForCausalLM") for name in names):
        return Qwen3Scorer.kind
    if any(name.endswith("ForSequenceClassification") for name in names):
        return CrossEncoderScorer.kind
    return BiEncoderScorer.kind


def select_device(device: str) -> torch.device:
    """The torch device for a setting: "auto" is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"device {device!r} is not a torch device (try cpu, cuda or cuda:0)") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but torch sees no CUDA GPU")
    return target


def select_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: "auto" is float32 on CPU, bfloat16 on GPUs that have it, else float16."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model directory {path} has no config.json, so it is not a transformers model")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} is not a JSON object")
    return config
