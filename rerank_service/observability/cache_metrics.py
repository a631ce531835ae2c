"""The score cache's metrics: what it answered, per route, and what it holds.

Per-route counts are recorded as each call's lookup ends; the cache's own counters (its
size, evictions, Redis errors) are process-wide and copied in when the cache is built and
after each call that used it (`sync`), so in `serve --workers N` they are written to files
like every other metric and the supervisor sums them.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge


class CacheCounts(Protocol):
    """The cache's own counters (cache.CacheStats), as read here."""

    @property
    def entries(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @property
    def expirations(self) -> int: ...
    @property
    def redis_errors(self) -> int: ...
    @property
    def redis_up(self) -> bool | None: ...


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pairs = Counter(
            "rerank_cache_pairs",
            "Query-document pairs looked up in the score cache, by route and result (hit: answered "
            "from the cache, the backend spared; miss: sent to the backend).",
            ["route", "result"],
            registry=registry,
        )
        self.calls = Counter(
            "rerank_cache_calls",
            "Backend calls (one per chunk) through the score cache, by route and outcome: hit (every "
            "pair cached: no backend call made), partial, miss.",
            ["route", "outcome"],
            registry=registry,
        )
        self.entries = Gauge(
            "rerank_cache_entries",
            "Scores held in the in-process tier.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.bytes = Gauge(
            "rerank_cache_bytes",
            "Bytes the in-process tier holds, as counted against --cache-memory-mb.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.evictions = Counter(
            "rerank_cache_evictions",
            "Scores dropped from the in-process tier: for room (reason size) or past --cache-ttl (expired).",
            ["reason"],
            registry=registry,
        )
        self.store_errors = Counter(
            "rerank_cache_store_errors",
            "Redis round trips of the score cache that failed or timed out (each a miss, never a "
            "failed call).",
            registry=registry,
        )
        # Made once a cache with a Redis tier is synced (`_store_up`): an unlabelled gauge
        # reads 0 from its making, which would say "Redis down" for a process without a
        # Redis tier, or (livemin across --workers) for a worker that has not been synced.
        self._registry = registry
        self.store_up: Gauge | None = None
        # Each route's children, bound once: (calls by outcome, pairs hit, pairs missed).
        self._routes: dict[str, tuple[dict[str, Counter], Counter, Counter]] = {}
        self._size_evictions = self.evictions.labels("size")
        self._expirations = self.evictions.labels("expired")
        # What was copied in so far: entries, bytes, evictions, expirations, store errors,
        # store up. A call that changed none of them (a hit) sets nothing.
        self._seen: tuple[int, int, int, int, int, bool | None] = (0, 0, 0, 0, 0, None)

    def looked_up(self, route: str, outcome: str, hits: int, misses: int) -> None:
        """One backend call's lookup: `outcome` hit, partial or miss."""
        children = self._routes.get(route)
        if children is None:
            children = self._routes[route] = (
                {},
                self.pairs.labels(route, "hit"),
                self.pairs.labels(route, "miss"),
            )
        calls = children[0].get(outcome)
        if calls is None:
            calls = children[0][outcome] = self.calls.labels(route, outcome)
        calls.inc()
        if hits:
            children[1].inc(hits)
        if misses:
            children[2].inc(misses)

    def sync(self, counts: CacheCounts) -> None:
        """Copy the cache's own counters in (they only grow; the gauges are set)."""
        entries, size, evictions, expirations, errors, up = self._seen
        if counts.entries != entries:
            self.entries.set(counts.entries)
        if counts.bytes != size:
            self.bytes.set(counts.bytes)
        if counts.evictions > evictions:
            self._size_evictions.inc(counts.evictions - evictions)
        if counts.expirations > expirations:
            self._expirations.inc(counts.expirations - expirations)
        if counts.redis_errors > errors:
            self.store_errors.inc(counts.redis_errors - errors)
        if counts.redis_up is not None and counts.redis_up is not up:
            self._store_up().set(1 if counts.redis_up else 0)
        self._seen = (
            counts.entries,
            counts.bytes,
            counts.evictions,
            counts.expirations,
            counts.redis_errors,
            counts.redis_up,
        )

    def _store_up(self) -> Gauge:
        if self.store_up is None:
            self.store_up = Gauge(
                "rerank_cache_store_up",
                "1 while the score cache's Redis answers, 0 while it is skipped after a failure "
                "(absent without a Redis tier).",
                registry=self._registry,
                multiprocess_mode="livemin",
            )
        return self.store_up
