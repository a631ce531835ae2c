"""The score cache: the tiers and single flight behind one lookup and one store per call.

A call's pairs are looked up in memory first, then in Redis (whose hits are written back
to memory); the pairs still missing are claimed, so identical calls meanwhile wait for
this call's scores instead of computing them again. The caller computes what is missing,
stores the scores it got (each chunk as it succeeds) and releases the lookup, which frees
the pairs it did not store: their waiters compute them themselves.

    lookup = await cache.lookup(keys, CacheMode.READ_WRITE, wait=time_left)
    with lookup:
        scores = compute([documents[i] for i in lookup.missing])  # only what is missing
        await lookup.store({index: CachedScore(score, tokens), ...})
    # lookup.hits + the computed scores: the whole answer; lookup.outcome: x-cache
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, cast

from rerank_service.cache.entry import CachedScore
from rerank_service.cache.memory import MemoryTier
from rerank_service.cache.redis_tier import RedisTier
from rerank_service.cache.single_flight import Flight, Flights
from rerank_service.core.domain import CacheMode, CacheOutcome
from rerank_service.observability import tracing

_new_tuple = tuple.__new__
DEFAULT_FLIGHT_WAIT = 10.0  # seconds a call waits at most for another call's scores


class CacheCounts(NamedTuple):
    """The cache's size and its own failure counts now: what its metrics copy in."""

    entries: int
    bytes: int
    evictions: int
    expirations: int
    redis_errors: int
    redis_up: bool | None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The cache's counters since it started (pairs unless named calls), and its size now."""

    hits: int  # pairs answered by the cache, coalesced ones included
    misses: int  # pairs the caller had to compute
    coalesced: int  # pairs answered by waiting for another call's scores
    hit_calls: int
    partial_calls: int
    miss_calls: int
    off_calls: int  # calls that did not use the cache (no-store, a route's `cache: off`, no tier)
    entries: int  # in memory
    bytes: int  # in memory, as counted against the bound
    evictions: int  # memory entries dropped for room
    expirations: int  # memory entries dropped past their time to live
    redis_hits: int
    redis_errors: int  # failed Redis round trips, timeouts included
    redis_timeouts: int
    redis_up: bool | None  # None without a Redis tier


