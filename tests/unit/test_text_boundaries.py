"""Where a long document may be cut: Korean and full-width Latin words are words, with spaces."""

from __future__ import annotations

import pytest

from rerank_service.core.chunking import CallLimits
from rerank_service.core.domain import LongDocuments, RerankRequest
from rerank_service.core.long_documents import plan
from rerank_service.core.text_boundaries import cut_before, unspaced, word_boundary
from rerank_service.core.token_window import EstimatedWindow


def full_width(ascii_text: str) -> str:
    """The full-width forms (U+FF01-FF5E) of ASCII letters, digits and punctuation; spaces kept."""
    return "".join(c if c == " " else chr(ord(c) + 0xFEE0) for c in ascii_text)


@pytest.mark.parametrize(
    ("text", "position"), [("대한민국의", 2), (full_width("fullwidth"), 4), (full_width("ABC123"), 3)]
)
def test_no_cut_between_two_letters_of_a_spaced_word(text: str, position: int) -> None:
    assert not word_boundary(text, position)


def test_chinese_japanese_and_cjk_punctuation_are_still_unspaced() -> None:
    assert all(map(unspaced, "漢字かなカナ。\uff8a\uff9d" + full_width("!?,:()")))
    assert not any(map(unspaced, "한국어\u3131\u314f" + full_width("full09AZ")))


def test_a_korean_document_is_truncated_between_words() -> None:
    """Hangul was taken for a script without spaces: cut inside a word, a space in reach."""
    document = "서울은 대한민국의 수도이며 가장 큰 도시입니다 " * 200
    request = RerankRequest(
        "m", "q", [document], long_documents=LongDocuments.TRUNCATE, max_tokens_per_doc=100
    )

    parts = plan(request, CallLimits(window=EstimatedWindow(4000)), 1000)

    assert parts is not None
    part = parts.parts[0]
    assert document.startswith(part)
    assert document[len(part)].isspace()


def test_a_full_width_latin_word_is_cut_at_the_space_before_it() -> None:
    text = full_width("abc def fullwidth")
    assert cut_before(text, 0, 12) == len(full_width("abc def "))
