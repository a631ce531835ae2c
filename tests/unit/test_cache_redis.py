"""The shared tier against a real Redis server: exact scores shared between caches, entries
that expire, and a Redis that dies, hangs or comes back read as misses, never as failures."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rerank_service.cache import (
    CachedScore,
    CacheOutcome,
    MemoryTier,
    PairKeys,
    RedisTier,
    ScoreCache,
    deployment_fingerprint,
    redis_client,
)
from rerank_service.cache.entry import pack
from rerank_service.cache.redis_tier import KEY_PREFIX
from tests.support.certs import CertificateAuthority
from tests.support.logs import LogCapture
from tests.support.redis_proxy import RedisProxy, fail_over
from tests.support.redis_server import RedisServer, RedisTls

KEYS = PairKeys(deployment_fingerprint({"model": "qwen3-rerank"}))
DOCUMENTS = ["first document", "second document", "third document"]
SCORES = [CachedScore(0.1 + 0.2, 11), CachedScore(1 / 3), CachedScore(5e-324, 2**33)]
# Guards against a hang only: the tier's own timeout is what bounds each call.
HANG = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys() -> list[bytes]:
    return KEYS.keys(None, "query", DOCUMENTS)


def tier(
    url: str, clock: Callable[[], float] | None = None, timeout: float = 0.2, **options: object
) -> RedisTier:
    ca_file = options.pop("ca_file", None)
    assert ca_file is None or isinstance(ca_file, str)
    client = redis_client(url, timeout=timeout, ca_file=ca_file)
    return RedisTier(client, ttl=3600, timeout=timeout, retry_after=1.0, clock=clock or Clock())


@pytest.fixture
async def shared(redis_empty: RedisServer) -> AsyncIterator[RedisTier]:
    redis = tier(redis_empty.url)
    yield redis
    await redis.aclose()


async def store_all(cache: ScoreCache) -> None:
    lookup = await cache.lookup(keys())
    with lookup:
        await lookup.store(dict(enumerate(SCORES)))


def bits(entry: CachedScore) -> tuple[bytes, int | None]:
    return struct.pack("<d", entry.score), entry.tokens


async def test_a_score_round_trips_through_redis_to_the_last_bit(shared: RedisTier) -> None:
    await shared.put_many(list(zip(keys(), SCORES, strict=True)))
    found = await shared.get_many(keys())
    assert [bits(entry) for entry in found if entry is not None] == [bits(entry) for entry in SCORES]
    assert (shared.hits, shared.misses, shared.errors) == (3, 0, 0)


async def test_entries_expire_in_redis_after_the_time_to_live(
    shared: RedisTier, redis_empty: RedisServer
) -> None:
    await shared.put_many([(keys()[0], SCORES[0])])
    with redis_empty.client() as client:
        ttl_ms = client.pttl(KEY_PREFIX + keys()[0])
        stored = client.get(KEY_PREFIX + keys()[0])
    assert 0 < ttl_ms <= 3600 * 1000
    assert isinstance(stored, bytes)
    assert len(stored) == 12  # the packed score and tokens: no text


async def test_two_caches_share_their_entries_through_redis(redis_empty: RedisServer) -> None:
    """Two replicas: what one computed, the other's first call answers from Redis, and keeps
    in its own memory."""
    first = ScoreCache(MemoryTier(1 << 20, ttl=3600), tier(redis_empty.url))
    second = ScoreCache(MemoryTier(1 << 20, ttl=3600), tier(redis_empty.url))
    try:
        await store_all(first)
        lookup = await second.lookup(keys())
        lookup.release()
        assert lookup.outcome is CacheOutcome.HIT
        assert [bits(lookup.hits[index]) for index in range(3)] == [bits(entry) for entry in SCORES]
        stats = second.stats()
        assert (stats.redis_hits, stats.entries) == (3, 3)
        redis_empty.flush()
        again = await second.lookup(keys())  # from its memory now
        again.release()
        assert again.outcome is CacheOutcome.HIT
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_score_copied_from_redis_is_kept_in_memory_no_longer_than_redis_keeps_it(
    redis_empty: RedisServer,
) -> None:
    """Another replica stored the scores 3,590 s ago (10 s of the hour left): this one's copy
    expires with them, not an hour after its first read."""
    with redis_empty.client() as client:
        for key, entry in zip(keys(), SCORES, strict=True):
            client.set(KEY_PREFIX + key, pack(entry), px=10_000)
    clock = Clock()
    memory = MemoryTier(1 << 20, ttl=3600, clock=clock)
    reader = ScoreCache(memory, tier(redis_empty.url))
    try:
        lookup = await reader.lookup(keys())
        lookup.release()
        assert lookup.outcome is CacheOutcome.HIT
        redis_empty.flush()  # from here on, only the memory tier answers
        clock.now = 9.0
        assert [memory.get(key) is not None for key in keys()] == [True] * 3
        clock.now = 10.5
        assert [memory.get(key) for key in keys()] == [None] * 3
    finally:
        await reader.aclose()


async def test_writes_and_times_left_survive_redis_losing_the_scripts(
    shared: RedisTier, redis_empty: RedisServer
) -> None:
    """The writes and the time-left reads run as Lua scripts by their SHA-1: a Redis that
    lost them (restarted, SCRIPT FLUSH) gets them again, and nothing is lost or counted an
    error."""
    with redis_empty.client() as client:
        client.set(KEY_PREFIX + keys()[2], pack(SCORES[2]))  # kept for good: no time left
    for _ in range(2):
        with redis_empty.client() as client:
            client.script_flush()
        await shared.put_many(list(zip(keys()[:2], SCORES[:2], strict=True)))
        with redis_empty.client() as client:
            client.script_flush()
        left = await shared.time_left([*keys(), b"never-stored"])
        assert [0 < seconds <= 3600 for seconds in left[:2] if seconds is not None] == [True, True]
        assert left[2:] == [None, 0.0]
    found = await shared.get_many(keys())
    assert [bits(entry) for entry in found if entry is not None] == [bits(entry) for entry in SCORES]
    assert shared.errors == 0


async def test_a_redis_that_refuses_scripts_is_written_with_pipelines(
    redis_own: RedisServer, logs: LogCapture
) -> None:
    """An ACL without @scripting (or EVAL disabled): the writes and the time-left reads go
    as pipelines of the same commands, said once; nothing is lost or counted an error."""
    with redis_own.client() as client:
        client.acl_setuser(
            "noscripts", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@scripting"]
        )
    limited = tier(redis_own.url.replace("redis://", "redis://noscripts:pw@"))
    try:
        for _ in range(2):
            await limited.put_many(list(zip(keys()[:2], SCORES[:2], strict=True)))
            left = await limited.time_left(keys())
            assert [0 < seconds <= 3600 for seconds in left[:2] if seconds is not None] == [True, True]
            assert left[2] == 0.0
        found = await limited.get_many(keys()[:2])
        assert [bits(entry) for entry in found if entry is not None] == [bits(e) for e in SCORES[:2]]
        assert (limited.errors, limited.scripts) == (0, False)
        assert [event["event"] for event in logs.events() if "scripts" in event["event"]] == [
            "score cache: redis refuses scripts, writing with pipelines"
        ]
    finally:
        await limited.aclose()


async def test_a_redis_that_refuses_the_tiers_keys_is_not_taken_back_by_a_try_without_a_call(
    redis_own: RedisServer,
) -> None:
    """An ACL user without the tier's keys: each lookup is refused (NOPERM). The try that
    a process without calls makes (ping) must not take the tier for back up, as a PING,
    which Redis answers, would: the metric said up, and the log flapped at every call."""
    with redis_own.client() as client:
        client.acl_setuser(
            "elsewhere", enabled=True, passwords=["+pw"], keys=["~other:*"], commands=["+@all"]
        )
    clock = Clock()
    refused = tier(redis_own.url.replace("redis://", "redis://elsewhere:pw@"), clock=clock)
    try:
        assert await refused.get_many(keys()) == [None] * 3
        assert not refused.up
        clock.now += 1.0  # a try is due
        await refused.ping()
        assert not refused.up
        assert refused.errors == 2
    finally:
        await refused.aclose()


async def test_a_killed_redis_reads_as_misses_and_the_tier_comes_back(
    redis_own: RedisServer, logs: LogCapture
) -> None:
    clock = Clock()
    cache = ScoreCache(None, tier(redis_own.url, clock))
    try:
        await store_all(cache)
        redis_own.kill()
        async with asyncio.timeout(HANG):
            lookup = await cache.lookup(keys())
        lookup.release()
        assert lookup.outcome is CacheOutcome.MISS
        assert lookup.missing == [0, 1, 2]
        stats = cache.stats()
        assert (stats.redis_errors, stats.redis_up) == (1, False)
        # While it is taken for down, calls do not try it (no error, no wait) ...
        for _ in range(3):
            skipped = await cache.lookup(keys())
            skipped.release()
            assert skipped.outcome is CacheOutcome.MISS
        assert cache.stats().redis_errors == 1
        redis_own.start()  # empty: no persistence
        # ... and the first call after `retry_after` tries it again.
        clock.now += 1.0
        await store_all(cache)
        assert cache.stats().redis_up is True
        back = await cache.lookup(keys())
        back.release()
        assert back.outcome is CacheOutcome.HIT
    finally:
        await cache.aclose()
    lines = [event["event"] for event in logs.events() if "redis" in event["event"]]
    assert lines == [
        "score cache: redis unreachable, reading it as misses until it answers",
        "score cache: redis answers again",
    ]


async def test_a_redis_refusing_writes_is_still_read_and_says_so_once(
    redis_own: RedisServer, logs: LogCapture
) -> None:
    """Out of memory under noeviction (or a read-only replica): each refused write took the
    whole tier for down, its reads skipped, and the log said down and up once a second."""
    writer = tier(redis_own.url)
    reader = tier(redis_own.url)
    client = redis_client(redis_own.url, timeout=HANG)
    try:
        await writer.put_many(list(zip(keys(), SCORES, strict=True)))
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", "1")
        others = KEYS.keys(None, "another query", DOCUMENTS)
        for _ in range(3):
            await reader.put_many(list(zip(others, SCORES, strict=True)))

        assert reader.up
        assert reader.errors == 3
        assert [entry is not None for entry in await reader.get_many(keys())] == [True, True, True]
    finally:
        await client.config_set("maxmemory", "0")
        await client.aclose()
        await writer.aclose()
        await reader.aclose()
    lines = [(event["event"], event.get("error")) for event in logs.events() if "redis" in event["event"]]
    assert lines == [("score cache: redis refuses writes, new scores are not shared", "OutOfMemoryError")]


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipeline"])
async def test_after_a_failover_behind_one_address_new_scores_are_shared_again(
    redis_own: RedisServer, scripts: bool
) -> None:
    """Redis reached through one address (a VIP, a Kubernetes Service): a failover demotes the
    primary, which keeps the tier's connection open and refuses its writes on it, READONLY.
    That write is lost; the next one connects again through the address, to the new primary,
    whether the writes go as the script or as the pipeline of a Redis refusing scripts."""
    others = KEYS.keys(None, "another query", DOCUMENTS)
    with RedisServer() as new_primary:
        async with RedisProxy(redis_own.port) as proxy:
            shared = tier(proxy.url())
            shared.scripts = scripts
            try:
                await shared.put_many(list(zip(keys(), SCORES, strict=True)))
                fail_over(proxy, redis_own, new_primary)
                await shared.put_many(list(zip(keys(), SCORES, strict=True)))  # refused: READONLY
                assert shared.errors == 1

                await shared.put_many(list(zip(others, SCORES, strict=True)))
                assert shared.errors == 1
                assert shared.up
            finally:
                await shared.aclose()
        with new_primary.client() as client:
            assert client.exists(*(KEY_PREFIX + key for key in others)) == len(others)


async def test_a_redis_that_does_not_answer_is_a_miss_at_the_timeout(redis_own: RedisServer) -> None:
    """A hung Redis (SIGSTOP: connections accepted, nothing answered): the lookup ends at the
    tier's timeout as a miss, counted as a timeout, and a store loses its writes quietly."""
    clock = Clock()
    cache = ScoreCache(None, tier(redis_own.url, clock))
    try:
        await store_all(cache)
        redis_own.pause()
        async with asyncio.timeout(HANG):
            lookup = await cache.lookup(keys())
        lookup.release()
        assert lookup.outcome is CacheOutcome.MISS
        stats = cache.stats()
        assert (stats.redis_errors, stats.redis_timeouts) == (1, 1)
        clock.now += 1.0
        async with asyncio.timeout(HANG):
            await store_all(cache)  # the lookup tries again and times out; the store skips it
        assert cache.stats().redis_timeouts == 2
        redis_own.resume()
        clock.now += 1.0
        back = await cache.lookup(keys())
        back.release()
        assert back.outcome is CacheOutcome.HIT
    finally:
        await cache.aclose()


async def test_rediss_with_a_ca_file(tmp_path: Path) -> None:
    authority = CertificateAuthority()
    cert, key = authority.issue_server().write(tmp_path, "redis")
    ca = authority.write(tmp_path)
    with RedisServer(tls=RedisTls(cert, key, ca)) as server:
        assert server.url.startswith("rediss://")
        # A TLS handshake is CPU work: on a loaded machine it alone can take 0.2 s. What is
        # tested is the trust, not the timeout.
        trusted = tier(server.url, timeout=HANG, ca_file=str(ca))
        untrusted = tier(server.url, timeout=HANG)  # the system's CAs do not know the test CA
        try:
            await trusted.put_many([(keys()[0], SCORES[0])])
            assert await trusted.get_many(keys()[:1]) == [SCORES[0]]
            assert trusted.errors == 0
            assert await untrusted.get_many(keys()[:1]) == [None]
            assert untrusted.errors == 1
        finally:
            await trusted.aclose()
            await untrusted.aclose()


def test_a_ca_file_needs_a_tls_url() -> None:
    with pytest.raises(ValueError, match="rediss://"):
        redis_client("redis://127.0.0.1:6379/0", ca_file="/etc/ssl/certs/ca-certificates.crt")
