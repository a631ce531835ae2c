"""The shared tier: pair keys to packed scores in Redis, so replicas and workers share hits.

Redis is an optimisation here, never a dependency: every read and write is one round trip
(MGET; one script that SETs each pair with its expiry) cut at a short timeout, and any error or timeout is
a miss (a lost write), counted, never a failed or slow call. After a failure the tier is
skipped for `retry_after` seconds, so a Redis that is down or slow costs one call a timeout
now and then instead of every call; the first call after that tries again, and the tier is
back as soon as Redis answers. The outage is logged once when it starts and once when it
ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from rerank_service.cache.entry import CachedScore, pack, unpack
from rerank_service.observability.logging import get_logger
from rerank_service.redis_client import DEFAULT_TIMEOUT, RedisOutage, reconnect_if_read_only, timed_out
from rerank_service.redis_client import redis_client as redis_client  # opened in one place

_log = get_logger("rerank_service.cache")

DEFAULT_RETRY_AFTER = 1.0  # seconds the tier is skipped after a failure
KEY_PREFIX = b"rerank:score:"
_PROBE_KEY = b"probe"  # no pair's key: theirs are digests of cache.keys.KEY_SIZE bytes
# A call's writes as one command, not a pipeline of SETs: redis-py builds, sends and parses
# each pipelined command in Python: three times the client's CPU of one script's run (20 pairs).
# KEYS: the pairs' keys; ARGV[1]: their time to live in ms; ARGV[i + 1]: KEYS[i]'s entry.
_STORE_SCRIPT = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[i + 1], 'PX', ttl)
end
return #KEYS
"""
# Each key's time to live left in ms (PTTL: -2 gone, -1 kept for good), in one command.
_TIME_LEFT_SCRIPT = """
local left = {}
for i, key in ipairs(KEYS) do
    left[i] = redis.call('PTTL', key)
end
return left
"""


