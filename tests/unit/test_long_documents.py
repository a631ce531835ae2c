"""Long documents: where chunks are cut, what a plan holds, and the engine's answers with them."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import unicodedata

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rerank_service.core.chunking import CallLimits, estimate_tokens
from rerank_service.core.domain import (
    BackendRequest,
    BackendResult,
    CallContext,
    LongDocuments,
    ModelInfo,
    RerankRequest,
    ScoredDocument,
    ServiceError,
)
from rerank_service.core.engine import USAGE_UPSTREAM_CHUNKS_ESTIMATED, RerankEngine
from rerank_service.core.long_documents import chunk_spans, plan
from rerank_service.core.readiness import Readiness
from rerank_service.core.text_boundaries import safe_cut, unspaced, word_boundary
from rerank_service.core.token_window import (
    COUNTED_BY_TOKENIZER,
    EstimatedWindow,
    EstimateMeasure,
    SpansMeasure,
)

# Words of every kind: Latin with accents, Cyrillic, CJK, kana, emoji with skin tones,
# ZWJ families and flags, combining marks.
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤\ufe0f"]
WORD = st.one_of(
    st.text(alphabet=st.characters(categories=("L", "N", "P", "S", "M")), min_size=1, max_size=12).map(
        # Spaced scripts only: a CJK word is one of its own, below.
        lambda word: "".join(c for c in word if not c.isspace() and not unspaced(c)) or "x"
    ),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF), min_size=1, max_size=6),
    st.sampled_from(EMOJI),
    st.sampled_from(["naïve", "cafe\u0301", "Привет", "かな", "ひらがな"]),
)
SEPARATOR = st.sampled_from([" ", "  ", "\n", "\t", ". ", "。"])


def word_spans(text: str) -> list[tuple[int, int]]:
    """Each maximal run of non-space characters: a word, in a text with spaces."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for position, character in enumerate(text):
        if character.isspace():
            if start is not None:
                spans.append((start, position))
                start = None
        elif start is None:
            start = position
    if start is not None:
        spans.append((start, len(text)))
    return spans


@st.composite
def spaced_texts(draw: st.DrawFn) -> str:
    words = draw(st.lists(WORD, min_size=1, max_size=120))
    separators = draw(st.lists(SEPARATOR, min_size=len(words), max_size=len(words)))
    # "。" is a separator only beside a space here: the property is about spaced scripts.
    return "".join(word + (" " if sep == "。" else sep) for word, sep in zip(words, separators, strict=True))


