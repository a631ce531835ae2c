"""The in-process tier: least recently used first out, bounded in bytes, a time to live."""

from __future__ import annotations

import gc
import hashlib
import os
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rerank_service.cache.entry import CachedScore
from rerank_service.cache.keys import PairKeys, deployment_fingerprint
from rerank_service.cache.memory import SWEEP_EVERY, MemoryTier, entry_cost


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(number: int) -> bytes:
    return hashlib.blake2b(number.to_bytes(8, "big"), digest_size=32).digest()


def one_entry_cost() -> int:
    return entry_cost(pair(0), b"\0" * (8 + 12))  # its expiry, a score and 4-byte tokens


def test_a_stored_entry_reads_back() -> None:
    tier = MemoryTier(1 << 20, ttl=60)
    tier.put(pair(1), CachedScore(0.125, 9))
    assert tier.get(pair(1)) == CachedScore(0.125, 9)
    assert tier.get(pair(2)) is None
    assert (tier.entries, tier.bytes) == (1, one_entry_cost())


def test_the_bound_in_bytes_evicts_the_least_recently_used() -> None:
    tier = MemoryTier(3 * one_entry_cost(), ttl=60)
    for number in (1, 2, 3):
        tier.put(pair(number), CachedScore(number / 10, 1))
    assert tier.get(pair(1)) is not None  # 1 is now the most recently used; 2 the least
    tier.put(pair(4), CachedScore(0.4, 1))
    assert tier.get(pair(2)) is None
    assert all(tier.get(pair(number)) is not None for number in (1, 3, 4))
    assert tier.entries == 3
    assert tier.bytes == 3 * one_entry_cost() <= tier.max_bytes
    assert tier.evictions == 1


def test_storing_a_key_again_replaces_its_entry_and_its_bytes() -> None:
    tier = MemoryTier(1 << 20, ttl=60)
    tier.put(pair(1), CachedScore(0.1, 1))
    tier.put(pair(1), CachedScore(0.2))
    assert tier.get(pair(1)) == CachedScore(0.2)
    assert tier.entries == 1
    assert tier.bytes == entry_cost(pair(1), b"\0" * 16)


def test_an_entry_expires_after_its_time_to_live() -> None:
    clock = Clock()
    tier = MemoryTier(1 << 20, ttl=60, clock=clock)
    tier.put(pair(1), CachedScore(0.5))
    clock.now += 59.9
    assert tier.get(pair(1)) == CachedScore(0.5)  # reading does not extend it
    clock.now += 0.1
    assert tier.get(pair(1)) is None
    assert (tier.entries, tier.bytes, tier.expirations) == (0, 0, 1)


def test_expired_entries_at_the_cold_end_leave_as_new_ones_come() -> None:
    clock = Clock()
    tier = MemoryTier(1 << 20, ttl=60, clock=clock)
    for number in range(4):
        tier.put(pair(number), CachedScore(0.5))
    clock.now += 61
    for number in range(10, 10 + SWEEP_EVERY - 4):  # the sweep comes every SWEEP_EVERY puts
        tier.put(pair(number), CachedScore(0.5))
    assert tier.entries == SWEEP_EVERY - 4
    assert tier.expirations == 4
    assert tier.evictions == 0


def test_zero_bytes_is_off() -> None:
    tier = MemoryTier(0, ttl=60)
    tier.put(pair(1), CachedScore(0.5))
    assert not tier.enabled
    assert tier.get(pair(1)) is None
    assert (tier.entries, tier.bytes) == (0, 0)


def test_an_entry_larger_than_the_bound_is_not_kept() -> None:
    tier = MemoryTier(one_entry_cost() - 1, ttl=60)
    tier.put(pair(1), CachedScore(0.5, 1))
    assert (tier.entries, tier.bytes, tier.evictions) == (0, 0, 0)


@pytest.mark.parametrize("count", [3_000, 50_000, 90_000])
def test_the_bytes_counted_are_at_least_what_the_entries_take(count: int) -> None:
    """Honest accounting: the tier's `bytes` covers what the process allocated for its entries
    (tracemalloc: keys, values, the map's nodes and table), and does not overstate it much.
    The counts fall at different fills of the map's hash table (its cost per entry varies)."""
    keys = [pair(number) for number in range(count)]  # made before: the caller's, not the tier's
    entry = CachedScore(0.5, 12)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tier = MemoryTier(1 << 30, ttl=60)
        for key in keys:
            tier.put(key, entry)
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    taken += sum(len(key) + 33 for key in keys)  # the keys, which the tier now holds too
    assert taken <= tier.bytes <= 1.5 * taken


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_million_unique_pairs_stay_within_the_bound() -> None:
    """A flood of unique pairs (keys made as a call makes them): the tier stays within its
    bound, and so does the process's resident memory, loosely (unbounded, these entries
    would take about 270 MB)."""
    bound = 16 * 1024 * 1024
    tier = MemoryTier(bound, ttl=3600)
    keys = PairKeys(deployment_fingerprint({"model": "m"}))
    gc.collect()
    before = rss()
    started = time.monotonic()
    for call in range(1_000):
        documents = [f"document {call}-{number}" for number in range(1_000)]
        for number, key in enumerate(keys.keys(None, f"query {call}", documents)):
            tier.put(key, CachedScore(number / 1000, 20))
    elapsed = time.monotonic() - started
    gc.collect()
    grown = rss() - before
    assert tier.bytes <= bound
    assert tier.entries == bound // one_entry_cost()
    assert tier.evictions == 1_000_000 - tier.entries
    assert grown < 2 * bound + 16 * 1024 * 1024, (
        f"RSS grew {grown / 2**20:.0f} MiB for a {bound >> 20} MiB bound"
    )
    print(f"1M unique pairs: {elapsed:.1f} s, RSS +{grown / 2**20:.1f} MiB, {tier.entries} entries")


