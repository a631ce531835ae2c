"""Token buckets: what a caller may take now, and when it may take more.

A bucket of a limit (requests, documents or tokens per minute) refills evenly at the
limit's rate and holds at most its burst (one minute's worth unless configured). A call
takes its cost from every bucket of its caller at once, or from none: it is let in when
each bucket holds its cost; a call that costs more than a whole bucket is let in when
that bucket is full, and the debt it leaves (a level below zero) is paid off by the
refill before the next call, so the rate over time holds whatever the calls' sizes. That
is a token bucket, not a fixed window, which would let twice the limit through around a
window's boundary.

`LocalBuckets` keeps them in this process: every call of a caller with limits is taken
from them, with a store too (what this process itself used and holds, checked before the
store and used while it is down: limits.py); the Redis store (limits_store.py) runs the
same rule in one Lua script. Both answer a `Refusal`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rerank_service.config.callers import BucketLimit, CallerLimits

CONCURRENT = "concurrent"
# What a caller refused for its calls in flight is told to wait: one of them may end any time.
CONCURRENT_RETRY_AFTER = 0.1


@dataclass(frozen=True, slots=True)
class Refusal:
    """The limit that refused a call (the one whose wait is longest) and that wait in seconds."""

    limit: str
    retry_after: float


def costs_of(limits: CallerLimits, documents: int, tokens: int) -> list[float]:
    """A call's cost in each of `limits.buckets`, in their order."""
    costs = []
    if limits.requests is not None:
        costs.append(1.0)
    if limits.documents is not None:
        costs.append(float(documents))
    if limits.tokens is not None:
        costs.append(float(tokens))
    return costs


def shortfall(level: float, bucket: BucketLimit, cost: float) -> float:
    """Seconds until `bucket` at `level` lets a call of `cost` in (0: now). A cost larger
    than the bucket waits for it to be full."""
    need = min(cost, bucket.burst)
    return 0.0 if level >= need else (need - level) / bucket.per_second


class LocalBuckets:
    """Every caller's buckets and calls in flight, in this process (with a store too)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._levels: dict[tuple[str, str], tuple[float, float]] = {}  # (level, when)
        self._in_flight: dict[str, int] = {}

    def take(self, caller: str, limits: CallerLimits, costs: Sequence[float]) -> Refusal | None:
        """Take `costs` from the caller's buckets and a call in flight, or take nothing and
        say which limit refused."""
        now = self._clock()
        levels = []
        refusal: Refusal | None = None
        for bucket, cost in zip(limits.buckets, costs, strict=True):
            level = self._level(caller, bucket, now)
            levels.append(level)
            wait = shortfall(level, bucket, cost)
            if wait > 0 and (refusal is None or wait > refusal.retry_after):
                refusal = Refusal(bucket.name, wait)
        concurrent = limits.concurrent
        if refusal is None and concurrent is not None and self._in_flight.get(caller, 0) >= concurrent:
            refusal = Refusal(CONCURRENT, CONCURRENT_RETRY_AFTER)
        if refusal is not None:
            return refusal
        for bucket, cost, level in zip(limits.buckets, costs, levels, strict=True):
            self._levels[caller, bucket.name] = (level - cost, now)
        if limits.concurrent is not None:
            self._in_flight[caller] = self._in_flight.get(caller, 0) + 1
        return None

    def give_back(self, caller: str, limits: CallerLimits, token_correction: float) -> None:
        """A call admitted by `take` ended: its call in flight given back, and its tokens
        bucket corrected by what it really used less what was taken (< 0: some back)."""
        if limits.concurrent is not None:
            self._in_flight[caller] = max(0, self._in_flight.get(caller, 0) - 1)
        bucket = limits.tokens
        if bucket is not None and token_correction:
            now = self._clock()
            level = self._level(caller, bucket, now)
            self._levels[caller, bucket.name] = (min(bucket.burst, level - token_correction), now)

    def put_back(self, caller: str, limits: CallerLimits, costs: Sequence[float]) -> None:
        """Undo a `take` of `costs` whose call does not run after all (the limits store
        refused it, or it was cancelled meanwhile): its costs and its call in flight back, as
        if never taken (the refill meanwhile is kept)."""
        now = self._clock()
        for bucket, cost in zip(limits.buckets, costs, strict=True):
            level = self._level(caller, bucket, now)
            self._levels[caller, bucket.name] = (min(bucket.burst, level + cost), now)
        if limits.concurrent is not None:
            self._in_flight[caller] = max(0, self._in_flight.get(caller, 0) - 1)

    def in_flight(self, caller: str) -> int:
        return self._in_flight.get(caller, 0)

    def level(self, caller: str, bucket: BucketLimit) -> float:
        """What the caller's bucket holds now (a full one when never used)."""
        return self._level(caller, bucket, self._clock())

    def _level(self, caller: str, bucket: BucketLimit, now: float) -> float:
        state = self._levels.get((caller, bucket.name))
        if state is None:
            return bucket.burst
        level, when = state
        # min(): a reload that shrinks the burst shrinks what a full bucket holds too.
        return min(bucket.burst, level + (now - when) * bucket.per_second)