@settings(max_examples=300, deadline=None)
@given(text=spaced_texts(), window=st.integers(16, 80), overlap=st.integers(0, 20))
# A word of half the window in tokens but over half the part in characters (after a run of
# characters of several bytes each): cut inside it while the window's halves were counted
# in characters.
@example(text="一一一一一 👍🏽 000¡¡¡¡¡¡¡ࠀ𐀀 ", window=16, overlap=0)
def test_chunks_of_a_spaced_text_end_between_words_fit_and_cover_every_word(
    text: str, window: int, overlap: int
) -> None:
    spans = chunk_spans(text, EstimateMeasure(text), window, min(overlap, window // 2))
    words = word_spans(text)
    spaced = [word for word in words if not any(map(unspaced, text[word[0] : word[1]]))]
    for start, end in spans:
        # A chunk starts at a word's start and ends at a word's end: never inside a word of a
        # spaced script (a CJK word may be cut between its characters, each a word)...
        assert word_boundary(text, start), (text, start)
        assert word_boundary(text, end), (text, end)
        assert not any(a < cut < b for a, b in spaced for cut in (start, end)), (text, start, end)
        assert not text[start].isspace()
        assert not text[end - 1].isspace()
        # ...and fits, unless it is one word longer than the window.
        chunk = text[start:end]
        assert estimate_tokens(chunk) <= window or len(word_spans(chunk)) == 1
    for word in spaced:  # no word is lost between chunks, nor split across two
        assert any(start <= word[0] and word[1] <= end for start, end in spans), word
    covered = {position for start, end in spans for position in range(start, end)}
    assert all(position in covered for position, c in enumerate(text) if not c.isspace())
    assert [start for start, _ in spans] == sorted({start for start, _ in spans})  # always moving on


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(
        st.one_of(
            st.text(
                alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=30
            ),
            st.sampled_from(EMOJI),
            st.sampled_from(["\u3002", "\uff01", "e\u0301", "漢字"]),
        ),
        min_size=1,
        max_size=80,
    ).map("".join),
    window=st.integers(4, 40),
)
def test_chunks_of_unspaced_text_fit_and_never_cut_a_character_from_what_joins_it(
    text: str, window: int
) -> None:
    spans = chunk_spans(text, EstimateMeasure(text), window, window // 8)
    for start, end in spans:
        assert safe_cut(text, start), (text, start)
        assert safe_cut(text, end), (text, end)
        assert not unicodedata.combining(text[start])
        assert estimate_tokens(text[start:end]) <= window or end - start <= 8  # one joined emoji
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)


def test_a_sentence_end_near_the_window_edge_is_preferred_to_a_word_end() -> None:
    text = "one two three four five six seven eight nine. ten eleven twelve thirteen fourteen"
    spans = chunk_spans(text, EstimateMeasure(text), 17, 0)  # 51 characters: past "nine."
    assert text[spans[0][0] : spans[0][1]] == "one two three four five six seven eight nine."


def whitespace_measure(text: str) -> SpansMeasure:
    """A tokenizer of one token per word: its tokens start where words start."""
    return SpansMeasure(text, [start for start, _ in word_spans(text)])


def test_chunks_counted_by_a_tokenizer_hold_the_window_and_overlap_by_the_tokens_asked() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    spans = chunk_spans(text, whitespace_measure(text), 30, 5)
    chunks = [text[start:end].split() for start, end in spans]
    assert all(len(chunk) <= 30 for chunk in chunks)
    assert chunks[0] == [f"w{i}" for i in range(30)]
    for before, after in itertools.pairwise(chunks):
        assert before[-5:] == after[:5]  # the overlap
    assert chunks[-1][-1] == "w99"


class RecordingBackend:
    """Scores a document by whether it holds the word `answer`; counts a token per word."""

    def __init__(self, window: int | None, mode: LongDocuments = LongDocuments.TRUNCATE) -> None:
        self.requests: list[BackendRequest] = []
        self._limits = CallLimits(
            window=None if window is None else EstimatedWindow(window), long_documents=mode
        )

    @property
    def readiness(self) -> Readiness:
        return Readiness(True)

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo("m", max_documents=1000, max_query_tokens=1000, supports_instruct=False, backend="t")
        ]

    def call_limits(self, model: str) -> CallLimits:
        return self._limits

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def rerank(self, request: BackendRequest, context: CallContext) -> BackendResult:
        self.requests.append(request)
        scores = [
            ScoredDocument(index, 0.9 if "answer" in document.split() else 0.1 / (1 + index))
            for index, document in enumerate(request.documents)
        ]
        tokens = sum(len(document.split()) for document in request.documents)
        return BackendResult(scores=scores, total_tokens=tokens)


FILLER = " ".join(["filler"] * 400)  # 2,800 characters: about 934 estimated tokens
WITH_ANSWER = FILLER + " the answer is here"


def rerank(backend: RecordingBackend, **fields: object) -> object:
    engine = RerankEngine(backend, chunk_concurrency=4, max_fanout_factor=100, max_chunks_per_call=50)
    request = RerankRequest(**{"model": "m", "query": "where", "documents": [FILLER, WITH_ANSWER], **fields})  # type: ignore[arg-type]
    return asyncio.run(engine.rerank(request, CallContext()))


def test_chunk_ranks_a_document_by_its_best_chunk_and_locates_it() -> None:
    backend = RecordingBackend(window=200)
    outcome = rerank(backend, long_documents=LongDocuments.CHUNK, return_documents=True)

    first = outcome.results[0]  # type: ignore[attr-defined]
    assert first.index == 1
    assert first.score == 0.9
    assert first.chunks > 1
    assert not first.truncated
    assert first.best_chunk is not None
    assert first.best_chunk.index == first.chunks - 1
    assert "the answer is here" in WITH_ANSWER[first.best_chunk.start : first.best_chunk.end]
    assert first.text == WITH_ANSWER  # the document, not the chunk
    sent = [document for request in backend.requests for document in request.documents]
    assert all(estimate_tokens(document) <= 200 for document in sent)
    assert outcome.total_tokens == sum(len(document.split()) for document in sent)  # type: ignore[attr-defined]
    assert outcome.usage_source == USAGE_UPSTREAM_CHUNKS_ESTIMATED  # type: ignore[attr-defined]


