"""The cached value: the score to the last bit, the token count when there is one."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rerank_service.cache.entry import CachedScore, pack, unpack


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


@given(st.floats(allow_nan=False, allow_infinity=False), st.one_of(st.none(), st.integers(0, 2**63 - 1)))
def test_a_packed_entry_reads_back_exactly(score: float, tokens: int | None) -> None:
    back = unpack(pack(CachedScore(score, tokens)))
    assert back is not None
    assert bits(back.score) == bits(score)
    assert back.tokens == tokens


@pytest.mark.parametrize(
    "score",
    [0.1 + 0.2, 5e-324, -0.0, 0.9999999999999999, 1 / 3, math.nextafter(0.5, 1.0)],
)
def test_scores_that_decimal_printing_would_round_keep_their_bits(score: float) -> None:
    back = unpack(pack(CachedScore(score)))
    assert back is not None
    assert bits(back.score) == bits(score)


def test_an_entry_is_a_few_bytes() -> None:
    assert len(pack(CachedScore(0.5))) == 8
    assert len(pack(CachedScore(0.5, 120))) == 12
    assert len(pack(CachedScore(0.5, 2**40))) == 16


def test_a_value_of_another_size_is_no_entry() -> None:
    """A foreign or damaged value in Redis reads as a miss, never as a score."""
    assert unpack(b"") is None
    assert unpack(b"\0" * 9) is None
    assert unpack(b"not a packed score at all") is None


@pytest.mark.parametrize("score", [math.nan, -math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("tokens", [None, 7, 2**40])
def test_a_value_whose_score_is_not_finite_is_no_entry(score: float, tokens: int | None) -> None:
    """Bytes of an entry's size read as a miss unless their score is a finite number: no
    backend gives a NaN or an infinity, so such a value is foreign or damaged."""
    packed = pack(CachedScore(score, tokens))
    assert unpack(packed) is None
    assert unpack(b"prefix.." + packed, 8) is None


def test_unpack_reads_from_an_offset() -> None:
    assert unpack(b"prefix.." + pack(CachedScore(0.25, 7)), 8) == CachedScore(0.25, 7)
