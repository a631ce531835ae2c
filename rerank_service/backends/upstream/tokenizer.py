"""The tokenizer an upstream deployment names (`tokenizer:`), for cutting and chunking long documents.

Loaded once, when the deployment is built, with the fast `tokenizers` library: from a
directory holding tokenizer.json, or from a Hugging Face model already in the local cache.
Nothing is ever downloaded: a tokenizer that is not on disk is a configuration error.

Reading one holds the event loop (a 6 MB tokenizer.json: about 0.3 s), and no thread can
take that off it: the library holds Python's lock while it parses. So a file read once is
shared while any deployment uses it: a reload that changes a deployment's other settings,
or adds another deployment naming the same file, reads nothing (SharedTokenizer).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rerank_service.config import ConfigError
from rerank_service.core.token_window import COUNTED_BY_TOKENIZER, Measure, SpansMeasure, counts_by, starts_by

TOKENIZER_FILE = "tokenizer.json"


class SharedTokenizer:
    """A tokenizer read from one file, shared by every window that counts with it (each
    model of each deployment naming the file), with the lock that keeps them from using the
    Rust object from two threads at once."""

    __slots__ = ("__weakref__", "lock", "tokenizer")

    def __init__(self, tokenizer: Any) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.lock = threading.Lock()


# The tokenizers in use, by their file as it is on disk (one changed since is read again);
# each is forgotten once no deployment holds it.
_IN_USE: weakref.WeakValueDictionary[tuple[str, int, int, int, int], SharedTokenizer] = (
    weakref.WeakValueDictionary()
)


def shared_tokenizer(source: str) -> SharedTokenizer:
    """The tokenizer `source` names, read unless one in use was read from its file as it is
    now; ConfigError if there is none."""
    file = _tokenizer_file(source)
    try:
        found = file.stat()
    except OSError:  # gone since it was found: reading it says so
        return SharedTokenizer(_read(source, file))
    key = (str(file.resolve()), found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)
    shared = _IN_USE.get(key)
    if shared is None:
        shared = _IN_USE[key] = SharedTokenizer(_read(source, file))
    return shared


def _read(source: str, file: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(
            f"upstream-tokenizer {source}: needs the tokenizers package (pip install tokenizers)"
        ) from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises its own exception types
        raise ConfigError(f"upstream-tokenizer {source}: cannot read {file}: {exc}") from None


def _tokenizer_file(source: str) -> Path:
    """The tokenizer.json `source` names: in a directory, a file, or in the local hub cache;
    ConfigError if there is none."""
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
    return file


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

    def __init__(self, tokenizer: SharedTokenizer, tokens: int) -> None:
        self._shared = tokenizer
        self.tokens = tokens

    def room(self, query: str, instruct: str | None) -> int:
        return self.tokens

    def measure(self, text: str) -> Measure:
        shared = self._shared
        with shared.lock:
            starts = starts_by(shared.tokenizer, text)
        return SpansMeasure(text, starts)

    def count_each(self, texts: Sequence[str]) -> list[int]:
        shared = self._shared
        with shared.lock:
            return counts_by(shared.tokenizer, texts)