def test_truncate_cuts_to_the_window_and_says_so() -> None:
    backend = RecordingBackend(window=200)
    outcome = rerank(backend)

    assert [r.index for r in outcome.results] == [0, 1]  # type: ignore[attr-defined]  # the answer was cut off
    assert all(r.truncated and r.chunks == 1 and r.best_chunk is None for r in outcome.results)  # type: ignore[attr-defined]
    assert all(estimate_tokens(d) <= 200 for d in backend.requests[0].documents)


def test_the_route_default_applies_and_the_request_overrides_it() -> None:
    assert rerank(RecordingBackend(200, LongDocuments.CHUNK)).results[0].index == 1  # type: ignore[attr-defined]
    truncated = rerank(RecordingBackend(200, LongDocuments.CHUNK), long_documents=LongDocuments.TRUNCATE)
    assert truncated.results[0].index == 0  # type: ignore[attr-defined]


def test_max_tokens_per_doc_narrows_the_window() -> None:
    backend = RecordingBackend(window=4000)
    rerank(backend, long_documents=LongDocuments.CHUNK, max_tokens_per_doc=100, chunk_overlap_tokens=0)
    assert max(estimate_tokens(d) for d in backend.requests[0].documents) <= 100
    assert len(backend.requests[0].documents) >= 2 * 934 // 100


def test_reject_names_the_first_document_over_the_window() -> None:
    with pytest.raises(ServiceError) as refused:
        rerank(RecordingBackend(window=200), long_documents=LongDocuments.REJECT)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in refused.value.violations] == ["documents[0]"]


def test_too_many_chunks_are_refused_before_any_is_scored() -> None:
    backend = RecordingBackend(window=20)
    with pytest.raises(ServiceError) as refused:
        rerank(backend, long_documents=LongDocuments.CHUNK)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-chunks-per-call" in refused.value.message
    assert backend.requests == []


def test_a_50_mb_document_is_refused_without_being_read_through() -> None:
    request = RerankRequest("m", "q", ["word " * 10_000_000], long_documents=LongDocuments.CHUNK)
    with pytest.raises(ServiceError, match="at least"):
        plan(request, CallLimits(window=EstimatedWindow(512)), 1000)


@pytest.mark.parametrize("lead", [3_232, 5_000])  # as long as the prefix read (101 x 32), and longer
def test_truncate_sends_the_first_words_however_many_spaces_lead(lead: int) -> None:
    words = "Paris is the capital of France. " * 50
    request = RerankRequest("m", "q", [" " * lead + words], max_tokens_per_doc=100)
    truncated = plan(request, CallLimits(window=EstimatedWindow(4000)), 1000)

    assert truncated is not None
    assert truncated.truncated == [True]
    start, end = truncated.spans[0]
    assert start == lead  # the first word's start
    assert end > start
    part = truncated.parts[0]
    assert part.startswith("Paris is the capital")
    assert words.startswith(part)
    assert estimate_tokens(part) <= 100
    assert part.endswith("France.")  # cut at a sentence's end, not inside a word


# More documents than --max-chunks-per-call, one of them over the window.
ONE_LONG_AMONG_1_200 = [f"short document number {index}" for index in range(1_200)]
ONE_LONG_AMONG_1_200[1_100] = "red apple pie. " * 1_000


@pytest.mark.parametrize("mode", [None, LongDocuments.TRUNCATE])  # None: the route's default
def test_truncate_takes_more_documents_than_max_chunks_when_one_is_long(mode: LongDocuments | None) -> None:
    request = RerankRequest("m", "q", ONE_LONG_AMONG_1_200, long_documents=mode)
    truncated = plan(request, CallLimits(window=EstimatedWindow(4000)), 1000)

    assert truncated is not None
    assert len(truncated.parts) == 1_200
    assert truncated.chunks == [1] * 1_200
    assert [index for index, cut in enumerate(truncated.truncated) if cut] == [1_100]


def test_reject_names_the_long_document_among_more_than_max_chunks() -> None:
    request = RerankRequest("m", "q", ONE_LONG_AMONG_1_200, long_documents=LongDocuments.REJECT)
    with pytest.raises(ServiceError) as refused:
        plan(request, CallLimits(window=EstimatedWindow(4000)), 1000)
    assert [v.field for v in refused.value.violations] == ["documents[1100]"]
    assert "--max-chunks-per-call" not in refused.value.message