class ScoreCache:
    """The memory tier (None or 0 bytes: off), the Redis tier (None: none) and single flight."""

    def __init__(
        self,
        memory: MemoryTier | None,
        redis: RedisTier | None = None,
        *,
        flight_wait: float = DEFAULT_FLIGHT_WAIT,
    ) -> None:
        self._memory = memory if memory is not None and memory.enabled else None
        self._redis = redis
        self._flights = Flights()
        self.flight_wait = flight_wait
        self._hits = self._misses = self._coalesced = 0
        self._calls = dict.fromkeys(CacheOutcome, 0)

    @property
    def enabled(self) -> bool:
        """Whether there is a tier at all; without one every lookup is a miss of nothing."""
        return self._memory is not None or self._redis is not None

    async def lookup(
        self, keys: Sequence[bytes], mode: CacheMode = CacheMode.READ_WRITE, wait: float | None = None
    ) -> CacheLookup:
        """What the cache knows of the pairs `keys` (one per document, in order), by index.

        READ_WRITE reads memory, then Redis, then waits (at most `wait` seconds, the call's
        time left, and never past the cache's `flight_wait`) for pairs another call is
        computing, but only when nothing else is missing: a call that must compute anyway
        computes those too rather than wait. NO_READ reads nothing; OFF neither reads nor
        stores.
        """
        count = len(keys)
        if mode is CacheMode.OFF or not self.enabled:
            return self._counted(CacheLookup(self, keys, CacheMode.OFF, {}, list(range(count)), None))
        if mode is CacheMode.NO_READ:
            return self._counted(CacheLookup(self, keys, mode, {}, list(range(count)), None))
        found = self._memory.get_many(keys) if self._memory is not None else [None] * count
        flights = self._flights
        claims = flights.claims
        if all(found):  # every pair in memory (an entry is a non-empty tuple): nothing to claim
            every = cast(list[CachedScore], found)
            return self._counted(CacheLookup(self, keys, mode, dict(enumerate(every)), [], None))
        hits: dict[int, CachedScore] = {}
        # Pairs not in memory, by key (a document sent twice is one pair): own ones are
        # claimed by this call, others are another call's in flight.
        own: dict[bytes, list[int]] | None = None
        others: dict[bytes, tuple[Flight, list[int]]] = {}
        flight: Flight | None
        distinct = set(keys)
        if len(distinct) == count and not any(found) and claims.keys().isdisjoint(distinct):
            flight = flights.claim(distinct)  # the usual miss: every pair this call's, in C
        else:
            own = {}
            for index, (key, entry) in enumerate(zip(keys, found, strict=True)):
                if entry is not None:
                    hits[index] = entry
                elif key in own:
                    own[key].append(index)
                elif key in others:
                    others[key][1].append(index)
                elif (owner := claims.get(key)) is not None:
                    owner.waited = True
                    others[key] = (owner, [index])
                else:
                    own[key] = [index]
            flight = flights.claim(set(own)) if own else None
        try:
            if flight is not None and self._redis is not None:
                if own is None:
                    own = {key: [index] for index, key in enumerate(keys)}
                await self._read_redis(own, flight, hits)
            coalesced = 0
            # A call that computes some pairs anyway computes the others' too, rather than wait.
            if others and not (flight is not None and flight.pending):
                bound = self.flight_wait if wait is None else min(wait, self.flight_wait)
                coalesced = await self._wait_for(others, hits, bound)
        except BaseException:
            if flight is not None:
                flights.finish(flight)
            raise
        if flight is not None and not flight.pending:
            flights.finish(flight)
            flight = None
        missing = [index for index in range(count) if index not in hits] if hits else list(range(count))
        self._coalesced += coalesced
        return self._counted(CacheLookup(self, keys, mode, hits, missing, flight))

    async def store_columns(
        self,
        keys: Sequence[bytes],
        scores: Sequence[float],
        tokens: Sequence[int | None],
        flight: Flight | None = None,
    ) -> None:
        """Keep `keys[i]` scored `scores[i]`, with `tokens[i]`, in memory and Redis; those
        `flight` claimed go to its waiters."""
        if self._memory is not None:
            self._memory.put_columns(keys, scores, tokens)
        if flight is not None:
            self._flights.resolve_columns(flight, keys, scores, tokens)
        if self._redis is not None:
            # A trace shows the round trips to Redis (a slow store slows the call): the memory
            # tier's microseconds are not worth a span.
            span = tracing.child("rerank.cache.write", {"rerank.pairs": len(keys)})
            try:
                await self._redis.put_many(list(zip(keys, map(CachedScore, scores, tokens), strict=True)))
            finally:
                if span is not None:
                    span.end()

    def release(self, flight: Flight) -> None:
        self._flights.finish(flight)

    def stats(self) -> CacheStats:
        memory, redis = self._memory, self._redis
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            coalesced=self._coalesced,
            hit_calls=self._calls[CacheOutcome.HIT],
            partial_calls=self._calls[CacheOutcome.PARTIAL],
            miss_calls=self._calls[CacheOutcome.MISS],
            off_calls=self._calls[CacheOutcome.OFF],
            entries=memory.entries if memory is not None else 0,
            bytes=memory.bytes if memory is not None else 0,
            evictions=memory.evictions if memory is not None else 0,
            expirations=memory.expirations if memory is not None else 0,
            redis_hits=redis.hits if redis is not None else 0,
            redis_errors=redis.errors if redis is not None else 0,
            redis_timeouts=redis.timeouts if redis is not None else 0,
            redis_up=redis.up if redis is not None else None,
        )

    def counts(self) -> CacheCounts:
        """What the metrics copy in after each call (`stats`, less what they count themselves)."""
        memory, redis = self._memory, self._redis
        # Made from C: a NamedTuple's own constructor is Python, and this runs on every call.
        if memory is None:
            sizes: tuple[int, int, int, int] = (0, 0, 0, 0)
        else:
            sizes = (memory.entries, memory.bytes, memory.evictions, memory.expirations)
        if redis is None:
            return _new_tuple(CacheCounts, (*sizes, 0, None))
        return _new_tuple(CacheCounts, (*sizes, redis.errors, redis.up))

    async def check_store(self) -> None:
        """Try Redis again, once due, if a failure has it skipped (RedisTier.ping): a process
        that takes no call would otherwise keep it for down, and its metrics say so."""
        if self._redis is not None:
            await self._redis.ping()

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _read_redis(
        self, own: dict[bytes, list[int]], flight: Flight, hits: dict[int, CachedScore]
    ) -> None:
        assert self._redis is not None
        keys = list(own)
        span = tracing.child("rerank.cache.read", {"rerank.pairs": len(keys)})
        try:
            stored = await self._redis.get_many(keys)
            found = [(key, entry) for key, entry in zip(keys, stored, strict=True) if entry is not None]
            if span is not None:
                span.set("rerank.cache.found", len(found))
        finally:
            if span is not None:
                span.end()
        if not found:
            return
        self._flights.resolve(flight, found)
        for key, entry in found:
            for index in own[key]:
                hits[index] = entry
        if self._memory is not None:
            await _write_back(self._memory, self._redis, found)

    async def _wait_for(
        self, others: dict[bytes, tuple[Flight, list[int]]], hits: dict[int, CachedScore], wait: float
    ) -> int:
        """Wait for the flights of `others` (at most `wait` seconds); their scores become hits.
        Returns the pairs so answered."""
        if not others:
            return 0
        flights = {id(flight): flight for flight, _ in others.values()}
        span = tracing.child("rerank.cache.wait", {"rerank.pairs": len(others)})
        try:
            async with asyncio.timeout(wait):
                for flight in flights.values():
                    await flight.wait()
        except TimeoutError:
            pass  # what has not come by now, this call computes
        finally:
            if span is not None:
                span.end()
        answered = 0
        memory = self._memory
        for key, (flight, indices) in others.items():
            entry = flight.scores.get(key)
            if entry is None and memory is not None:
                entry = memory.get(key)  # stored by a call other than the one waited for
            if entry is None:
                continue
            answered += 1
            for index in indices:
                hits[index] = entry
        return answered

    def _counted(self, lookup: CacheLookup) -> CacheLookup:
        self._calls[lookup.outcome] += 1
        if lookup.outcome is not CacheOutcome.OFF:
            self._hits += len(lookup.hits)
            self._misses += len(lookup.missing)
        return lookup


