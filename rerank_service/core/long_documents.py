"""Long documents: cut each to the window (TRUNCATE), score every part (CHUNK), or refuse (REJECT).

The engine plans a call's documents against the deployment's window (core/token_window.py)
before anything is scored: a document within the window is sent as it is; a longer one is
cut at a sentence or word boundary (core/text_boundaries.py) to fit, or split into parts
that overlap by `chunk_overlap_tokens`. The parts are scored like any other documents
(split into backend calls, cached, batched) and a chunked document's score is its best
part's. A call whose documents all fit pays one cheap bound check and nothing else.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

# A window smaller than MIN_CHUNK_TOKENS leaves no room to chunk usefully: the routes'
# configuration checks a route's own max_tokens_per_doc against it at load (re-exported).
from rerank_service.config.routes import MIN_CHUNK_TOKENS as MIN_CHUNK_TOKENS
from rerank_service.core.chunking import CallLimits, text_bytes
from rerank_service.core.domain import (
    BackendResult,
    BestChunk,
    FieldViolation,
    LongDocuments,
    RankedDocument,
    RerankRequest,
    ScoredDocument,
    invalid_argument,
)
from rerank_service.core.text_boundaries import cut_before, safe_cut, skip_space, trim_end, word_start_from
from rerank_service.core.token_window import (
    COUNTED_BY_ESTIMATE,
    MAX_CHARACTERS_PER_TOKEN,
    CountsEach,
    Measure,
    TokenWindow,
)

# The default overlap of neighbouring chunks: this share of the window.
DEFAULT_OVERLAP_SHARE = 8
# Characters a token of a long document is taken to hold where CHUNK sizes the first prefix
# it measures (about English's): a prefix that makes too few parts grows.
_PREFIX_CHARACTERS_PER_TOKEN = 4
# A run of spaces (str.isspace's: re's \s on a str pattern).
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class DocumentParts:
    """How one document is scored: its parts' [start, end) character spans."""

    spans: list[tuple[int, int]]
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    """A call's documents as parts: what the backends score, and whose part each one is."""

    parts: list[str]
    owners: list[int]  # the document each part is of
    ordinals: list[int]  # the part's index within its document
    spans: list[tuple[int, int]]
    truncated: list[bool]  # per document
    chunks: list[int]  # per document
    # The window was estimated (no tokenizer): said in the outcome's usage_source.
    estimated: bool

    def scored_request(self, request: RerankRequest, chunked: bool) -> RerankRequest:
        """What the backends score: the parts, every one scored when a document has several."""
        return RerankRequest(
            model=request.model,
            query=request.query,
            documents=self.parts,
            # A document's best part needs every part's score; top_n applies to documents.
            top_n=None if chunked else request.top_n,
            instruct=request.instruct,
        )

    def rank(self, merged: BackendResult, request: RerankRequest) -> list[RankedDocument]:
        """Each document scored by its best part, sorted (ties in input order), cut to top_n."""
        best: dict[int, ScoredDocument] = {}
        for scored in merged.scores:
            owner = self.owners[scored.index]
            held = best.get(owner)
            if (
                held is None
                or scored.score > held.score
                or (scored.score == held.score and scored.index < held.index)
            ):
                best[owner] = scored
        ordered = sorted(best.items(), key=lambda item: (-item[1].score, item[0]))
        if request.top_n is not None:
            del ordered[request.top_n :]
        ranked = []
        for owner, scored in ordered:
            chunks = self.chunks[owner]
            start, end = self.spans[scored.index]
            ranked.append(
                RankedDocument(
                    index=owner,
                    score=scored.score,
                    text=request.documents[owner] if request.return_documents else None,
                    truncated=self.truncated[owner],
                    chunks=chunks,
                    best_chunk=BestChunk(self.ordinals[scored.index], start, end) if chunks > 1 else None,
                )
            )
        return ranked


def mode_of(request: RerankRequest, limits: CallLimits) -> LongDocuments:
    return request.long_documents or limits.long_documents


def violations(request: RerankRequest) -> list[FieldViolation]:
    """The long-document options' own checks (the window is the deployment's to know)."""
    found = []
    if request.max_tokens_per_doc is not None and request.max_tokens_per_doc < 1:
        found.append(
            FieldViolation(
                "max_tokens_per_doc", f"must be at least 1 when set, got {request.max_tokens_per_doc}"
            )
        )
    if request.chunk_overlap_tokens is not None and request.chunk_overlap_tokens < 0:
        found.append(
            FieldViolation(
                "chunk_overlap_tokens", f"must be 0 or more when set, got {request.chunk_overlap_tokens}"
            )
        )
    return found


