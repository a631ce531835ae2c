"""The callers' buckets in a real Redis: one script a call, shared by every client, atomic
under concurrent calls, settled afterwards; and what the limiter does while Redis is gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio.client import Pipeline

from rerank_service.config import ConfigError, load_settings
from rerank_service.config.callers import BucketLimit, CallerLimits
from rerank_service.config.server import CallersConfig
from rerank_service.core.domain import RerankRequest, ServiceError
from rerank_service.observability.caller_metrics import CallerMetrics
from rerank_service.pipeline.buckets import CONCURRENT, CONCURRENT_RETRY_AFTER, Refusal
from rerank_service.pipeline.callers import Caller
from rerank_service.pipeline.limits import Limiter, build_limiter, estimated_tokens
from rerank_service.pipeline.limits_store import KEY_PREFIX, RedisLimits, StoreUnavailable
from rerank_service.redis_client import redis_client
from tests.support.logs import LogCapture
from tests.support.redis_proxy import RedisProxy, fail_over
from tests.support.redis_server import RedisServer

TIMEOUT = 1.0  # the store's in these tests: a slower round trip on a loaded CI machine would fail a test
HANG = 10.0  # guards against a hang only
RPM = "requests_per_minute"
TPM = "tokens_per_minute"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(url: str, clock: Clock | None = None, errors: list[int] | None = None) -> RedisLimits:
    return RedisLimits(
        redis_client(url, timeout=TIMEOUT),
        timeout=TIMEOUT,
        retry_after=1.0,
        clock=clock or Clock(),
        on_error=(lambda: errors.append(1)) if errors is not None else (lambda: None),
    )


@pytest.fixture
async def two(redis_empty: RedisServer) -> AsyncIterator[tuple[RedisLimits, RedisLimits]]:
    """Two stores on one Redis, as two replicas have."""
    first, second = store(redis_empty.url), store(redis_empty.url)
    yield first, second
    await first.aclose()
    await second.aclose()


def requests(per_minute: float, burst: float | None = None) -> CallerLimits:
    return CallerLimits(requests=BucketLimit(RPM, per_minute, burst or per_minute))


async def test_two_stores_hold_one_callers_limit_together(two: tuple[RedisLimits, RedisLimits]) -> None:
    limits = requests(6)  # a burst of 6, one more every 10 s

    answers = [await two[i % 2].take("search", limits, [1], f"call-{i}", 5) for i in range(8)]

    assert answers[:6] == [None] * 6
    refused = answers[6]
    assert refused is not None
    assert refused.limit == RPM
    assert 0 < refused.retry_after <= 10.0


async def test_concurrent_calls_from_two_stores_never_take_more_than_the_burst(
    two: tuple[RedisLimits, RedisLimits],
) -> None:
    limits = requests(0.001, burst=20)  # no refill to speak of during the test

    answers = await asyncio.gather(
        *(two[i % 2].take("search", limits, [1], f"call-{i}", 5) for i in range(60))
    )

    assert sum(answer is None for answer in answers) == 20


async def test_checks_asked_for_at_once_share_one_round_trip(two: tuple[RedisLimits, RedisLimits]) -> None:
    first, _ = two
    await first.take("warm-up", requests(1), [1], "w", 5)  # the script loaded into Redis
    first.round_trips = 0

    answers = await asyncio.gather(
        *(first.take(f"team-{i % 5}", requests(6), [1], f"c{i}", 5) for i in range(50))
    )

    assert first.round_trips == 1
    assert sum(answer is None for answer in answers) == 5 * 6  # each team's burst, no more


async def test_callers_have_buckets_of_their_own(two: tuple[RedisLimits, RedisLimits]) -> None:
    limits = requests(1)
    first, _ = two

    assert await first.take("search", limits, [1], "a", 5) is None
    assert await first.take("search", limits, [1], "b", 5) is not None
    assert await first.take("ads", limits, [1], "c", 5) is None


async def test_a_correction_after_the_call_charges_what_it_used(
    two: tuple[RedisLimits, RedisLimits], redis_empty: RedisServer
) -> None:
    limits = CallerLimits(tokens=BucketLimit(TPM, 0.001, 1000))
    first, second = two
    assert await first.take("search", limits, [100], "a", 5) is None

    first.settle("search", limits, 850, "a")  # used 950: 50 left
    await first.flush()

    assert await second.take("search", limits, [60], "b", 5) is not None
    assert await second.take("search", limits, [40], "c", 5) is None
    with redis_empty.client() as client:
        assert client.pttl(f"{KEY_PREFIX}{{search}}") > 0  # gone once full again


async def test_calls_in_flight_are_leases_given_back_when_the_call_ends(
    two: tuple[RedisLimits, RedisLimits],
) -> None:
    limits = CallerLimits(concurrent=2)
    first, second = two

    assert await first.take("search", limits, [], "a", 30) is None
    assert await second.take("search", limits, [], "b", 30) is None
    refused = await first.take("search", limits, [], "c", 30)
    second.settle("search", limits, 0, "b")
    await second.flush()
    after = await first.take("search", limits, [], "d", 30)

    assert refused is not None
    assert refused.limit == CONCURRENT
    assert after is None


async def test_a_busy_callers_settlements_ride_on_its_next_check(
    two: tuple[RedisLimits, RedisLimits],
) -> None:
    limits = CallerLimits(
        tokens=BucketLimit(TPM, 0.001, 1000), concurrent=1
    )  # one call at a time: each must give its lease back before the next
    first, second = two
    await first.take("warm-up", limits, [1], "w", 30)  # the script loaded into Redis
    first.round_trips = 0

    for index in range(20):
        assert await first.take("search", limits, [10], f"call-{index}", 30) is None
        first.settle("search", limits, 20, f"call-{index}")  # used 30 each

    assert first.round_trips == 20  # one a call: no round trip of its own for a settlement
    await first.flush()  # the 20th call's settlement (its lease is sent at once anyway)
    assert await second.take("search", limits, [1000 - 20 * 30 - 1], "other", 30) is None
    assert await second.take("search", limits, [2], "more", 30) is not None


async def test_a_settlement_no_check_takes_is_sent_soon_on_its_own(
    two: tuple[RedisLimits, RedisLimits],
) -> None:
    limits = CallerLimits(concurrent=1)
    first, second = two
    assert await first.take("search", limits, [], "a", 30) is None

    first.settle("search", limits, 0, "a")  # no flush, no further call from `first`

    deadline = time.monotonic() + HANG
    while await second.take("search", limits, [], "b", 30) is not None:
        assert time.monotonic() < deadline, "the lease was never given back"
        await asyncio.sleep(0.01)


async def test_a_lease_that_is_never_given_back_expires(two: tuple[RedisLimits, RedisLimits]) -> None:
    limits = CallerLimits(concurrent=1)
    first, _ = two
    assert await first.take("search", limits, [], "crashed", 0.05) is None  # its worker died

    # The lease's expiry is Redis's own clock: polled, never slept past.
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        if await first.take("search", limits, [], "next", 30) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the lease did not expire within {HANG} s")


async def test_a_redis_that_does_not_answer_fails_at_the_timeout_and_is_skipped_until_due(
    redis_own: RedisServer, logs: LogCapture
) -> None:
    clock = Clock()
    errors: list[int] = []
    limits_store = store(redis_own.url, clock, errors)
    limits = requests(100)
    try:
        assert await limits_store.take("search", limits, [1], "a", 5) is None
        redis_own.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await limits_store.take("search", limits, [1], "b", 5)
        waited = time.monotonic() - started
        # Skipped while down: no wait at all, no error counted.
        started_skip = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await limits_store.take("search", limits, [1], "c", 5)
        skipped = time.monotonic() - started_skip
        redis_own.resume()
        clock.now += 1.0
        back = await limits_store.take("search", limits, [1], "d", 5)
    finally:
        await limits_store.aclose()

    assert waited < TIMEOUT + 0.5  # the timeout bounds it (plus the event loop's slack)
    assert skipped < TIMEOUT / 2
    assert back is None
    assert len(errors) == 1
    lines = [event["event"] for event in logs.events() if "limits store" in event["event"]]
    assert lines == [
        "limits store: redis unreachable; limits fall back (--limits-store-failure) until it answers",
        "limits store: redis answers again; limits are shared again",
    ]


async def _until_taken(store: RedisLimits, caller: str, limits: CallerLimits, costs: list[float]) -> None:
    """Poll `store` until a check of `costs` is admitted (a lease given back, tokens back)."""
    deadline = time.monotonic() + HANG
    while await store.take(caller, limits, costs, "next", LONG_LEASE) is not None:
        assert time.monotonic() < deadline, "what the earlier call took was never given back"
        await asyncio.sleep(0.01)


LONG_LEASE = 60.0  # seconds: longer than any wait here, so no lease frees itself by expiring


async def test_a_call_cancelled_while_its_check_is_out_gives_back_its_lease_and_tokens(
    redis_own: RedisServer,
) -> None:
    limits = CallerLimits(tokens=BucketLimit(TPM, 0.001, 100), concurrent=1)
    sent = asyncio.Event()
    patient = RedisLimits(redis_client(redis_own.url, timeout=HANG), timeout=HANG, on_round_trip=sent.set)
    other = store(redis_own.url)
    try:
        assert await patient.take("warm-up", limits, [1], "w", LONG_LEASE) is None  # script loaded
        sent.clear()
        redis_own.pause()  # the check goes out and waits for its answer
        check = asyncio.create_task(patient.take("search", limits, [100], "gone", LONG_LEASE))
        async with asyncio.timeout(HANG):
            await sent.wait()
        check.cancel()
        with pytest.raises(asyncio.CancelledError):
            await check
        redis_own.resume()  # the check runs now, for a call that has gone

        # Its lease back (concurrent 1), and its 100 tokens (the whole bucket) with it.
        await _until_taken(other, "search", limits, [100])
    finally:
        await patient.aclose()
        await other.aclose()


async def test_a_check_answered_too_late_gives_back_the_lease_it_may_have_taken(
    redis_own: RedisServer,
) -> None:
    clock = Clock()
    limits = CallerLimits(concurrent=1)
    late, other = store(redis_own.url, clock), store(redis_own.url)
    try:
        assert await late.take("warm-up", limits, [], "w", LONG_LEASE) is None  # script loaded
        redis_own.pause()
        with pytest.raises(StoreUnavailable):  # the timeout: the limiter falls back
            await late.take("search", limits, [], "late", LONG_LEASE)
        redis_own.resume()  # the check was sent: Redis runs it now, and holds its lease
        clock.now += 1.0  # the store may be tried again

        await _until_taken(other, "search", limits, [])
    finally:
        await late.aclose()
        await other.aclose()


async def test_a_lease_given_back_while_redis_is_skipped_is_sent_once_it_answers(
    redis_own: RedisServer,
) -> None:
    clock = Clock()
    limits = CallerLimits(concurrent=1)
    first, other = store(redis_own.url, clock), store(redis_own.url)
    try:
        assert await first.take("search", limits, [], "a", LONG_LEASE) is None
        redis_own.pause()
        with pytest.raises(StoreUnavailable):  # another caller's check finds Redis gone
            await first.take("ads", limits, [], "x", LONG_LEASE)
        first.settle("search", limits, 0, "a")  # the call ends while Redis is skipped
        with pytest.raises(StoreUnavailable):  # a check skipped carries the settlement, unsent
            await first.take("search", limits, [], "b", LONG_LEASE)
        redis_own.resume()
        clock.now += 1.0

        await _until_taken(other, "search", limits, [])
    finally:
        await first.aclose()
        await other.aclose()


def call(documents: int = 3) -> RerankRequest:
    return RerankRequest("qwen3-rerank", "what is a bucket", ["a token bucket"] * documents)


async def test_the_limiter_falls_back_to_this_process_while_redis_is_down(redis_own: RedisServer) -> None:
    limiter = Limiter(store(redis_own.url), fail_open=True)
    caller = Caller("search", limits=requests(2), configured=True)
    redis_own.kill()
    try:
        async with asyncio.timeout(HANG):
            first = await limiter.admit(caller, call(), "a", None)
            second = await limiter.admit(caller, call(), "b", None)
            with pytest.raises(ServiceError) as refused:
                await limiter.admit(caller, call(), "c", None)
    finally:
        await limiter.close()

    assert first is not None
    assert first.lease is None
    assert second is not None
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_failing_closed_refuses_callers_with_limits_while_redis_is_down(redis_own: RedisServer) -> None:
    limiter = Limiter(store(redis_own.url), fail_open=False)
    limited = Caller("search", limits=requests(100), configured=True)
    redis_own.kill()
    try:
        with pytest.raises(ServiceError) as refused:
            await limiter.admit(limited, call(), "a", None)
        unlimited = await limiter.admit(Caller("ads", configured=True), call(), "b", None)
    finally:
        await limiter.close()

    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "LIMITS_STORE_UNAVAILABLE"
    assert unlimited is None  # a caller without limits needs no store


async def test_the_limiter_corrects_the_token_estimate_when_the_call_ends(redis_empty: RedisServer) -> None:
    limiter = Limiter(store(redis_empty.url))
    caller = Caller("search", limits=CallerLimits(tokens=BucketLimit(TPM, 0.001, 1000)), configured=True)
    request = call()
    try:
        grant = await limiter.admit(caller, request, "a", None)
        assert grant is not None
        assert grant.tokens_taken == estimated_tokens(request)
        limiter.settle(grant, 1000)  # the answer said 1000: the bucket is now empty
        await limiter.close()  # sends the settlement
        limiter = Limiter(store(redis_empty.url))
        with pytest.raises(ServiceError) as refused:
            await limiter.admit(caller, request, "b", None)
    finally:
        await limiter.close()

    assert refused.value.metadata == {"caller": "search", "limit": TPM}


def test_the_token_estimate_is_the_query_once_per_document_and_every_document() -> None:
    request = RerankRequest("m", "q" * 9, ["d" * 30, "é" * 3])  # 3 tokens; 10 and 2 (6 bytes)

    assert estimated_tokens(request) == 2 * 3 + 10 + 2


async def test_the_script_is_loaded_again_into_a_redis_that_lost_it(
    two: tuple[RedisLimits, RedisLimits], redis_empty: RedisServer
) -> None:
    first, _ = two
    assert await first.take("search", requests(5), [1], "a", 5) is None
    with redis_empty.client() as client:
        client.script_flush()  # as a restarted Redis has none

    assert await first.take("search", requests(5), [1], "b", 5) is None
    assert first.errors == 0


def flushes(limits_store: RedisLimits, monkeypatch: pytest.MonkeyPatch) -> asyncio.Queue[None]:
    """One item each time a flush `limits_store` started on its own has been answered."""
    done: asyncio.Queue[None] = asyncio.Queue()
    flush = limits_store.flush

    async def flushed() -> None:
        await flush()
        done.put_nowait(None)

    monkeypatch.setattr(limits_store, "flush", flushed)
    return done


async def test_a_lease_given_back_is_sent_at_once_for_the_callers_next_call_on_another_process(
    redis_empty: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client calling strictly one call at a time (concurrent: 1), each call on the other
    replica: the lease of the call before is given back as that call ends, not with its
    process's next check of the caller (there is none) or a flush much later."""
    limits = CallerLimits(concurrent=1)
    # A token correction alone would wait an hour here for the caller's next check.
    stores = [
        RedisLimits(redis_client(redis_empty.url, timeout=TIMEOUT), timeout=TIMEOUT, flush_after=3600)
        for _ in range(2)
    ]
    flushed = [flushes(limits_store, monkeypatch) for limits_store in stores]
    try:
        for index in range(6):
            limits_store = stores[index % 2]
            assert await limits_store.take("search", limits, [], f"call-{index}", LONG_LEASE) is None
            limits_store.settle("search", limits, 0, f"call-{index}")
            async with asyncio.timeout(HANG):  # a bound for a broken store, not a timing
                await flushed[index % 2].get()
    finally:
        for limits_store in stores:
            await limits_store.aclose()


