"""The in-process tier: least recently used first out, bounded in bytes, a time to live."""

from __future__ import annotations

import gc
import hashlib
import os
import time
import tracemalloc

import pytest

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