def window_tokens(request: RerankRequest, limits: CallLimits, window: TokenWindow) -> int:
    """Tokens a document may have in this call: the deployment's room beside the query,
    or less where the caller or the route asks for less."""
    room = window.room(request.query, request.instruct)
    asked = request.max_tokens_per_doc or limits.max_tokens_per_doc
    return max(1, room if asked is None else min(room, asked))


def plan(request: RerankRequest, limits: CallLimits, max_chunks: int) -> Plan | None:
    """The call's documents as parts, or None when every document fits (sent as it is).

    Raises INVALID_ARGUMENT for REJECT and a document over the window, and for CHUNK when
    the parts would be more than `max_chunks` (--max-chunks-per-call).
    """
    window = limits.window
    if window is None:
        return None
    tokens = window_tokens(request, limits, window)
    documents = request.documents
    mode = mode_of(request, limits)
    if mode is LongDocuments.CHUNK and len(documents) > max_chunks:
        # A document within the window is one chunk: the limit holds whether or not one is long.
        raise _too_many_chunks(
            f"at least {len(documents):,}", max_chunks, "send fewer documents, or choose TRUNCATE"
        )
    if _surely_fit(documents, tokens, window):
        return None  # the usual case: one pass in C over the lengths
    if mode is LongDocuments.CHUNK:
        if tokens < MIN_CHUNK_TOKENS:
            raise _too_little_room(request, window, tokens)
        _refuse_many_chunks_at_once(documents, tokens, _overlap(request, tokens), max_chunks, window)
    elif mode is LongDocuments.REJECT:
        _refuse_crowded_out(request, window)
    layouts: list[DocumentParts | None] = []
    chunks_so_far = 0
    for index, document in enumerate(documents):
        # Chunks of the other documents, at least: those so far, and one for each after this one.
        others = chunks_so_far + len(documents) - index - 1
        layout = _layout(document, index, tokens, mode, request, window, others, max_chunks)
        layouts.append(layout)
        if mode is LongDocuments.CHUNK:  # TRUNCATE and REJECT send one part a document at most
            chunks_so_far += 1 if layout is None else len(layout.spans)
            if chunks_so_far > max_chunks:
                raise _too_many_chunks(f"{chunks_so_far:,} or more", max_chunks)
    if all(layout is None for layout in layouts):
        return None
    return _expand(documents, layouts, window.counted_by == COUNTED_BY_ESTIMATE)


def _too_little_room(request: RerankRequest, window: TokenWindow, tokens: int) -> Exception:
    """CHUNK with under MIN_CHUNK_TOKENS for a document, naming what narrowed the window: the
    caller's max_tokens_per_doc, else the route's where the query leaves room, else the query."""
    asked = request.max_tokens_per_doc is not None and request.max_tokens_per_doc < MIN_CHUNK_TOKENS
    # Where the query leaves room, the route's own max_tokens_per_doc took it: the query is not
    # to blame (a route that chunks by default is refused one at load; a call may ask CHUNK).
    routed = not asked and window.room(request.query, request.instruct) >= MIN_CHUNK_TOKENS
    field = "max_tokens_per_doc" if asked or routed else _crowding(request, window)
    problem = (
        f"leaves {tokens} tokens of the window for a document; chunking needs at least {MIN_CHUNK_TOKENS}"
    )
    if routed:
        problem = f"unset, the route's default {problem}: send {MIN_CHUNK_TOKENS} or more"
    elif not asked:
        problem += f": send a shorter {field}"
    return invalid_argument([FieldViolation(field, problem)])


def _refuse_crowded_out(request: RerankRequest, window: TokenWindow) -> None:
    """REJECT where the query (or instruct) leaves a document under MIN_CHUNK_TOKENS of the
    window, and the caller's max_tokens_per_doc did not narrow it further: refused on what
    crowds it, as a TRUNCATE call is by the local model (MIN_DOCUMENT_TOKENS), rather than on
    a document, however short, over the 1 token left (window_tokens)."""
    room = window.room(request.query, request.instruct)
    asked = request.max_tokens_per_doc
    if room >= MIN_CHUNK_TOKENS or (asked is not None and asked < room):
        return
    if window.room("", None) < MIN_CHUNK_TOKENS:
        return  # the window itself is that small (an upstream's, set so): no query crowds it
    field = _crowding(request, window)
    raise invalid_argument(
        [
            FieldViolation(
                field,
                f"leaves {max(room, 0)} tokens of the window for a document; at least "
                f"{MIN_CHUNK_TOKENS} are needed: send a shorter {field}",
            )
        ]
    )


