"""With `--limits-store`, each call is also taken from this process's own buckets and calls
in flight: a call they refuse is refused at once (no round trip, no concurrent re-check
holding its admission slot), and when Redis stops or starts answering the process goes on
from what it really holds and used. Against a real Redis."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from rerank_service.config.callers import CallerLimits
from rerank_service.core.domain import ServiceError
from rerank_service.pipeline.buckets import CONCURRENT, CONCURRENT_RETRY_AFTER, Refusal
from rerank_service.pipeline.callers import Caller
from rerank_service.pipeline.limits import CALLER_LIMITED, Grant, Limiter
from rerank_service.pipeline.limits_store import RedisLimits
from rerank_service.redis_client import redis_client
from tests.support.redis_server import RedisServer
from tests.unit.test_limits_store import HANG, LONG_LEASE, RPM, Clock, call, requests, store

INDEXER = Caller("indexer", limits=CallerLimits(concurrent=1), configured=True)


async def admitted(limiter: Limiter, caller: Caller, lease: str, deadline: float | None = None) -> Grant:
    async with asyncio.timeout(HANG):
        grant = await limiter.admit(caller, call(), lease, deadline)
    assert grant is not None
    return grant


async def refused(
    limiter: Limiter, caller: Caller, lease: str, deadline: float | None = None
) -> ServiceError:
    with pytest.raises(ServiceError) as error:
        async with asyncio.timeout(HANG):
            await limiter.admit(caller, call(), lease, deadline)
    return error.value


def limit_of(error: ServiceError) -> str:
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == CALLER_LIMITED
    return error.metadata["limit"]


async def test_a_caller_at_its_concurrent_limit_in_this_process_is_refused_without_asking_redis(
    redis_empty: RedisServer,
) -> None:
    """Checked through Redis (and checked again 50 ms later), each refused call of a flood held
    its admission slot the while: a caller at its limit filled them, refusing others OVERLOADED."""
    limiter = Limiter(store(redis_empty.url))
    assert limiter.store is not None
    try:
        grant = await admitted(limiter, INDEXER, "a")
        assert grant.lease == "a"  # through Redis
        round_trips = limiter.store.round_trips

        refusals = [await refused(limiter, INDEXER, f"flood-{i}") for i in range(5)]

        assert [limit_of(error) for error in refusals] == [CONCURRENT] * 5
        assert limiter.store.round_trips == round_trips  # refused at once, as without a store
        limiter.settle(grant, 0)
        assert (await admitted(limiter, INDEXER, "b")).lease == "b"
    finally:
        await limiter.close()


async def test_a_callers_calls_being_checked_count_against_its_concurrent_limit(
    redis_empty: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its call in flight is on another process: this one's first call waits to check again,
    holding one slot; the flood's other calls are refused at once instead of each waiting too."""
    elsewhere = Limiter(store(redis_empty.url))
    patient = RedisLimits(redis_client(redis_empty.url, timeout=HANG), timeout=HANG)  # a long wait
    here = Limiter(patient)
    checked = asyncio.Event()
    check_once = patient._check

    async def spied(*args: Any) -> Refusal | None:
        answer = await check_once(*args)
        checked.set()  # take goes on to its wait before this test's task runs again
        return answer

    monkeypatch.setattr(patient, "_check", spied)
    try:
        await admitted(elsewhere, INDEXER, "elsewhere")
        waiting = asyncio.create_task(here.admit(INDEXER, call(), "waits", None))
        async with asyncio.timeout(HANG):
            await checked.wait()
        round_trips = patient.round_trips

        # With a deadline too near to check again: at most one round trip, were it sent.
        flood = await refused(here, INDEXER, "flood", time.monotonic() + HANG / 2)

        assert limit_of(flood) == CONCURRENT
        assert patient.round_trips == round_trips
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert here.local.in_flight("indexer") == 0  # the cancelled call holds nothing here
    finally:
        await elsewhere.close()
        await here.close()


async def test_a_call_redis_refuses_holds_nothing_in_this_process(redis_empty: RedisServer) -> None:
    elsewhere, here = Limiter(store(redis_empty.url)), Limiter(store(redis_empty.url))
    try:
        other = await admitted(elsewhere, INDEXER, "elsewhere")
        near = time.monotonic() + 0.05  # no time to check again
        assert limit_of(await refused(here, INDEXER, "refused", near)) == CONCURRENT
        elsewhere.settle(other, 0)
        assert elsewhere.store is not None
        await elsewhere.store.flush()  # its lease sent back

        assert (await admitted(here, INDEXER, "next")).lease == "next"
    finally:
        await elsewhere.close()
        await here.close()