async def test_a_run_redis_refuses_fails_its_own_call_alone(
    redis_empty: RedisServer, logs: LogCapture
) -> None:
    """A caller whose key holds something else (a cluster's MOVED is the same): its check
    fails, and the other callers' checks and settlements sent with it in one round trip
    are answered, with Redis not skipped after."""
    errors: list[int] = []
    limits_store, other = store(redis_empty.url, errors=errors), store(redis_empty.url)
    limits = CallerLimits(requests=BucketLimit(RPM, 600, 600), concurrent=1)
    with redis_empty.client() as client:
        client.mset({key: "neither a hash nor a sorted set" for key in limits_store.keys("broken")})
    try:
        assert await limits_store.take("warm-up", limits, [1], "w", LONG_LEASE) is None  # script loaded
        limits_store.round_trips = 0

        answers = await asyncio.gather(
            limits_store.take("broken", limits, [1], "b1", LONG_LEASE),
            limits_store.take("search", limits, [1], "s1", LONG_LEASE),
            return_exceptions=True,
        )
        assert limits_store.round_trips == 1  # the two checks, in one pipeline
        assert isinstance(answers[0], StoreUnavailable)
        assert answers[1] is None
        assert limits_store.up
        assert await limits_store.take("ads", limits, [1], "a1", LONG_LEASE) is None  # not skipped

        # The settlements of a broken and a sound caller, flushed together.
        limits_store.settle("broken", limits, 0, "b0")
        limits_store.settle("search", limits, 0, "s1")
        await limits_store.flush()
        assert await other.take("search", limits, [1], "s2", LONG_LEASE) is None  # s1 given back
    finally:
        await limits_store.aclose()
        await other.aclose()

    assert errors  # counted (a round trip with a refused run, each)
    lines = [event["event"] for event in logs.events() if "limits store" in event["event"]]
    assert lines == [  # once, and never "unreachable"
        "limits store: redis refused a caller's check; its limits fall back (--limits-store-failure)"
    ]