def _crowding(request: RerankRequest, window: TokenWindow) -> str:
    """What leaves a document too little room: the instruction, where the query alone leaves
    enough (the model reads the instruction in the same window), else the query."""
    if request.instruct and window.room(request.query, None) >= MIN_CHUNK_TOKENS:
        return "instruct"
    return "query"


def _surely_fit(documents: Sequence[str], tokens: int, window: TokenWindow) -> bool:
    """Whether every document fits, from a bound on its tokens that needs no tokenizer:
    an estimate is at most ceil(bytes / 3), a tokenizer's count at most bytes + 1 (a token
    holds one byte or more; a sentencepiece word marker may add one) where its normalizer
    leaves the text as it is (else of its NFKC form: _token_bound), and a character is 4
    bytes at most."""
    longest = max(map(len, documents), default=0)
    if window.counted_by == COUNTED_BY_ESTIMATE:
        if -(-4 * longest // 3) <= tokens:
            return True
        return all(-(-text_bytes(document) // 3) <= tokens for document in documents)
    if 4 * longest + 1 <= tokens and (all(map(str.isascii, documents)) or all(map(_nfkc, documents))):
        return True
    return all(_token_bound(document) <= tokens for document in documents)


# Whether NFKC normalization leaves a text as it is (a quick check, in C).
_nfkc = partial(unicodedata.is_normalized, "NFKC")


def _token_bound(text: str) -> int:
    """At most how many tokens a tokenizer makes of `text`: its bytes + 1, or those of its
    NFKC form where that is longer. NFKC (XLM-R's, and most sentencepiece models')
    lengthens some characters (U+FDFA, 3 bytes, into 18 characters): such a document,
    bounded by its own bytes, was sent whole where REJECT should refuse it, CHUNK chunk it,
    TRUNCATE say so. (Most text NFKC changes it shortens, as full-width punctuation: it is
    bounded in C, never tokenized for it.)"""
    size = text_bytes(text)
    if text.isascii() or _nfkc(text):
        return size + 1
    return max(size, text_bytes(unicodedata.normalize("NFKC", text))) + 1


def _overlap(request: RerankRequest, tokens: int) -> int:
    asked = request.chunk_overlap_tokens
    overlap = tokens // DEFAULT_OVERLAP_SHARE if asked is None else asked
    return min(overlap, tokens // 2)  # at most half: every part moves the start on


def _refuse_many_chunks_at_once(
    documents: Sequence[str], tokens: int, overlap: int, max_chunks: int, window: TokenWindow
) -> None:
    """Refuse, before any tokenizing, a call whose parts are surely too many (a 50 MB document).

    The estimate counts every byte, spaces too; a tokenizer may make no token of a space,
    so where one counts only a document's other characters bound its tokens."""
    step = (tokens - overlap) * MAX_CHARACTERS_PER_TOKEN  # the most characters a part moves on
    fewest = sum(max(1, -(-len(document) // step)) for document in documents)
    if fewest > max_chunks and window.counted_by != COUNTED_BY_ESTIMATE:
        fewest = sum(
            max(1, -(-_unspaced_length(document) // step)) if len(document) > step else 1
            for document in documents
        )
    if fewest > max_chunks:
        raise _too_many_chunks(f"at least {fewest:,}", max_chunks)


def _unspaced_length(text: str) -> int:
    """Characters of `text` that are not spaces (str.isspace's), counted in C."""
    return len(_SPACES.sub("", text))


def _too_many_chunks(
    count: str,
    max_chunks: int,
    advice: str = "send fewer or shorter documents, or a larger max_tokens_per_doc",
) -> Exception:
    return invalid_argument(
        [
            FieldViolation(
                "documents",
                f"would be split into {count} chunks; one call may score at most {max_chunks:,} "
                f"(--max-chunks-per-call): {advice}",
            )
        ]
    )


def _layout(
    document: str,
    index: int,
    tokens: int,
    mode: LongDocuments,
    request: RerankRequest,
    window: TokenWindow,
    others: int,
    max_chunks: int,
) -> DocumentParts | None:
    if window.counted_by == COUNTED_BY_ESTIMATE:
        if -(-text_bytes(document) // 3) <= tokens:
            return None
    elif _token_bound(document) <= tokens:
        return None
    if mode is LongDocuments.CHUNK:
        return _chunk_layout(document, tokens, _overlap(request, tokens), window, others, max_chunks)
    # TRUNCATE and REJECT read only as far as the window: a prefix long enough to hold it
    # from where the part starts (a part never starts with spaces, nor is blank).
    start = skip_space(document, 0)
    size = (tokens + 1) * MAX_CHARACTERS_PER_TOKEN
    while True:
        prefix = document[: start + size]
        measure = window.measure(prefix)
        reach = measure.fit(start, tokens)
        if len(prefix) == len(document) or reach < len(prefix):
            break
        # The window reaches past the prefix (tokens of over 32 characters: words a tokenizer
        # reads as one unknown token): twice as long, never the whole of a document of megabytes.
        size *= 2
    if measure.tokens <= tokens and len(prefix) == len(document):
        return None
    if _only_spaces_from(document, reach):
        # The text fits, measured from its first word: only the spaces around it, which some
        # tokenizers make tokens of (a byte-level BPE's newlines), do not. Sent without them,
        # neither cut nor refused, as CHUNK sends such a document as one chunk.
        return DocumentParts([(start, trim_end(document, start, reach))])
    if mode is LongDocuments.REJECT:
        raise invalid_argument(
            [
                FieldViolation(
                    f"documents[{index}]",
                    f"has more than {tokens} tokens, the window a document has beside this query "
                    "(long_documents REJECT): send it shorter, or choose TRUNCATE or CHUNK",
                )
            ]
        )
    end = trim_end(document, start, _cut(prefix, measure, start, reach, tokens))
    return DocumentParts([(start, end)], truncated=True)


def _chunk_layout(
    document: str, tokens: int, overlap: int, window: TokenWindow, others: int, max_chunks: int
) -> DocumentParts | None:
    """CHUNK's parts of `document`, or None where it fits. Measured as far as the call's
    chunks reach, not further: a prefix that makes more parts than the call may still have
    refuses it (a 6 MB document was tokenized whole, for seconds, to be refused)."""
    budget = max(1, max_chunks - others)  # the parts this document may have
    size = (budget + 2) * tokens * _PREFIX_CHARACTERS_PER_TOKEN
    while True:
        prefix = _prefix(document, size)
        measure = window.measure(prefix)
        if len(prefix) == len(document):
            break
        parts = len(chunk_spans(prefix, measure, tokens, overlap))
        # The prefix's last part or two may end elsewhere in the whole document (cut short by
        # the prefix's end, its last word tokenized apart); the others are the document's
        # first parts, and at least one more follows them.
        at_least = parts - 1
        if at_least > budget:
            raise _too_many_chunks(f"{others + at_least:,} or more", max_chunks)
        # Long enough, by what this one held, to make more parts than the budget: twice as
        # long at least.
        grown = len(prefix) * (budget + 3) // max(1, at_least) * 5 // 4
        size = max(2 * len(prefix), grown)
    if measure.tokens <= tokens:
        return None
    return DocumentParts(_refit(document, chunk_spans(document, measure, tokens, overlap), tokens, window))


def _prefix(text: str, size: int) -> str:
    """`text` whole where `size` characters reach near its end, else its first `size` or so,
    cut before a space (a word cut in two may be more tokens than the word) or, in a run
    without one, between two characters (core/text_boundaries.py's safe_cut)."""
    if size >= len(text) * 3 // 4:
        return text
    space = text.rfind(" ", size // 2, size)
    end = space if space > 0 else size
    while not safe_cut(text, end):
        end += 1
    return text[:end]


def _refit(
    text: str, spans: list[tuple[int, int]], tokens: int, window: TokenWindow
) -> list[tuple[int, int]]:
    """`spans`, each part over `tokens` counted alone cut shorter, the rest of it read by the next.

    Parts are cut by the whole text's tokens, but each is scored alone: one that starts
    inside a word (a run without spaces, as base64, cut within) may be more tokens alone,
    and the model would cut its end, never reading it. Such a part ends where its own
    tokens fill the window, and the next part starts there at the latest (a run without
    spaces has no overlap to cover it). An estimate counts a part as its share of the
    text: nothing to count again."""
    if window.counted_by == COUNTED_BY_ESTIMATE:
        return spans
    parts = [text[start:end] for start, end in spans]
    counts: list[int | None] = list(_count_each(window, parts))
    spans = list(spans)
    fitted: list[tuple[int, int]] = []
    pending: int | None = None  # where the part before stopped short: the next starts there
    index = 0
    while index < len(spans):
        start, end = spans[index]
        count = counts[index]
        if pending is not None and pending < start:
            start, count = pending, None
        pending = None
        reach = end
        own: Measure | None = None
        if count is None:
            own = window.measure(text[start:end])
            count = own.tokens
        # Cut again until it fits: a word cut in two may be more tokens than the whole word.
        while count > tokens:
            part = text[start:reach]
            if own is None:
                own = window.measure(part)
            cut = _cut(part, own, 0, own.fit(0, tokens), tokens)
            if cut >= len(part):  # one joined sequence: nowhere to cut it
                break
            pending = skip_space(text, start + cut, end)
            reach = trim_end(text, start, start + cut)
            own = window.measure(text[start:reach])
            count = own.tokens
        fitted.append((start, reach))
        if pending is not None and pending >= end:
            pending = None
        elif pending is not None and index + 1 == len(spans):  # the last part: what it leaves is one more
            spans.append((pending, end))
            counts.append(None)
        index += 1
    return fitted


def _count_each(window: TokenWindow, texts: list[str]) -> list[int]:
    """Tokens of each text alone, in one batch where the window counts so."""
    if isinstance(window, CountsEach):
        return window.count_each(texts)
    return [window.measure(text).tokens for text in texts]


def _only_spaces_from(text: str, position: int) -> bool:
    """Whether text[position:] is empty or all spaces (str.isspace's), read in C."""
    spaces = _SPACES.match(text, position)
    return position >= len(text) or (spaces is not None and spaces.end() == len(text))


def _cut(text: str, measure: Measure, start: int, reach: int, tokens: int) -> int:
    """cut_before, the part's last quarter and half measured in tokens, as the window is:
    a word that is short in tokens is not cut for being long in characters (a run of
    characters of several bytes each, before it, makes the characters' half short)."""
    end = max(reach, start + 1)
    quarter = max(start, measure.back(end, tokens // 4))
    half = max(start, measure.back(end, tokens // 2))
    return cut_before(text, start, end, quarter, half)


def chunk_spans(text: str, measure: Measure, tokens: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of the parts of `text`, each within `tokens`, neighbours sharing
    about `overlap`; each starts and ends on a boundary (core/text_boundaries.py) and holds
    no leading or trailing space."""
    size = len(text)
    spans: list[tuple[int, int]] = []
    start = skip_space(text, 0)
    # The text's end but for its trailing spaces: a part that reaches it is the last, though
    # the spaces after it would not fit (a byte-level BPE makes tokens of newlines).
    last = max(start, len(text.rstrip()))
    while start < size:
        reach = measure.fit(start, tokens)
        if reach >= last:
            spans.append((start, last))
            break
        cut = _cut(text, measure, start, reach, tokens)
        spans.append((start, trim_end(text, start, cut)))
        following = word_start_from(text, measure.back(cut, overlap), cut) if overlap else cut
        if following <= start:  # the overlap would not move on: start after this part
            following = cut
        start = skip_space(text, following)
    return spans or [(0, size)]


def _expand(documents: Sequence[str], layouts: list[DocumentParts | None], estimated: bool) -> Plan:
    parts: list[str] = []
    owners: list[int] = []
    ordinals: list[int] = []
    spans: list[tuple[int, int]] = []
    truncated: list[bool] = []
    chunks: list[int] = []
    for owner, (document, layout) in enumerate(zip(documents, layouts, strict=True)):
        if layout is None:
            parts.append(document)
            owners.append(owner)
            ordinals.append(0)
            spans.append((0, len(document)))
            truncated.append(False)
            chunks.append(1)
            continue
        for ordinal, (start, end) in enumerate(layout.spans):
            parts.append(document[start:end])
            owners.append(owner)
            ordinals.append(ordinal)
            spans.append((start, end))
        truncated.append(layout.truncated)
        chunks.append(len(layout.spans))
    return Plan(parts, owners, ordinals, spans, truncated, chunks, estimated)
