"""Long documents as a real tokenizer measures them: how much of a document is tokenized, with
Python's lock let go, and chunks that fit the window by their own tokens."""

from __future__ import annotations

import base64
import random
import re
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from transformers import AutoTokenizer

from rerank_service.backends.local.common import GuardedTokenizer
from rerank_service.backends.local.model_files import bundled_model_path
from rerank_service.backends.local.models import load_scorer
from rerank_service.backends.local.scorer import Scorer
from rerank_service.backends.local.window import ReadsDocuments, ScorerWindow
from rerank_service.backends.upstream.tokenizer import TokenizerWindow, shared_tokenizer
from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import LongDocuments, RerankRequest, ServiceError
from rerank_service.core.long_documents import plan
from rerank_service.core.token_window import COUNTED_BY_TOKENIZER, SpansMeasure

TEXT = "Hello wörld, 漢字 and more. Ünïcödé 😀 👍🏽 x" * 50 + "  \n tail"


@pytest.fixture(scope="module")
def bundled(offline: None) -> Scorer:
    return load_scorer("bundled", "cpu", "float32")


def window_of(scorer: Scorer) -> ScorerWindow:
    assert isinstance(scorer, ReadsDocuments)
    return ScorerWindow(scorer)


def test_token_starts_are_the_offsets_encode_gives(offline: None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()  # transformers sets the model's
    expected = [start for start, _ in backend.encode(TEXT, add_special_tokens=False).offsets]

    assert GuardedTokenizer(tokenizer).token_starts(TEXT) == expected
    window = TokenizerWindow(shared_tokenizer(str(bundled_model_path())), 100)
    assert window.measure(TEXT).tokens == len(expected)
    assert window.measure(TEXT).fit(0, 7) == expected[7]
    assert window.count_each([TEXT, "Hello", ""]) == [len(expected), 1, 0]


def progress_while(work: Callable[[], object], rounds: int) -> int:
    """Hand a token back and forth with another thread while `work` runs in a third: how many
    of `rounds` hand-offs were made before `work` ended. Each hand-off needs Python's lock,
    and no thread is made to let it go at a time slice's end (the switch interval is set
    far out): none is made while `work` holds it, however long it takes."""
    started, done = threading.Event(), threading.Event()
    ping, pong = threading.Event(), threading.Event()

    def run() -> None:
        started.set()
        try:
            work()
        finally:
            done.set()
            ping.set()  # the other thread ends at once

    def answer() -> None:
        while not done.is_set():
            ping.wait()
            ping.clear()
            pong.set()

    threads = [threading.Thread(target=run), threading.Thread(target=answer)]
    threads[1].start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(600)
    try:
        threads[0].start()
        assert started.wait(60)
        made = 0
        while made < rounds and not done.is_set():
            ping.set()
            while not pong.wait(0.1):  # a bound only: the other thread ends with `work`
                if done.is_set():
                    break
            pong.clear()
            if not done.is_set():
                made += 1
    finally:
        sys.setswitchinterval(interval)
    for thread in threads:
        thread.join(60)
    return made


@pytest.mark.parametrize("counted_by", ["model", "tokenizer"])
def test_measuring_a_long_document_lets_other_threads_run_while_it_is_tokenized(
    bundled: Scorer, counted_by: str
) -> None:
    """tokenizers' encode() held Python's lock for the whole document: a 6 MB one stopped the
    event loop, every other call and health check, for seconds, though planned in a thread
    (CHUNK measures a document whole: a local model's window, or an upstream's tokenizer)."""
    window = (
        window_of(bundled)
        if counted_by == "model"
        else TokenizerWindow(shared_tokenizer(str(bundled_model_path())), 100)
    )
    # Words of 150 characters (each one unknown token): much to tokenize, few offsets to read.
    document = " ".join(["x" * 150] * 3_000)

    # With encode(), not one hand-off until the whole document is tokenized.
    assert progress_while(lambda: window.measure(document), rounds=10) == 10


class CountingWindow:
    """A tokenizer's window of one token per word that keeps what it was given to measure."""

    counted_by = COUNTED_BY_TOKENIZER

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.measured: list[int] = []

    def room(self, query: str, instruct: str | None) -> int:
        return self.tokens

    def measure(self, text: str) -> SpansMeasure:
        self.measured.append(len(text))
        return SpansMeasure(text, [match.start() for match in re.finditer(r"\S+", text)])


def test_chunk_refuses_a_document_of_too_many_chunks_having_tokenized_only_the_first_of_it() -> None:
    # Within the early bound (32 characters a token), and 14,000 tokens: about 160 chunks of 100.
    document = "w " * 14_000
    window = CountingWindow(100)
    request = RerankRequest("m", "q", [document], long_documents=LongDocuments.CHUNK)

    with pytest.raises(ServiceError, match="or more chunks; one call may score at most 10 "):
        plan(request, CallLimits(window=window), 10)

    assert sum(window.measured) <= len(document) // 4


def test_chunk_still_measures_a_document_within_the_budget_whole() -> None:
    document = "word " * 5_600
    window = CountingWindow(100)
    request = RerankRequest("m", "q", [document], long_documents=LongDocuments.CHUNK)

    parts = plan(request, CallLimits(window=window), 100)

    assert parts is not None
    assert len(parts.parts) == 64
    assert len(document) in window.measured


def test_truncate_of_a_document_of_long_tokens_measures_a_prefix_not_the_whole_document() -> None:
    """Every token over 32 characters: the document was measured whole (6 MB: seconds)."""
    words = [f"{index:05d}" + "x" * 145 for index in range(20_000)]
    document = " ".join(words)
    window = CountingWindow(100)
    request = RerankRequest("m", "q", [document], long_documents=LongDocuments.TRUNCATE)

    parts = plan(request, CallLimits(window=window), 1_000)

    assert parts is not None
    assert parts.parts == [" ".join(words[:100])]
    assert sum(window.measured) <= 20 * 100 * 151


def b64_document() -> str:
    """A document of one long run without spaces: chunks start inside it."""
    noise = random.Random(0)
    return "Token follows: " + base64.b64encode(bytes(noise.randrange(256) for _ in range(3_000))).decode()


def own_tokens(scorer: Scorer, parts: list[str]) -> Iterator[int]:
    return (scorer.count_tokens(part) for part in parts)


def test_every_chunk_fits_the_window_by_its_own_tokens(bundled: Scorer) -> None:
    """A chunk starting inside a word is more tokens alone than the whole text's tokens
    counted for it: the model cut its end, and those characters were never scored."""
    document = b64_document()
    window = window_of(bundled)
    room = window.room("secret", None)

    parts = plan(
        RerankRequest("m", "secret", [document], long_documents=LongDocuments.CHUNK),
        CallLimits(window=window),
        1_000,
    )

    assert parts is not None
    assert len(parts.parts) > 1
    assert max(own_tokens(bundled, parts.parts)) <= room
    # Every character is in a chunk.
    covered = [False] * len(document)
    for start, end in parts.spans:
        covered[start:end] = [True] * (end - start)
    assert all(covered[index] for index, character in enumerate(document) if not character.isspace())