class SequentialTier:
    """What the tier must hold: each entry stored one at a time, least recently used first out."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[bytes, CachedScore] = {}  # in order of use, coldest first
        self.bytes = self.evictions = 0

    def cost(self, key: bytes, entry: CachedScore) -> int:
        tokens = entry.tokens
        size = 8 if tokens is None or tokens < 0 else 12 if tokens <= 0xFFFF_FFFF else 16
        return entry_cost(key, b"\0" * (8 + size))

    def put_batch(self, items: list[tuple[bytes, CachedScore]]) -> None:
        """Each entry stored in turn; evictions counted as the entries the batch left out
        (a key dropped and then stored again within the batch never left)."""
        before = set(self.entries)
        for key, entry in items:
            self.put(key, entry)
        stored = {key for key, entry in items if self.cost(key, entry) <= self.max_bytes}
        self.evictions += len(before | stored) - len(self.entries)

    def put(self, key: bytes, entry: CachedScore) -> None:
        cost = self.cost(key, entry)
        if cost > self.max_bytes:
            return
        previous = self.entries.pop(key, None)
        if previous is not None:
            self.bytes -= self.cost(key, previous)
        if entry.tokens is not None and entry.tokens < 0:  # not counted: kept as none
            entry = CachedScore(entry.score)
        self.entries[key] = entry
        self.bytes += cost
        while self.bytes > self.max_bytes:
            cold = next(iter(self.entries))
            self.bytes -= self.cost(cold, self.entries.pop(cold))

    def get(self, key: bytes) -> CachedScore | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.entries[key] = entry
        return entry


keys_drawn = st.sampled_from([pair(number) for number in range(12)] + [b"short", b"k" * 40, b"x" * 64])
tokens_drawn = st.one_of(st.none(), st.integers(-2, 50), st.just(2**40))
batches = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.lists(st.tuples(keys_drawn, tokens_drawn), max_size=8)),
        st.tuples(st.just("get"), st.lists(keys_drawn, max_size=8)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 8), batches)
def test_a_calls_pairs_at_once_leave_what_storing_them_one_by_one_leaves(
    room: int, operations: list[tuple[str, list[Any]]]
) -> None:
    """put_columns and get_many take a call's pairs at once (and count room instead of
    looking at each entry while every key is a pair key): the entries, their order of use,
    the bytes and the evictions are those of a tier that stores and reads one at a time
    (but an entry dropped and stored again by one batch is not counted as evicted)."""
    bound = room * one_entry_cost() + 7
    tier, expected = MemoryTier(bound, ttl=60), SequentialTier(bound)
    for number, (kind, items) in enumerate(operations):
        if kind == "put":
            entries = [CachedScore(number + index / 10, tokens) for index, (_, tokens) in enumerate(items)]
            keys = [key for key, _ in items]
            tier.put_columns(keys, [entry.score for entry in entries], [entry.tokens for entry in entries])
            expected.put_batch(list(zip(keys, entries, strict=True)))
        else:
            found = tier.get_many(items)
            assert found == [expected.get(key) for key in items]
    kept = expected.entries
    assert list(tier._entries) == list(kept)  # the order of use, coldest first
    assert {key: tier.get_many([key])[0] for key in kept} == kept
    assert (tier.bytes, tier.evictions, tier.entries) == (expected.bytes, expected.evictions, len(kept))


def test_a_whole_hit_with_an_expired_entry_drops_only_that_one() -> None:
    clock = Clock()
    tier = MemoryTier(1 << 20, ttl=60, clock=clock)
    tier.put_columns([pair(1)], [0.1], [1])
    clock.now += 30
    tier.put_columns([pair(2), pair(3)], [0.2, 0.3], [2, 3])
    clock.now += 31  # pair 1 expired, 2 and 3 not
    assert tier.get_many([pair(2), pair(1), pair(3), pair(1)]) == [
        CachedScore(0.2, 2),
        None,
        CachedScore(0.3, 3),
        None,
    ]
    assert (tier.entries, tier.expirations, tier.bytes) == (2, 1, 2 * one_entry_cost())