class RedisTier:
    """`get_many` and `put_many` by pair key on `client`, entries expiring after `ttl` seconds."""

    def __init__(
        self,
        client: Redis,
        *,
        ttl: float,
        timeout: float = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
        key_prefix: bytes = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or timeout <= 0 or retry_after < 0:
            raise ValueError("ttl and timeout must be > 0, retry_after >= 0")
        self._client = client
        self._ttl_ms = max(1, round(ttl * 1000))
        self.timeout = timeout
        self._prefix = key_prefix
        # Run by their SHA-1; loaded again by redis-py when Redis has lost them (a restart).
        # A Redis that refuses scripts (EVAL disabled, an ACL without @scripting) is sent
        # pipelines of the same commands instead, from its first refusal on.
        self._store = client.register_script(_STORE_SCRIPT)
        self._time_left = client.register_script(_TIME_LEFT_SCRIPT)
        self.scripts = True
        self._outage = RedisOutage(retry_after, clock)
        self.hits = 0
        self.misses = 0
        self.errors = 0  # failed round trips, timeouts included
        self.timeouts = 0
        self.skipped = 0  # round trips not tried while Redis was taken for down
        self._refusals_said: set[str] = set()  # the kinds of refused writes logged

    @property
    def up(self) -> bool:
        return self._outage.up

    async def get_many(self, keys: Sequence[bytes]) -> list[CachedScore | None]:
        """Each key's entry, None for a miss; all None when Redis fails or is skipped."""
        if not keys or not self._may_try():
            return [None] * len(keys)
        prefix = self._prefix
        try:
            async with asyncio.timeout(self.timeout):
                values = await self._client.mget([prefix + key for key in keys])
        except Exception as error:  # any failure of the tier is a miss
            self._failed("get", error)
            return [None] * len(keys)
        self._answered()
        entries = [unpack(value) if isinstance(value, bytes) else None for value in values]
        found = sum(entry is not None for entry in entries)
        self.hits += found
        self.misses += len(entries) - found
        return entries

    async def time_left(self, keys: Sequence[bytes]) -> list[float | None]:
        """Each key's time to live left in Redis, in seconds (0 for one gone meanwhile; None
        for one kept without expiry): what a copy of its entry elsewhere may keep it. One
        round trip; all 0 when Redis fails or is skipped (a copy then is not kept)."""
        if not keys or not self._may_try():
            return [0.0] * len(keys)
        prefix = self._prefix
        try:
            async with asyncio.timeout(self.timeout):
                left = await self._read_time_left([prefix + key for key in keys])
        except Exception as error:  # any failure of the tier: nothing is copied
            self._failed("ttl", error)
            return [0.0] * len(keys)
        self._answered()
        # PTTL: -2 for a key that is gone, -1 for one without expiry.
        return [None if ms == -1 else max(0, ms) / 1000 for ms in left]

    async def put_many(self, entries: Sequence[tuple[bytes, CachedScore]]) -> None:
        """Store each entry with the tier's expiry; a failure loses the writes, nothing else."""
        if not entries or not self._may_try():
            return
        prefix = self._prefix
        try:
            async with asyncio.timeout(self.timeout):
                await self._write([prefix + key for key, _ in entries], [pack(entry) for _, entry in entries])
        except ResponseError as error:
            # Redis answered, refusing the writes (OOM under maxmemory noeviction, a read-only
            # replica after a failover): it is up, its entries are read on; only these are lost.
            self._refused(error)
            # A failover's READONLY: the next writes connect again, to the new primary.
            await reconnect_if_read_only(self._client, error)
            return
        except Exception as error:  # any other failure of the tier is a lost write
            self._failed("put", error)
            return
        self._answered()

    async def ping(self) -> None:
        """While a failure has the tier skipped, once a try is due, the round trip a call's
        lookup makes (an MGET under the tier's prefix, of a key no pair has: a PING would be
        answered by a Redis that refuses the tier's keys, an ACL's NOPERM or a cluster's
        MOVED): its answer brings the tier back up. Nothing otherwise."""
        if self.up or not self._outage.may_try():
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.mget([self._prefix + _PROBE_KEY])
        except Exception as error:  # still down: tried again after retry_after
            self._failed("ping", error)
            return
        self._answered()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _write(self, keys: list[bytes], values: list[bytes]) -> None:
        """SET each of `keys` to its value, expiring after the tier's time to live."""
        if self.scripts:
            try:
                await self._store(keys=keys, args=[self._ttl_ms, *values])
                return
            except ResponseError as error:
                if not self._refuses_scripts(error):
                    raise
        pipe = self._client.pipeline(transaction=False)
        for key, value in zip(keys, values, strict=True):
            pipe.set(key, value, px=self._ttl_ms)
        await pipe.execute()

    async def _read_time_left(self, keys: list[bytes]) -> list[int]:
        """Each of `keys`' PTTL, in ms."""
        if self.scripts:
            try:
                left: list[int] = await self._time_left(keys=keys)
                return left
            except ResponseError as error:
                if not self._refuses_scripts(error):
                    raise
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        return cast(list[int], await pipe.execute())

    def _refuses_scripts(self, error: ResponseError) -> bool:
        """Whether `error` says this Redis runs no scripts for us: then none is sent again."""
        if not isinstance(error, NoPermissionError) and "unknown command" not in str(error).lower():
            return False
        self.scripts = False
        _log.warning("score cache: redis refuses scripts, writing with pipelines", error=type(error).__name__)
        return True

    def _may_try(self) -> bool:
        if self._outage.may_try():
            return True
        self.skipped += 1
        return False

    def _failed(self, operation: str, error: Exception) -> None:
        self.errors += 1
        slow = timed_out(error)
        if slow:
            self.timeouts += 1
        if self._outage.failed():
            _log.warning(
                "score cache: redis unreachable, reading it as misses until it answers",
                operation=operation,
                error=type(error).__name__,
                detail=str(error)[:200] if not slow else f"no answer within {self.timeout:g} s",
            )

    def _refused(self, error: ResponseError) -> None:
        """Writes Redis refused: counted as errors, said once a kind (the error's type; its
        text quotes the command, binary key and value)."""
        self.errors += 1
        self._answered()
        kind = type(error).__name__
        if kind not in self._refusals_said:
            self._refusals_said.add(kind)
            _log.warning("score cache: redis refuses writes, new scores are not shared", error=kind)

    def _answered(self) -> None:
        if self._outage.answered():
            _log.warning("score cache: redis answers again")