async def test_a_bucket_that_refills_over_ages_keeps_its_key_and_fails_no_one(
    two: tuple[RedisLimits, RedisLimits], redis_empty: RedisServer
) -> None:
    """The documented lowest rate (tokens_per_minute 0.000001) and a call of 2M tokens: full
    again in 2e12 minutes, past what PEXPIRE takes as a plain number. The script must still
    run, for this caller and for another one batched with it."""
    first, second = two
    tiny = CallerLimits(tokens=BucketLimit(TPM, 1e-6, 1e-6))
    answers = await asyncio.gather(
        first.take("tiny", tiny, [2_000_000], "t1", 5),
        first.take("other", requests(600), [1], "o1", 5),
        return_exceptions=True,
    )
    first.settle("tiny", tiny, 1_000_000, "t1")  # used more: the settlement's expiry too
    await first.flush()

    assert list(answers) == [None, None]
    assert first.errors == 0
    assert first.up
    assert await second.take("tiny", tiny, [1e-6], "t2", 5) is not None  # 3M tokens owed
    with redis_empty.client() as client:
        assert client.pttl(f"{KEY_PREFIX}{{tiny}}") > 10**15  # kept (capped), an integer


async def test_the_limits_store_prefix_setting_names_the_keys(redis_empty: RedisServer) -> None:
    """Two deployments on one Redis database, each with its own --limits-store-prefix: the
    same caller name has a bucket in each."""
    settings = load_settings(
        {}, {"RERANK_LIMITS_STORE": redis_empty.url, "RERANK_LIMITS_STORE_PREFIX": "st:rl:"}
    )
    staging = build_limiter(
        CallersConfig.from_settings(settings).limits_store, CallerMetrics(CollectorRegistry())
    )
    prod = Limiter(store(redis_empty.url))
    caller = Caller("search", limits=requests(1), configured=True)
    try:
        assert await staging.admit(caller, call(), "a", None) is not None
        assert await prod.admit(caller, call(), "b", None) is not None  # its own bucket: full
        with pytest.raises(ServiceError):
            await staging.admit(caller, call(), "c", None)
    finally:
        await staging.close()
        await prod.close()

    with redis_empty.client() as client:
        assert sorted(client.keys("*")) == [b"rerank:limits:{search}", b"st:rl:{search}"]