def test_chunk_still_counts_every_document_against_max_chunks() -> None:
    request = RerankRequest("m", "q", ONE_LONG_AMONG_1_200, long_documents=LongDocuments.CHUNK)
    with pytest.raises(ServiceError, match="--max-chunks-per-call"):
        plan(request, CallLimits(window=EstimatedWindow(4000)), 1000)


class WordWindow:
    """A tokenizer's window of one token per word: spaces make no token."""

    counted_by = COUNTED_BY_TOKENIZER

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def room(self, query: str, instruct: str | None) -> int:
        return self.tokens

    def measure(self, text: str) -> SpansMeasure:
        return whitespace_measure(text)


def test_chunk_counted_by_a_tokenizer_takes_documents_long_only_in_spaces() -> None:
    sparse = ("Paris is nice. " + " " * 2_000) * 3  # 6,045 characters, 9 tokens
    documents = [sparse] * 8
    request = RerankRequest("m", "q", documents, long_documents=LongDocuments.CHUNK)
    # 8 documents, each of 9 tokens: within the window, and within 10 chunks in all.
    assert plan(request, CallLimits(window=WordWindow(100)), 10) is None


class UnreadableWindow(WordWindow):
    def measure(self, text: str) -> SpansMeasure:
        raise AssertionError("the document was read through")


def test_a_document_of_many_words_counted_by_a_tokenizer_is_refused_without_being_read_through() -> None:
    request = RerankRequest("m", "q", ["word " * 2_000_000], long_documents=LongDocuments.CHUNK)
    with pytest.raises(ServiceError, match="at least"):
        plan(request, CallLimits(window=UnreadableWindow(100)), 1000)


def test_documents_within_the_window_are_sent_as_they_are_in_every_mode() -> None:
    for mode in LongDocuments:
        request = RerankRequest("m", "q", ["short", "also short"], long_documents=mode)
        assert plan(request, CallLimits(window=EstimatedWindow(512)), 1000) is None


def test_bad_options_are_named() -> None:
    with pytest.raises(ServiceError) as refused:
        rerank(RecordingBackend(200), max_tokens_per_doc=0, chunk_overlap_tokens=-1)
    assert {v.field for v in refused.value.violations} == {"max_tokens_per_doc", "chunk_overlap_tokens"}


def test_a_backend_without_a_window_gets_documents_as_they_are() -> None:
    backend = RecordingBackend(window=None)
    outcome = rerank(backend, long_documents=LongDocuments.CHUNK)
    assert backend.requests[0].documents == [FILLER, WITH_ANSWER]
    assert all(r.chunks == 1 for r in outcome.results)  # type: ignore[attr-defined]


class CountingWindow(EstimatedWindow):
    """An estimated window that counts how often a document is measured (tokenized)."""

    measured = 0

    def measure(self, text: str) -> EstimateMeasure:
        CountingWindow.measured += 1
        return EstimateMeasure(text)


def test_chunk_on_documents_within_the_window_pays_nothing_truncate_does_not() -> None:
    documents = [" ".join(["word"] * 30)] * 100
    window = CountingWindow(4000)
    for mode in LongDocuments:
        assert (
            plan(RerankRequest("m", "q", documents, long_documents=mode), CallLimits(window=window), 100)
            is None
        )
    assert CountingWindow.measured == 0  # not one document tokenized, in any mode


def test_an_upstream_tokenizer_is_read_from_a_directory_and_never_downloaded() -> None:
    from rerank_service.backends.local.model_files import bundled_model_path
    from rerank_service.backends.upstream.tokenizer import TokenizerWindow, shared_tokenizer
    from rerank_service.config import ConfigError

    window = TokenizerWindow(shared_tokenizer(str(bundled_model_path())), 100)
    measure = window.measure("Hello wörld, 漢字 and more")
    assert measure.tokens == 7
    assert measure.fit(0, 2) == len("Hello wörld")
    with pytest.raises(ConfigError, match="never downloaded"):
        shared_tokenizer("no-such-org/no-such-model")


# --- documents whose spaces are tokens (a byte-level BPE's newlines) --------------------------------


def newline_measure(text: str) -> SpansMeasure:
    """A tokenizer of one token per word and one per newline, as Qwen's byte-level BPE counts
    a run of newlines (other spaces make no token)."""
    return SpansMeasure(text, [match.start() for match in re.finditer(r"\n|[^\s]+", text)])


class NewlineWindow(WordWindow):
    def measure(self, text: str) -> SpansMeasure:
        return newline_measure(text)


