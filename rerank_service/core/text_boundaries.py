"""Where a long document may be cut: sentence ends, then spaces, then between CJK characters.

A cut is a position in the string (a code point index), so it never falls inside a UTF-8
sequence; it never falls inside a word (a run of characters between spaces, in scripts
that write spaces), nor between a character and what joins it (a combining mark, a
variation selector, an emoji modifier, a zero-width joiner or the second half of a flag:
between two flags of a run of them it may).
Only a run with no allowed place over half a window long (a URL, base64) is cut inside,
and then still not inside a character or between a character and what joins it.
"""

from __future__ import annotations

import unicodedata

_ZWJ = "\u200d"
_SENTENCE_ENDS = ".!?;\u3002\uff01\uff1f\uff1b"  # ASCII, and CJK full-width . ! ? ;
_CJK_SENTENCE_ENDS = "\u3002\uff01\uff1f\uff1b"


def _joins(character: str) -> bool:
    """Whether `character` belongs to the one before it: never cut before it."""
    code = ord(character)
    return (
        character == _ZWJ
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0xE0100 <= code <= 0xE01EF
        or 0x1F3FB <= code <= 0x1F3FF  # emoji skin tones
        or 0xE0020 <= code <= 0xE007F  # tag characters (subdivision flags)
        or unicodedata.category(character) in ("Mn", "Mc", "Me")  # combining marks
    )


def _regional_indicator(character: str) -> bool:
    return 0x1F1E6 <= ord(character) <= 0x1F1FF


def unspaced(character: str) -> bool:
    """A character of a script written without spaces between words (Chinese, Japanese), or
    CJK punctuation. Not Korean (Hangul), nor full-width Latin letters and digits: their
    words are written with spaces, and are not cut inside while a space is in reach."""
    code = ord(character)
    if 0x3130 <= code <= 0x318F:  # Hangul compatibility jamo
        return False
    return (
        0x2E80 <= code <= 0x9FFF  # CJK radicals, punctuation, kana, ideographs
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        # Full-width punctuation and half-width katakana (not half-width Hangul, U+FFA0-FFDC)
        or (0xFF00 <= code <= 0xFF9F and not _full_width_alphanumeric(code))
        or 0xFFE0 <= code <= 0xFFEF  # full-width signs
        or 0x20000 <= code <= 0x3FFFF  # ideographs beyond the BMP
    )


def _full_width_alphanumeric(code: int) -> bool:
    """Full-width Latin digits and letters (U+FF10-FF19, FF21-FF3A, FF41-FF5A)."""
    return 0xFF10 <= code <= 0xFF19 or 0xFF21 <= code <= 0xFF3A or 0xFF41 <= code <= 0xFF5A


def safe_cut(text: str, position: int, floor: int = 0) -> bool:
    """Not inside a character sequence that shows as one (a grapheme, near enough).

    `floor`: a place at or before `position` known to be such a place (a part's start),
    no further back than which a run of flags is read."""
    if position <= 0 or position >= len(text):
        return True
    before, after = text[position - 1], text[position]
    if _joins(after) or before == _ZWJ:
        return False
    if not (_regional_indicator(before) and _regional_indicator(after)):
        return True
    # A flag is a pair of regional indicators: a cut may fall between two flags of a run,
    # after an even number of them, never inside one (Unicode's grapheme rules GB12, GB13).
    # Counted from `floor` at the furthest: a run may be megabytes long.
    preceding = 1
    while position - preceding > floor and _regional_indicator(text[position - preceding - 1]):
        preceding += 1
    return preceding % 2 == 0


def word_boundary(text: str, position: int) -> bool:
    """Between words: beside a space, or beside a character of an unspaced script."""
    if position <= 0 or position >= len(text):
        return True
    before, after = text[position - 1], text[position]
    if before.isspace() or after.isspace():
        return True
    return (unspaced(before) or unspaced(after)) and safe_cut(text, position)


def _sentence_end(text: str, position: int) -> bool:
    """Right after a sentence's end: a terminator then a space, a CJK terminator, or a newline."""
    before = text[position - 1]
    if before == "\n" or before in _CJK_SENTENCE_ENDS:
        return True
    return before in _SENTENCE_ENDS and (position >= len(text) or text[position].isspace())


def cut_before(
    text: str, start: int, end: int, last_quarter: int | None = None, last_half: int | None = None
) -> int:
    """Where to end a part that starts at `start` and may reach `end` (exclusive): a place
    in (start, end], as near `end` as the best kind of place allows. `last_quarter` and
    `last_half`: where the part's last quarter and half begin, in tokens (a caller that
    measures them); by default, in characters."""
    if end >= len(text):
        return len(text)
    span = end - start
    quarter = end - span // 4 if last_quarter is None else last_quarter
    half = end - span // 2 if last_half is None else last_half
    for position in range(end, quarter, -1):  # a sentence's end in the last quarter
        if position > start and _sentence_end(text, position):
            return position
    for position in range(end, half, -1):  # a word's end in the last half
        if position > start and word_boundary(text, position):
            return position
    for position in range(end, start, -1):  # one word longer than half the window
        if safe_cut(text, position, start):
            return position
    position = end + 1  # a run of joined characters the whole window long: let it through
    while not safe_cut(text, position, start):
        position += 1
    return position


def word_start_from(text: str, position: int, limit: int) -> int:
    """The first word's start at or after `position`, before `limit` (else `limit`)."""
    for candidate in range(position, limit):
        if word_boundary(text, candidate) and not text[candidate].isspace():
            return candidate
    return limit


def skip_space(text: str, position: int, limit: int | None = None) -> int:
    """The first position at or after `position` that is not a space."""
    stop = len(text) if limit is None else limit
    while position < stop and text[position].isspace():
        position += 1
    return position


def trim_end(text: str, start: int, end: int) -> int:
    """`end`, moved back over trailing spaces (not past `start`)."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end