@pytest.mark.parametrize("prefix", ["a b", "st:{x}:", "}"])
def test_a_limits_store_prefix_with_whitespace_or_braces_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="limits-store-prefix must be a Redis key prefix"):
        load_settings({}, {"RERANK_LIMITS_STORE_PREFIX": prefix})


def test_the_limits_store_prefix_is_rerank_limits_by_default() -> None:
    assert load_settings({}, {}).limits_store_prefix == KEY_PREFIX == "rerank:limits:"


def answered(
    limits_store: RedisLimits, monkeypatch: pytest.MonkeyPatch, after_first: Callable[[], Awaitable[None]]
) -> list[Any]:
    """The answers of `limits_store`'s round trips, in order (one run each here); `after_first`
    is awaited once the first one is answered, before the next can go (MAX_PIPELINES)."""
    answers: list[Any] = []
    send_batch = limits_store._send_batch

    async def spied(batch: list[tuple[str, list[str], list[str | float], asyncio.Future[Any]]]) -> None:
        await send_batch(batch)
        answers.extend(answer.result() for *_, answer in batch)
        if len(answers) == len(batch):
            await after_first()

    monkeypatch.setattr(limits_store, "_send_batch", spied)
    return answers


def in_flight(redis_server: RedisServer, limits_store: RedisLimits, caller: str) -> list[bytes]:
    with redis_server.client() as client:
        members: list[bytes] = client.zrange(limits_store.keys(caller)[1], 0, -1)
        return members