def test_back_by_no_tokens_from_the_end_of_a_text_is_its_end() -> None:
    measure = newline_measure("\nhello")
    assert measure.back(len("\nhello"), 0) == len("\nhello")
    assert measure.back(len("\nhello"), 1) == 1


@pytest.mark.parametrize("mode", [LongDocuments.TRUNCATE, LongDocuments.REJECT])
@pytest.mark.parametrize("tokens", [1, 2, 3])
@pytest.mark.parametrize("document", ["\n\n\n\nhello", "hello\n\n\n\n", "\n\nhello\n\n"])
def test_a_document_whose_text_fits_but_for_the_newlines_around_it_is_sent_without_them(
    mode: LongDocuments, tokens: int, document: str
) -> None:
    request = RerankRequest("m", "q", [document, "short"], long_documents=mode)
    sent = plan(request, CallLimits(window=NewlineWindow(tokens)), 1000)

    assert sent is not None
    assert sent.parts == ["hello", "short"]
    assert sent.truncated == [False, False]  # no word was cut off, none refused
    assert sent.chunks == [1, 1]


@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_truncate_to_a_window_of_fewer_than_4_tokens_cuts_a_document_led_by_newlines(tokens: int) -> None:
    words = "one two three four five"
    request = RerankRequest("m", "q", ["\n\n" + words])
    truncated = plan(request, CallLimits(window=NewlineWindow(tokens)), 1000)

    assert truncated is not None
    assert truncated.parts == [" ".join(words.split()[:tokens])]
    assert truncated.truncated == [True]


def test_a_chunk_that_reaches_the_trailing_newlines_is_the_last() -> None:
    text = " ".join(f"w{i}" for i in range(8)) + "\n" * 6  # 8 words: one 8-token chunk, but for the newlines
    assert chunk_spans(text, newline_measure(text), 8, 2) == [(0, len(text.rstrip()))]


# --- a tokenizer whose normalizer lengthens a text (NFKC: XLM-R's) -------------------------------


class NfkcWindow(WordWindow):
    """A tokenizer's window of one token per character of a text's NFKC form (spaces make none),
    each at the character it came from: U+FDFA, 3 bytes, is 18 characters, 15 of them tokens."""

    def measure(self, text: str) -> SpansMeasure:
        starts = [
            position
            for position, character in enumerate(text)
            for normalized in unicodedata.normalize("NFKC", character)
            if not normalized.isspace()
        ]
        return SpansMeasure(text, starts)


EXPANDING = "\ufdfa" * 14  # 42 bytes: 210 tokens once normalized


@pytest.mark.parametrize("mode", list(LongDocuments))
def test_a_document_its_normalizer_lengthens_past_the_window_is_never_taken_to_fit(
    mode: LongDocuments,
) -> None:
    """Taken to fit by its 42 bytes, it was sent whole: REJECT let it through, CHUNK sent one
    chunk, TRUNCATE said it was not cut, and the model cut it silently."""
    request = RerankRequest("m", "q", [EXPANDING, "cat dog"], long_documents=mode)
    limits = CallLimits(window=NfkcWindow(64))
    if mode is LongDocuments.REJECT:
        with pytest.raises(ServiceError) as refused:
            plan(request, limits, 1000)
        assert [v.field for v in refused.value.violations] == ["documents[0]"]
        return
    planned = plan(request, limits, 1000)

    assert planned is not None
    assert all(NfkcWindow(64).measure(part).tokens <= 64 for part in planned.parts)
    if mode is LongDocuments.CHUNK:
        assert planned.chunks == [4, 1]
    else:
        assert planned.truncated == [True, False]


def test_documents_normalization_leaves_as_they_are_still_fit_without_being_read() -> None:
    # NFKC changes the last three (full-width punctuation, a no-break space, an ellipsis,
    # ½), shortening all but ½ by little: each is bounded by its NFKC form's bytes, unread
    # (they were tokenized, on the event loop: 6x the CPU of a Chinese call).
    full_width = "北京\uff0c中国\uff01\uff08首都\uff09"  # full-width comma, !, ( and )
    documents = ["naïve café", "漢字 and かな", "Привет", full_width, "a\u00a0b…", "½ cup"]
    for mode in LongDocuments:
        request = RerankRequest("m", "q", documents, long_documents=mode)
        assert plan(request, CallLimits(window=UnreadableWindow(100)), 1000) is None


# --- --max-chunks-per-call, the route's window -----------------------------------------------------