async def _write_back(memory: MemoryTier, redis: RedisTier, found: list[tuple[bytes, CachedScore]]) -> None:
    """Copy Redis's hits to memory, so the next call finds them there, for no longer than
    Redis keeps them: a score is used for `--cache-ttl` from when it was computed, in either
    tier, not that again from each replica's first read. (A second round trip, once per pair
    and replica; the pairs found together were mostly stored together, and all are kept for
    the shortest time any has left: one read again from Redis early costs a round trip.)"""
    left = await redis.time_left([key for key, _ in found])
    kept = [(pair, seconds) for pair, seconds in zip(found, left, strict=True) if seconds != 0]  # 0: gone
    times = [seconds for _, seconds in kept if seconds is not None]  # None: Redis keeps it for good
    if kept:
        memory.put_many([pair for pair, _ in kept], ttl=min(times) if times else None)


class CacheLookup:
    """One call's view of the cache: `hits` by index, the indices `missing` (to compute), the
    `outcome`. Store the computed scores with `store`, then `release` (or use it in a `with`)."""

    __slots__ = ("_cache", "_flight", "hits", "keys", "missing", "mode", "outcome")

    def __init__(
        self,
        cache: ScoreCache,
        keys: Sequence[bytes],
        mode: CacheMode,
        hits: dict[int, CachedScore],
        missing: list[int],
        flight: Flight | None,
    ) -> None:
        self._cache = cache
        self.keys = keys
        self.mode = mode
        self.hits = hits
        self.missing = missing
        self._flight = flight
        # What the lookup found, for x-cache: hits and missing do not change after it.
        if mode is CacheMode.OFF:
            self.outcome = CacheOutcome.OFF
        elif not hits:
            self.outcome = CacheOutcome.MISS
        else:
            self.outcome = CacheOutcome.PARTIAL if missing else CacheOutcome.HIT

    async def store(self, scores: Mapping[int, CachedScore]) -> None:
        """Keep the computed scores, by document index (a chunk's as it succeeds): in the
        tiers, and for the calls waiting on them. Nothing under OFF."""
        await self.store_columns(
            list(scores), [entry.score for entry in scores.values()], [e.tokens for e in scores.values()]
        )

    async def store_columns(
        self, indices: Sequence[int], scores: Sequence[float], tokens: Sequence[int | None]
    ) -> None:
        """`store`, with the scores as columns: document `indices[i]` scored `scores[i]`, its
        tokens `tokens[i]` (None: not counted)."""
        if self.mode is CacheMode.OFF or not indices:
            return
        keys = list(map(self.keys.__getitem__, indices))
        await self._cache.store_columns(keys, scores, tokens, self._flight)

    def release(self) -> None:
        """Done with the lookup: pairs claimed and not stored are free for their waiters to compute."""
        if self._flight is not None:
            self._cache.release(self._flight)
            self._flight = None

    def __enter__(self) -> CacheLookup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
