"""A cached answer for one pair: the score as the backend gave it, and the document's tokens.

Packed into a few bytes, the same way in memory and in Redis: the score as its 8 IEEE-754
bytes (so a cached score equals the backend's to the last bit), then the token count when
there is one, in 4 bytes, or 8 for a count that does not fit in 4.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

_SCORE = struct.Struct("<d")
_SCORE_TOKENS32 = struct.Struct("<dI")
_SCORE_TOKENS64 = struct.Struct("<dQ")
_UINT32_MAX = 0xFFFF_FFFF


class CachedScore(NamedTuple):
    """One pair's answer: its score, and the document's token count when the backend said it.

    A named tuple, not a frozen dataclass: one is made per pair on every lookup and store,
    and a tuple is made several times faster."""

    score: float
    tokens: int | None = None


def pack(entry: CachedScore) -> bytes:
    """`entry` in 8, 12 or 16 bytes; a negative token count is left out (none is counted)."""
    tokens = entry.tokens
    if tokens is None or tokens < 0:
        return _SCORE.pack(entry.score)
    if tokens <= _UINT32_MAX:
        return _SCORE_TOKENS32.pack(entry.score, tokens)
    return _SCORE_TOKENS64.pack(entry.score, tokens)


def unpack(data: bytes, offset: int = 0) -> CachedScore | None:
    """The entry packed in `data` from `offset` to its end; None when it cannot be one: a
    value of another size, or whose score is not a finite number, reads as a miss. (Bytes
    of an entry's size that read as a finite number cannot be told from an entry.)"""
    size = len(data) - offset
    tokens: int | None = None
    if size == _SCORE.size:
        score = _SCORE.unpack_from(data, offset)[0]
    elif size == _SCORE_TOKENS32.size:
        score, tokens = _SCORE_TOKENS32.unpack_from(data, offset)
    elif size == _SCORE_TOKENS64.size:
        score, tokens = _SCORE_TOKENS64.unpack_from(data, offset)
    else:
        return None
    # Any 8, 12 or 16 bytes unpack: a NaN or an infinity is no score a backend gave, so
    # such bytes were written by something else. (Not held to [0, 1]: only the upstream
    # answers are checked so; a local model's scores are stored as it gave them.)
    return CachedScore(score, tokens) if math.isfinite(score) else None