def test_chunk_counts_documents_within_the_window_against_max_chunks_and_reads_none() -> None:
    documents = [f"short document number {index}" for index in range(1_500)]
    window = CountingWindow(4000)
    CountingWindow.measured = 0
    request = RerankRequest("m", "q", documents, long_documents=LongDocuments.CHUNK)
    with pytest.raises(ServiceError) as refused:
        plan(request, CallLimits(window=window), 1000)

    assert [v.field for v in refused.value.violations] == ["documents"]
    assert "1,500" in refused.value.message
    assert "--max-chunks-per-call" in refused.value.message
    assert CountingWindow.measured == 0
    for mode in (LongDocuments.TRUNCATE, LongDocuments.REJECT):  # one part a document: not counted
        assert (
            plan(RerankRequest("m", "q", documents, long_documents=mode), CallLimits(window=window), 1000)
            is None
        )


def test_chunk_under_a_route_window_too_small_to_chunk_names_the_setting_not_the_query() -> None:
    request = RerankRequest("m", "q", ["pear plum grape apple " * 10], long_documents=LongDocuments.CHUNK)
    limits = CallLimits(window=EstimatedWindow(4000), max_tokens_per_doc=4)  # the route's default
    with pytest.raises(ServiceError) as refused:
        plan(request, limits, 1000)

    [violation] = refused.value.violations
    assert violation.field == "max_tokens_per_doc"
    assert "route's default" in violation.description
    assert "query" not in violation.description
    # The caller's own value replaces the route's.
    assert plan(dataclasses.replace(request, max_tokens_per_doc=8), limits, 1000) is not None


class SharedWordWindow(WordWindow):
    """A local model's window of one token per word, shared with the query and instruct."""

    def room(self, query: str, instruct: str | None) -> int:
        return self.tokens - len(query.split()) - len((instruct or "").split())


@pytest.mark.parametrize(
    ("query", "instruct", "field"),
    [("q " * 30, None, "query"), ("q " * 600, None, "query"), ("q", "i " * 30, "instruct")],
)
def test_reject_where_the_query_or_instruct_fills_the_window_names_it_not_a_document(
    query: str, instruct: str | None, field: str
) -> None:
    # The window of 32 leaves 2 tokens beside a 30-word query (or instruct), none beside a
    # 600-word one: too little for any document, even a two-word one.
    limits = CallLimits(window=SharedWordWindow(32))
    for documents in (["bread flour"], ["bread flour " * 400]):
        request = RerankRequest("m", query, documents, instruct=instruct, long_documents=LongDocuments.REJECT)
        with pytest.raises(ServiceError) as refused:
            plan(request, limits, 1000)

        [violation] = refused.value.violations
        assert violation.field == field
        assert f"send a shorter {field}" in violation.description


def test_reject_under_the_callers_own_max_tokens_per_doc_names_the_document() -> None:
    request = RerankRequest(
        "m", "q " * 20, ["bread flour " * 10], max_tokens_per_doc=4, long_documents=LongDocuments.REJECT
    )
    with pytest.raises(ServiceError) as refused:  # the query leaves 12: the caller asked for 4
        plan(request, CallLimits(window=SharedWordWindow(32)), 1000)
    assert [v.field for v in refused.value.violations] == ["documents[0]"]


# --- flags ---------------------------------------------------------------------------------------


def test_a_run_of_flags_may_be_cut_between_two_flags_never_inside_one() -> None:
    flags = "🇫🇷🇩🇪🇯🇵"  # three flags: six regional indicators
    assert [safe_cut(flags, position) for position in range(len(flags) + 1)] == [
        True, False, True, False, True, False, True,
    ]  # fmt: skip
    assert safe_cut("a" + flags, 3)  # the run's own count, whatever comes before it
    assert not safe_cut("a" + flags, 2)
    # Read back no further than a place known to be between flags.
    assert safe_cut("🇫" + flags, 3, floor=1)


def test_a_run_of_flags_longer_than_the_window_is_chunked_within_it_between_flags() -> None:
    text = "🇫🇷🇩🇪" * 1500 + " end"  # 24,004 bytes: about 8,000 estimated tokens
    spans = chunk_spans(text, EstimateMeasure(text), 4000, 500)

    assert len(spans) >= 2
    assert all(estimate_tokens(text[start:end]) <= 4000 for start, end in spans)
    run = 6_000  # the flags' regional indicators: a cut among them falls after an even number
    assert all(cut % 2 == 0 for span in spans for cut in span if cut <= run)
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
