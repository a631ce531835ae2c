"""The cache as a call sees it: lookup, compute what is missing, store; the caller's modes;
identical calls in flight computed once."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from rerank_service.cache import (
    CachedScore,
    CacheMode,
    CacheOutcome,
    MemoryTier,
    PairKeys,
    ScoreCache,
    deployment_fingerprint,
)
from rerank_service.cache.single_flight import Flights
from tests.support.waiting import wait_until_async

KEYS = PairKeys(deployment_fingerprint({"model": "qwen3-rerank", "format": "dashscope"}))
QUERY = "what is a reranker"


def keys_of(documents: Sequence[str]) -> list[bytes]:
    return KEYS.keys(None, QUERY, documents)


def score_of(document: str) -> CachedScore:
    return CachedScore(len(document) / 97, len(document.split()))


class Backend:
    """Counts the documents it is asked to score; `gate` holds each call until it is set."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def score(self, documents: list[str]) -> list[CachedScore]:
        self.calls.append(documents)
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("upstream failed")
        return [score_of(document) for document in documents]


async def rerank(
    cache: ScoreCache,
    backend: Backend,
    documents: list[str],
    mode: CacheMode = CacheMode.READ_WRITE,
    wait: float | None = None,
) -> tuple[list[CachedScore], CacheOutcome]:
    """What the integration does: look up, compute the missing documents, store, merge."""
    lookup = await cache.lookup(keys_of(documents), mode, wait)
    with lookup:
        answers = dict(lookup.hits)
        if lookup.missing:
            computed = await backend.score([documents[index] for index in lookup.missing])
            scores = dict(zip(lookup.missing, computed, strict=True))
            await lookup.store(scores)
            answers.update(scores)
    return [answers[index] for index in range(len(documents))], lookup.outcome


def memory_cache(flight_wait: float = 10.0) -> ScoreCache:
    return ScoreCache(MemoryTier(1 << 20, ttl=3600), flight_wait=flight_wait)


DOCUMENTS = ["alpha beta", "gamma", "delta epsilon zeta", "eta"]


async def test_a_repeated_call_computes_nothing_and_answers_the_same() -> None:
    cache, backend = memory_cache(), Backend()
    first, outcome = await rerank(cache, backend, DOCUMENTS)
    assert outcome is CacheOutcome.MISS
    again, outcome = await rerank(cache, backend, DOCUMENTS)
    assert outcome is CacheOutcome.HIT
    assert again == first == [score_of(document) for document in DOCUMENTS]
    assert backend.calls == [DOCUMENTS]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.hit_calls, stats.miss_calls) == (4, 4, 1, 1)
    assert stats.entries == 4


async def test_a_half_cached_call_computes_exactly_the_uncached_documents() -> None:
    cache, backend = memory_cache(), Backend()
    await rerank(cache, backend, DOCUMENTS[:2])
    answers, outcome = await rerank(cache, backend, DOCUMENTS)
    assert outcome is CacheOutcome.PARTIAL
    assert backend.calls[1] == DOCUMENTS[2:]
    assert answers == [score_of(document) for document in DOCUMENTS]
    assert cache.stats().partial_calls == 1


async def test_a_document_sent_twice_is_one_pair() -> None:
    cache, backend = memory_cache(), Backend()
    answers, _ = await rerank(cache, backend, ["a", "b", "a"])
    assert answers == [score_of("a"), score_of("b"), score_of("a")]
    assert cache.stats().entries == 2
    assert (await rerank(cache, backend, ["a"]))[1] is CacheOutcome.HIT


async def test_no_cache_computes_everything_and_stores_it() -> None:
    cache, backend = memory_cache(), Backend()
    await rerank(cache, backend, DOCUMENTS)
    _, outcome = await rerank(cache, backend, DOCUMENTS, CacheMode.NO_READ)
    assert outcome is CacheOutcome.MISS
    assert backend.calls == [DOCUMENTS, DOCUMENTS]


async def test_no_store_neither_reads_nor_stores() -> None:
    cache, backend = memory_cache(), Backend()
    _, outcome = await rerank(cache, backend, DOCUMENTS, CacheMode.OFF)
    assert outcome is CacheOutcome.OFF
    assert cache.stats().entries == 0
    await rerank(cache, backend, DOCUMENTS)
    _, outcome = await rerank(cache, backend, DOCUMENTS, CacheMode.OFF)
    assert outcome is CacheOutcome.OFF
    assert len(backend.calls) == 3
    assert (cache.stats().hits, cache.stats().misses) == (0, 4)  # the OFF calls count neither


async def test_a_cache_without_tiers_answers_every_lookup_as_off() -> None:
    cache, backend = ScoreCache(MemoryTier(0, ttl=60)), Backend()
    assert not cache.enabled
    await rerank(cache, backend, DOCUMENTS)
    _, outcome = await rerank(cache, backend, DOCUMENTS)
    assert outcome is CacheOutcome.OFF
    assert len(backend.calls) == 2


async def test_identical_calls_in_flight_are_computed_once() -> None:
    cache, backend = memory_cache(), Backend()
    backend.gate.clear()
    started = 0

    async def one() -> tuple[list[CachedScore], CacheOutcome]:
        nonlocal started
        started += 1
        return await rerank(cache, backend, DOCUMENTS)

    calls = [asyncio.create_task(one()) for _ in range(50)]
    # Every call has looked up (without Redis a lookup does not pause before it waits).
    await wait_until_async(lambda: started == 50, what="50 calls started")
    await asyncio.sleep(0)
    assert len(backend.calls) == 1
    backend.gate.set()
    results = await asyncio.gather(*calls)
    assert len(backend.calls) == 1
    assert all(answers == [score_of(document) for document in DOCUMENTS] for answers, _ in results)
    assert [outcome for _, outcome in results].count(CacheOutcome.HIT) == 49
    assert cache.stats().coalesced == 49 * len(DOCUMENTS)


