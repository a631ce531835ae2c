"""The tokenizer an upstream deployment names (`tokenizer:`), for cutting and chunking long documents.

Loaded once, when the deployment is built, with the fast `tokenizers` library: from a
directory holding tokenizer.json, or from a Hugging Face model already in the local cache.
Nothing is ever downloaded: a tokenizer that is not on disk is a configuration error.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from rerank_service.config import ConfigError
from rerank_service.core.token_window import COUNTED_BY_TOKENIZER, Measure, SpansMeasure

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(source: str) -> Any:
    """A `tokenizers.Tokenizer` from a directory or the local hub cache; ConfigError otherwise."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(
            f"upstream-tokenizer {source}: needs the tokenizers package (pip install tokenizers)"
        ) from None
    path = Path(source).expanduser()
    file: Path | None
    if path.is_dir():
        file = path / TOKENIZER_FILE
    elif path.is_file():
        file = path
    else:
        file = _cached(source)
    if file is None or not file.is_file():
        raise ConfigError(
            f"upstream-tokenizer {source}: no {TOKENIZER_FILE} there, nor in the local Hugging Face "
            "cache (it is never downloaded: fetch it first, or name a directory)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises its own exception types
        raise ConfigError(f"upstream-tokenizer {source}: cannot read {file}: {exc}") from None


def _cached(model_id: str) -> Path | None:
    """tokenizer.json of `model_id`'s main revision in the local Hugging Face cache, read by its
    layout (`models--org--name/refs/main` names the snapshot), as the hub library reads it."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    folder = Path(hub) / ("models--" + model_id.replace("/", "--"))
    try:
        revision = (folder / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return folder / "snapshots" / revision / TOKENIZER_FILE


class TokenizerWindow:
    """An upstream's window counted by the tokenizer its deployment names.

    `tokens` is the most an upstream takes of one document; it cuts each document on its
    own, so the query takes nothing off it.
    """

    counted_by = COUNTED_BY_TOKENIZER

    def __init__(self, tokenizer: Any, tokens: int) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._lock = threading.Lock()  # the Rust object is not shared across threads at once
        self.tokens = tokens

    def room(self, query: str, instruct: str | None) -> int:
        return self.tokens

    def measure(self, text: str) -> Measure:
        with self._lock:
            offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        return SpansMeasure(text, [start for start, _ in offsets])