async def test_a_call_admitted_through_redis_counts_in_flight_here_when_redis_goes_down(
    redis_own: RedisServer,
) -> None:
    limiter = Limiter(store(redis_own.url), fail_open=True)
    try:
        grant = await admitted(limiter, INDEXER, "a")
        assert grant.lease == "a"
        redis_own.kill()

        assert limit_of(await refused(limiter, INDEXER, "b")) == CONCURRENT
        limiter.settle(grant, 0)  # given back here too, though Redis took it
        assert (await admitted(limiter, INDEXER, "c")).lease is None  # served here
    finally:
        await limiter.close()


async def test_a_bucket_emptied_through_redis_stays_empty_here_when_redis_goes_down(
    redis_own: RedisServer,
) -> None:
    limiter = Limiter(store(redis_own.url), fail_open=True)
    search = Caller("search", limits=requests(3), configured=True)  # one more every 20 s
    try:
        grants = [await admitted(limiter, search, f"r{i}") for i in range(3)]
        assert [grant.lease for grant in grants] == ["r0", "r1", "r2"]
        redis_own.kill()

        assert limit_of(await refused(limiter, search, "r3")) == RPM
    finally:
        await limiter.close()


async def test_calls_admitted_here_while_redis_was_down_count_when_it_answers_again(
    redis_own: RedisServer,
) -> None:
    clock = Clock()
    limiter = Limiter(store(redis_own.url, clock), fail_open=True)
    assert limiter.store is not None
    try:
        redis_own.kill()
        local = await admitted(limiter, INDEXER, "a")
        assert local.lease is None  # Redis never saw it
        redis_own.start()  # empty: it knows of no call in flight
        clock.now += 1.0  # the store may be tried again
        assert (
            await admitted(limiter, Caller("ads", limits=requests(100), configured=True), "x")
        ).lease == "x"
        assert limiter.store.up

        assert limit_of(await refused(limiter, INDEXER, "b")) == CONCURRENT
        limiter.settle(local, 0)
        assert (await admitted(limiter, INDEXER, "c")).lease == "c"
    finally:
        await limiter.close()


async def test_failing_closed_takes_nothing_here(redis_own: RedisServer) -> None:
    clock = Clock()
    limiter = Limiter(store(redis_own.url, clock), fail_open=False)
    try:
        redis_own.kill()
        for lease in ("a", "b"):
            error = await refused(limiter, INDEXER, lease)
            assert error.reason == "LIMITS_STORE_UNAVAILABLE"
        redis_own.start()
        clock.now += 1.0

        assert (await admitted(limiter, INDEXER, "c")).lease == "c"
    finally:
        await limiter.close()


TENANTS = Path(__file__).resolve().parents[2] / "docs" / "TENANTS.md"


def documented_acl() -> list[str]:
    """The ACL rules TENANTS.md gives the store's user: the `+...` and `~...` spans of the
    paragraph that names them."""
    paragraphs = TENANTS.read_text(encoding="utf-8").split("\n\n")
    (paragraph,) = [text for text in paragraphs if "An ACL user for the store needs" in text]
    spans = re.findall(r"`([^`]+)`", paragraph)
    return [rule for span in spans if span[0] in "+~" for rule in span.split()]


async def test_the_acl_tenants_documents_for_the_store_serves_a_database_other_than_0(
    redis_own: RedisServer,
) -> None:
    """redis-py selects the URL's database on each connection: SELECT must be allowed."""
    rules = documented_acl()
    assert "~rerank:limits:*" in rules
    with redis_own.client() as client:
        client.execute_command("ACL", "SETUSER", "limits", "on", ">secret-password", *rules)
    errors: list[int] = []
    url = f"redis://limits:secret-password@127.0.0.1:{redis_own.port}/1"
    limits_store = RedisLimits(
        redis_client(url, timeout=HANG), timeout=HANG, on_error=lambda: errors.append(1)
    )
    try:
        limits = CallerLimits(requests=requests(2).requests, concurrent=1)
        assert await limits_store.take("search", limits, [1], "a", LONG_LEASE) is None
        assert await limits_store.take(
            "search", limits, [1], "b", LONG_LEASE, deadline=time.monotonic()
        ) == Refusal(CONCURRENT, CONCURRENT_RETRY_AFTER)
    finally:
        await limits_store.aclose()

    assert errors == []
    with redis_own.client() as client:
        assert client.info("keyspace")["db1"]["keys"] == 2  # the caller's bucket and its leases