async def test_when_the_first_call_fails_its_waiters_compute_themselves() -> None:
    cache, backend = memory_cache(), Backend()
    backend.gate.clear()
    backend.fail_next = True
    first = asyncio.create_task(rerank(cache, backend, DOCUMENTS))
    await wait_until_async(lambda: len(backend.calls) == 1, what="the first call computing")
    waiters = [asyncio.create_task(rerank(cache, backend, DOCUMENTS)) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(backend.calls) == 1  # they wait
    backend.gate.set()
    with pytest.raises(RuntimeError, match="upstream failed"):
        await first
    results = await asyncio.gather(*waiters)
    assert all(answers == [score_of(document) for document in DOCUMENTS] for answers, _ in results)
    # Each computes itself, unless another waiter stored the scores before it woke.
    assert 2 <= len(backend.calls) <= 4


async def test_a_waiter_waits_no_longer_than_its_bound() -> None:
    """The first call never finishes: the waiter computes itself once `wait` has passed."""
    cache, backend = memory_cache(), Backend()
    backend.gate.clear()
    first = asyncio.create_task(rerank(cache, backend, DOCUMENTS))
    await wait_until_async(lambda: len(backend.calls) == 1, what="the first call computing")
    lookup = await cache.lookup(keys_of(DOCUMENTS), wait=0.01)
    assert lookup.missing == [0, 1, 2, 3]
    assert lookup.outcome is CacheOutcome.MISS
    lookup.release()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_waiter_with_a_long_deadline_still_waits_no_longer_than_the_flight_wait() -> None:
    """A call with a minute left waits for another call's pairs at most `flight_wait`, then
    computes them itself, with the rest of its time."""
    cache, backend = memory_cache(flight_wait=0.01), Backend()
    backend.gate.clear()
    first = asyncio.create_task(rerank(cache, backend, DOCUMENTS))
    await wait_until_async(lambda: len(backend.calls) == 1, what="the first call computing")
    async with asyncio.timeout(10):  # guards against a hang only: the bound is 0.01 s, not 60
        lookup = await cache.lookup(keys_of(DOCUMENTS), wait=60.0)
    assert lookup.missing == [0, 1, 2, 3]
    lookup.release()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_cancelled_first_call_frees_its_pairs() -> None:
    cache, backend = memory_cache(), Backend()
    backend.gate.clear()
    first = asyncio.create_task(rerank(cache, backend, DOCUMENTS))
    await wait_until_async(lambda: len(backend.calls) == 1, what="the first call computing")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    backend.gate.set()
    lookup = await cache.lookup(keys_of(DOCUMENTS), wait=60)  # nothing to wait for: not in flight
    assert lookup.missing == [0, 1, 2, 3]
    lookup.release()


async def test_a_call_that_computes_anyway_computes_the_pairs_in_flight_too() -> None:
    """Partly the same documents as a call in flight, partly new: no waiting (it would add the
    first call's time to this one's); the pairs in flight are computed again."""
    cache, backend = memory_cache(), Backend()
    backend.gate.clear()
    first = asyncio.create_task(rerank(cache, backend, DOCUMENTS[:2]))
    await wait_until_async(lambda: len(backend.calls) == 1, what="the first call computing")
    lookup = await cache.lookup(keys_of(DOCUMENTS[1:3]), wait=60)
    assert lookup.missing == [0, 1]
    lookup.release()
    backend.gate.set()
    await first


async def test_a_chunk_stored_before_the_call_fails_is_kept_and_shared() -> None:
    """A chunked call stores each chunk as it succeeds: a later failure keeps the first
    chunk's scores, and a waiter gets those and computes only the rest."""
    cache = memory_cache()
    keys = keys_of(DOCUMENTS)
    lookup = await cache.lookup(keys)
    waiter = asyncio.create_task(cache.lookup(keys, wait=60))
    await asyncio.sleep(0)
    await lookup.store({0: score_of(DOCUMENTS[0]), 1: score_of(DOCUMENTS[1])})
    lookup.release()  # the second chunk failed
    waited = await waiter
    assert sorted(waited.hits) == [0, 1]
    assert waited.missing == [2, 3]
    assert waited.outcome is CacheOutcome.PARTIAL
    waited.release()


def test_a_flight_leaves_no_claim_behind_and_keeps_scores_only_for_its_waiters() -> None:
    flights = Flights()
    alone = flights.claim({b"a", b"b"})
    flights.resolve_columns(alone, [b"a", b"b", b"z"], [0.1, 0.2, 0.3], [1, 2, 3])  # z: not its own
    assert alone.ended
    assert alone.scores == {}  # nobody waited: nothing kept
    assert len(flights) == 0
    waited = flights.claim({b"c", b"d"})
    waited.waited = True
    flights.resolve_columns(waited, [b"c"], [0.5], [None])
    assert (waited.ended, len(flights)) == (False, 1)
    flights.finish(waited)  # d was never stored: free for its waiters to compute
    assert waited.ended
    assert waited.scores == {b"c": CachedScore(0.5)}
    assert len(flights) == 0


async def test_calls_leave_no_pair_claimed() -> None:
    cache, backend = memory_cache(), Backend()
    await asyncio.gather(*(rerank(cache, backend, DOCUMENTS[: 1 + number % 4]) for number in range(8)))
    await rerank(cache, backend, ["new", *DOCUMENTS])
    assert cache.stats().entries == len(DOCUMENTS) + 1
    assert len(cache._flights) == 0