REFUSED_CONCURRENT = [0, b"concurrent", b"0"]


async def test_a_check_refused_for_calls_in_flight_is_made_once_more_after_the_timeout(
    redis_empty: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """concurrent: 1, back to back on two processes: the call before ended on A, whose lease
    sent back at its end reaches Redis after B's check (its answer reached the caller first).
    B checks once more after its timeout, and takes the lease then."""
    limits = CallerLimits(concurrent=1)
    a = RedisLimits(redis_client(redis_empty.url, timeout=TIMEOUT), timeout=TIMEOUT, flush_after=3600)
    b = store(redis_empty.url)

    async def a_ends_its_call() -> None:  # while B waits to check again
        a.settle("search", limits, 0, "a1")
        await a.flush()

    answers = answered(b, monkeypatch, a_ends_its_call)
    try:
        assert await a.take("search", limits, [], "a1", LONG_LEASE) is None

        assert await b.take("search", limits, [], "b1", LONG_LEASE) is None

        assert answers == [REFUSED_CONCURRENT, [1]]  # refused once, taken on the check after
        assert in_flight(redis_empty, b, "search") == [b"b1"]
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_caller_at_its_concurrent_limit_is_refused_after_one_check_more(
    redis_empty: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal for the calls in flight stands after the one check more, which takes no lease;
    one for a bucket, or with the deadline too near to check again, stands at once."""
    limits = CallerLimits(requests=BucketLimit(RPM, 0.001, 2), concurrent=1)
    a, b = store(redis_empty.url), store(redis_empty.url)

    async def nothing() -> None:
        pass

    answers = answered(b, monkeypatch, nothing)
    try:
        assert await a.take("search", limits, [1], "a1", LONG_LEASE) is None

        refused = await b.take("search", limits, [1], "b1", LONG_LEASE)
        assert refused is not None
        assert refused.limit == CONCURRENT
        assert answers == [REFUSED_CONCURRENT] * 2
        assert in_flight(redis_empty, b, "search") == [b"a1"]  # neither check took one

        near = time.monotonic() + TIMEOUT / 2  # the deadline would pass during the wait
        refused = await b.take("search", limits, [1], "b2", LONG_LEASE, deadline=near)
        assert refused is not None
        assert refused.limit == CONCURRENT
        assert len(answers) == 3

        a.settle("search", limits, 0, "a1")
        await a.flush()
        assert await b.take("search", limits, [1], "b3", LONG_LEASE) is None  # the last request
        b.settle("search", limits, 0, "b3")
        await b.flush()
        refused = await b.take("search", limits, [1], "b4", LONG_LEASE)
        assert refused is not None
        assert refused.limit == RPM
        assert len(answers) == 6  # the settlement's round trip, and one check: no second
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_call_cancelled_while_it_waits_to_check_again_holds_no_lease(
    redis_empty: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = CallerLimits(concurrent=1)
    a = store(redis_empty.url)
    patient = RedisLimits(redis_client(redis_empty.url, timeout=HANG), timeout=HANG)  # a long wait
    checks: list[Refusal | None] = []
    checked = asyncio.Event()
    check_once = patient._check

    async def spied(*args: Any) -> Refusal | None:
        checks.append(await check_once(*args))
        checked.set()  # take goes on to its wait before this test's task runs again
        return checks[-1]

    monkeypatch.setattr(patient, "_check", spied)
    try:
        assert await a.take("search", limits, [], "a1", LONG_LEASE) is None
        call = asyncio.create_task(patient.take("search", limits, [], "p1", LONG_LEASE))
        async with asyncio.timeout(HANG):
            await checked.wait()
        call.cancel()

        with pytest.raises(asyncio.CancelledError):
            await call
        assert checks == [Refusal(CONCURRENT, CONCURRENT_RETRY_AFTER)]  # not checked again
        assert in_flight(redis_empty, a, "search") == [b"a1"]
    finally:
        await a.aclose()
        await patient.aclose()


async def test_a_settlement_redis_refuses_is_dropped_not_sent_with_every_flush(
    redis_empty: RedisServer,
) -> None:
    """A caller's key of another type: its settlement fails once, counted once; the other
    callers' settlements flushed after it do not send it again (and count it again)."""
    errors: list[int] = []
    limits_store = store(redis_empty.url, errors=errors)
    limits = CallerLimits(concurrent=5)
    try:
        assert await limits_store.take("alice", limits, [], "alice-1", LONG_LEASE) is None
        with redis_empty.client() as client:
            client.delete(limits_store.keys("alice")[1])
            client.set(limits_store.keys("alice")[1], "neither a hash nor a sorted set")
        limits_store.settle("alice", limits, 0, "alice-1")  # its ZREM fails
        await limits_store.flush()
        assert len(errors) == 1

        for index in range(10):  # another caller's calls, each settlement flushed
            assert await limits_store.take("bob", limits, [], f"bob-{index}", LONG_LEASE) is None
            limits_store.settle("bob", limits, 0, f"bob-{index}")
            await limits_store.flush()

        assert len(errors) == 1
        assert limits_store.up
    finally:
        await limits_store.aclose()


async def test_leases_sent_again_after_no_answer_wait_for_retry_after_whatever_flushes_meanwhile(
    redis_own: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement whose round trip got no answer is sent again `retry_after` later, not
    with another caller's settlement flushed at once before that."""
    clock = Clock()
    limits = CallerLimits(concurrent=5)
    limits_store = store(redis_own.url, clock)
    sent: list[list[str]] = []
    alice = limits_store.keys("alice")
    alice_sent = asyncio.Event()
    pipelined = limits_store._pipelined

    async def spied(runs: list[tuple[list[str], list[str | float]]]) -> list[Any]:
        sent.extend(keys for keys, _ in runs)
        if alice in sent:
            alice_sent.set()
        return await pipelined(runs)

    monkeypatch.setattr(limits_store, "_pipelined", spied)
    try:
        assert await limits_store.take("alice", limits, [], "alice-1", LONG_LEASE) is None
        redis_own.pause()
        limits_store.settle("alice", limits, 0, "alice-1")
        await limits_store.flush()  # no answer: alice-1 is to go again after retry_after (1 s)
        redis_own.resume()
        clock.now += 1.0  # Redis may be tried again (its outage's clock), the retry not due yet
        sent.clear()
        alice_sent.clear()
        alice_sent.clear()

        for index in range(3):
            assert await limits_store.take("bob", limits, [], f"bob-{index}", LONG_LEASE) is None
            limits_store.settle("bob", limits, 0, f"bob-{index}")
            await limits_store.flush()
        assert alice not in sent

        async with asyncio.timeout(HANG):  # sent once retry_after has passed
            await alice_sent.wait()
    finally:
        await limits_store.aclose()


async def test_a_settlement_redis_refuses_for_a_state_that_passes_is_sent_again(
    redis_own: RedisServer,
) -> None:
    """Redis refusing every write for a while (READONLY: a failover demoted it; MISCONF, OOM
    alike) is Redis's state, not the caller's keys: the lease given back meanwhile goes
    again once Redis takes writes, so the caller is not held at its limit until the lease
    expires."""
    clock = Clock()
    limits = CallerLimits(concurrent=1)
    first, other = store(redis_own.url, clock), store(redis_own.url)
    try:
        assert await first.take("search", limits, [], "a", LONG_LEASE) is None
        with redis_own.client() as client:
            client.execute_command("REPLICAOF", "127.0.0.1", "1")  # writes refused: READONLY
            try:
                first.settle("search", limits, 0, "a")
                await first.flush()
                assert not first.up  # taken for down, not for this caller's keys
            finally:
                client.execute_command("REPLICAOF", "NO", "ONE")
        clock.now += 1.0  # Redis may be tried again

        await _until_taken(other, "search", limits, [])
    finally:
        await first.aclose()
        await other.aclose()


def test_only_errors_of_a_callers_own_keys_are_its_runs_alone() -> None:
    from redis.exceptions import ReadOnlyError, ResponseError

    from rerank_service.pipeline.limits_store import _keys_at_fault

    assert _keys_at_fault(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert _keys_at_fault(ResponseError("Error running script (call to f_x): @user_script:64: WRONGTYPE Op"))
    assert _keys_at_fault(ResponseError("MOVED 6958 127.0.0.1:27101"))
    assert not _keys_at_fault(ReadOnlyError("You can't write against a read only replica."))
    assert not _keys_at_fault(ResponseError("MISCONF Redis is configured to save RDB snapshots"))
    assert not _keys_at_fault(ResponseError("OOM command not allowed when used memory > 'maxmemory'."))


async def test_after_a_failover_behind_one_address_checks_reach_the_new_primary(
    redis_own: RedisServer,
) -> None:
    """Redis reached through one address (a VIP, a Kubernetes Service): a failover demotes the
    primary, which keeps the store's connection open and answers READONLY on it. The store
    is skipped for `retry_after`, then its next check connects again through the address,
    to the new primary: limits are shared again, without a restart."""
    clock = Clock()
    limits = requests(600)
    with RedisServer() as new_primary:
        async with RedisProxy(redis_own.port) as proxy:
            limits_store = store(proxy.url(), clock)
            try:
                assert await limits_store.take("search", limits, [1], "a", 5) is None
                fail_over(proxy, redis_own, new_primary)
                with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
                    await limits_store.take("search", limits, [1], "b", 5)
                clock.now += 1.0  # the store may be tried again

                assert await limits_store.take("search", limits, [1], "c", 5) is None
                assert limits_store.up
            finally:
                await limits_store.aclose()
        with new_primary.client() as client:
            assert client.exists(limits_store.keys("search")[0])


async def test_a_script_flush_landing_mid_pipeline_runs_no_check_twice(
    redis_empty: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCRIPT FLUSH (another client's, say) lands while Redis works through a pipeline of
    checks: the runs before it ran, those after it are answered NOSCRIPT. Those alone go
    again once the script is loaded: a check that ran is not run twice (its cost taken
    twice)."""
    limits_store = store(redis_empty.url)
    limits = requests(0.001, burst=100)  # no refill to speak of during the test
    assert await limits_store.take("warm-up", limits, [1], "w", 5) is None  # script loaded
    pipeline = limits_store._client.pipeline
    flushes = [True]  # one, in the next pipeline

    def flushed_after_its_first_run(transaction: bool) -> Pipeline:
        pipe = pipeline(transaction=transaction)
        if not flushes:
            return pipe
        flushes.pop()
        evalsha, execute = pipe.evalsha, pipe.execute

        def run(*args: Any) -> Pipeline:
            evalsha(*args)
            if len(pipe.command_stack) == 1:
                pipe.script_flush()  # in Redis's queue between the first run and the others
            return pipe

        async def answers(raise_on_error: bool) -> list[Any]:
            answered: list[Any] = await execute(raise_on_error=raise_on_error)
            del answered[1]  # SCRIPT FLUSH's own
            return answered

        monkeypatch.setattr(pipe, "evalsha", run)
        monkeypatch.setattr(pipe, "execute", answers)
        return pipe

    monkeypatch.setattr(limits_store._client, "pipeline", flushed_after_its_first_run)
    try:
        answers = await asyncio.gather(
            *(limits_store.take("search", limits, [1], f"call-{index}", 5) for index in range(3))
        )
        assert not flushes  # the flush landed
        assert answers == [None] * 3
        assert limits_store.errors == 0
    finally:
        await limits_store.aclose()

    with redis_empty.client() as client:
        level = client.hget(limits_store.keys("search")[0], f"{RPM}:level")
    assert level is not None
    assert float(level) == pytest.approx(100 - 3, abs=0.01)


async def test_a_redis_refusing_every_check_for_its_state_is_said_down_once(
    redis_own: RedisServer, logs: LogCapture
) -> None:
    """Out of memory under noeviction (READONLY, MISCONF, NOPERM alike): each try while it
    lasts is refused, and counted, but is no answer: "unreachable" is logged once, not with
    "answers again" at each try; "answers again" once it takes writes again."""
    clock = Clock()
    errors: list[int] = []
    limits_store = store(redis_own.url, clock, errors)
    limits = requests(600)
    try:
        assert await limits_store.take("search", limits, [1], "a", 5) is None
        with redis_own.client() as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
        for index in range(3):
            with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
                await limits_store.take("search", limits, [1], f"refused-{index}", 5)
            assert not limits_store.up
            clock.now += 1.0  # the store may be tried again
        with redis_own.client() as client:
            client.config_set("maxmemory", 0)

        assert await limits_store.take("search", limits, [1], "b", 5) is None
    finally:
        await limits_store.aclose()

    assert len(errors) == 3
    lines = [event["event"] for event in logs.events() if "limits store" in event["event"]]
    assert lines == [
        "limits store: redis unreachable; limits fall back (--limits-store-failure) until it answers",
        "limits store: redis answers again; limits are shared again",
    ]
