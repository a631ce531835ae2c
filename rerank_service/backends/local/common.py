"""What the three scorers share: the load errors, batch padding, a guarded tokenizer.

Everything here imports torch; load it only when the local backend is used.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Defined with the source resolution, which imports no torch; re-exported for the scorers.
from rerank_service.backends.local.model_files import ModelLoadError as ModelLoadError
from rerank_service.core.token_window import counts_by, starts_by

T = TypeVar("T")

# What an engine's forward pass returns: a cross-encoder's logits or a bi-encoder's token embeddings.
Output = Literal["logits", "last_hidden_state"]


class GuardedTokenizer:
    """A tokenizer that one thread at a time may call.

    A fast tokenizer sets truncation and padding on its shared Rust object for every
    call, so two threads tokenizing at once can fail ("Already borrowed") or see each
    other's settings. Tokenizing is cheap next to the model, so a lock costs little.

    The event loop counts tokens too (the engine plans a small call's long documents
    there), but encoding a large call holds the lock for seconds in a worker thread. So
    the loop counts with a copy of its own, under a lock no worker thread takes: it never
    waits behind an encode. One copy, not one per thread: a large vocabulary is megabytes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._loop_tokenizer = copy.deepcopy(tokenizer)
        self._loop_lock = threading.Lock()

    def run(self, work: Callable[[PreTrainedTokenizerBase], T]) -> T:
        with self._lock:
            return work(self.tokenizer)

    def _count_with(self, work: Callable[[PreTrainedTokenizerBase], T]) -> T:
        """`work` on the loop's copy when called on an event loop's thread, else as `run`."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a worker thread: it may wait
            return self.run(work)
        with self._loop_lock:
            return work(self._loop_tokenizer)

    def count(self, text: str) -> int:
        """Tokens of `text` alone, without special tokens and without truncation."""
        return self._count_with(
            lambda tok: len(tok(text, add_special_tokens=False, truncation=False)["input_ids"])
        )

    def token_starts(self, text: str) -> list[int]:
        """Where each token of `text` starts (characters), without special tokens or truncation."""

        return self._count_with(lambda tokenizer: starts_by(_bare(tokenizer), text))

    def count_each(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text alone (as `count`), tokenized in one batch."""
        return self._count_with(lambda tokenizer: counts_by(_bare(tokenizer), texts))

    @property
    def pad_token_id(self) -> int:
        # Some tokenizers have no pad token; any id works under a zero attention mask.
        pad = self.tokenizer.pad_token_id
        return pad if isinstance(pad, int) else 0


def _bare(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The fast tokenizer's `tokenizers` object, without truncation or padding (transformers
    sets them again before each call of its own)."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return backend


class CountsTokens:
    """Scorer.count_tokens and token_starts for a scorer that keeps its tokenizer guarded in `_tokenizer`."""

    _tokenizer: GuardedTokenizer

    def count_tokens(self, text: str) -> int:
        return self._tokenizer.count(text)

    def token_starts(self, text: str) -> list[int]:
        return self._tokenizer.token_starts(text)

    def count_each(self, texts: Sequence[str]) -> list[int]:
        return self._tokenizer.count_each(texts)


def pad_batch(
    rows: Sequence[Sequence[int]], pad_value: int, *, left: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `rows` into one (batch, longest) tensor and its attention mask."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        start = width - len(row) if left else 0
        ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start : start + len(row)] = 1
    return ids.to(device), mask.to(device)


def for_inference(model: PreTrainedModel, device: str | torch.device | None = None) -> PreTrainedModel:
    """The model in eval mode (no dropout), moved to `device` when one is given."""
    # transformers wraps to() and eval() in ways mypy cannot follow: Any at this boundary.
    boundary: Any = model
    if device is not None:
        boundary = boundary.to(device)
    ready: PreTrainedModel = boundary.eval()
    return ready


def accepts_argument(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward() takes `name` (optional kwargs differ across architectures)."""
    return name in inspect.signature(model.forward).parameters


# Models whose position ids start after the padding token's id (RoBERTa's embeddings): the
# first pad_token_id + 1 of their max_position_embeddings are never a token's (514 -> 512).
_POSITIONS_AFTER_PADDING = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer", "data2vec-text", "ibert"}
)


def max_positions(config: Any) -> int | None:
    """The model's position window from its config, when it declares one: the tokens it
    can read (a longer input fails the whole batch in the embeddings)."""
    value = getattr(config, "max_position_embeddings", None)
    if not isinstance(value, int) or value <= 0:
        return None
    if getattr(config, "model_type", None) in _POSITIONS_AFTER_PADDING:
        value -= (getattr(config, "pad_token_id", None) or 0) + 1
    return value if value > 0 else None


# Encoder models (cross- and bi-encoders) are trained on short passages, and BERT-style
# models cannot read further anyway.
ENCODER_WINDOW_CAP = 512


def encoder_window(config: Any, tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int:
    """An encoder's window: the smallest of the cap, the tokenizer's, the positions' and the asked."""
    limits = [ENCODER_WINDOW_CAP, tokenizer.model_max_length]
    if (positions := max_positions(config)) is not None:
        limits.append(positions)
    if max_length is not None:
        limits.append(max_length)
    return int(min(limits))


def model_device(model: torch.nn.Module) -> str:
    """The device of the model's weights, spelled as torch does ("cpu", "cuda:0")."""
    return str(next(model.parameters()).device)


def model_dtype(model: torch.nn.Module) -> str:
    """The dtype of the model's weights: "float32", "bfloat16", "float16"."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def load_error(what: str, path: Path, exc: BaseException) -> ModelLoadError:
    """One sentence for a failed from_pretrained(): what, where, and the cause's first line."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"cannot load the {what} from {path}: {reason.rstrip('.')}")


def require_vocabulary(tokenizer: PreTrainedTokenizerBase, what: str, path: Path) -> None:
    """Refuse a tokenizer that knows no word: transformers makes one of the special tokens alone
    from a directory without tokenizer files (config.json and weights only), and the model then
    read every word as unknown and ranked noise, its load logged as a success."""
    words = set(tokenizer.get_vocab()) - set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)
    if not words:
        raise ModelLoadError(
            f"cannot load the {what} from {path}: it has no tokenizer files (tokenizer.json, "
            "vocab.txt, sentencepiece.bpe.model or the like): every word would read as unknown"
        )


def require_fast(tokenizer: PreTrainedTokenizerBase, what: str, path: Path) -> None:
    """Refuse a Python-only ("slow") tokenizer (BertJapaneseTokenizer, PhoBERT's, ByT5's): long
    documents are measured by a `tokenizers` one's offsets, so such a model loaded and then
    failed every call with a document over its window (INTERNAL)."""
    if not tokenizer.is_fast:
        raise ModelLoadError(
            f"cannot load the {what} from {path}: it needs a fast (tokenizers) tokenizer to measure "
            f"long documents; {type(tokenizer).__name__} has none"
        )


@contextmanager
def loading(what: str, path: Path) -> Iterator[None]:
    """Turn anything from_pretrained() raises into a load_error; a ModelLoadError passes as it is."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise load_error(what, path, exc) from exc


@contextmanager
def using_as(what: str, path: Path) -> Iterator[None]:
    """Say which model a ModelLoadError from a scorer's constructor (the model does not fit) is about."""
    try:
        yield
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot use the model in {path} as a {what}: {exc}") from exc
