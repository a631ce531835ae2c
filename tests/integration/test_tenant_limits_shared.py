"""Callers' limits held together by real `serve` processes through one real Redis
(`--limits-store`): two replicas, `--workers 2`, Redis killed and back mid-run, and a
caller at its `concurrent` limit flooding one process."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.redis_server import RedisServer
from tests.support.rpc import error_info
from tests.support.scrape import scrape, value
from tests.support.tenants import (
    ADS_KEY,
    SEARCH_KEY,
    bearer,
    call,
    caller,
    channel,
    rerank_request,
    service,
    serving,
    write_config,
)
from tests.support.waiting import wait_until

LIMIT = 10  # search's requests a minute: a burst of 10, one more every 6 s
CALLS = 30


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, models=("qwen3-rerank", "gte-rerank-v2")) as fake:
        yield fake


def limited_config(path: Path, upstream: FakeUpstream, **limits: int) -> Path:
    return write_config(
        path,
        upstream,
        [
            caller("search", "SEARCH_KEY", limits=limits or {"requests_per_minute": LIMIT}),
            caller("ads", "ADS_KEY"),
        ],
    )


def outcome(answer: rerank_pb2.RerankResponse | grpc.RpcError) -> str:
    return "OK" if isinstance(answer, rerank_pb2.RerankResponse) else answer.code().name


def test_two_processes_sharing_one_redis_hold_one_callers_limit_together(
    tmp_path: Path, upstream: FakeUpstream, redis_empty: RedisServer
) -> None:
    config = limited_config(tmp_path / "rerank.yaml", upstream)
    store = ("--limits-store", redis_empty.url)
    with service(config, *store) as first, service(config, *store) as second:
        started = time.monotonic()
        answers = [call((first, second)[index % 2].target, SEARCH_KEY) for index in range(CALLS)]
        seconds = time.monotonic() - started
        by_process = [Counter(outcome(answer) for answer in answers[index::2]) for index in range(2)]
        others = [call(second.target, ADS_KEY) for _ in range(3)]

    served = sum(counts["OK"] for counts in by_process)
    refill = int(seconds * LIMIT / 60) + 1
    assert LIMIT <= served <= LIMIT + refill  # not twice the limit
    assert all(counts["OK"] >= 1 for counts in by_process)  # each process served some ...
    assert all(counts["RESOURCE_EXHAUSTED"] >= 1 for counts in by_process)  # ... and refused some
    assert [outcome(answer) for answer in others] == ["OK"] * 3


def test_workers_sharing_one_redis_hold_one_callers_limit_together(
    tmp_path: Path, upstream: FakeUpstream, redis_empty: RedisServer
) -> None:
    config = limited_config(tmp_path / "rerank.yaml", upstream)
    with service(config, "--workers", "2", "--limits-store", redis_empty.url) as process:
        wait_until(
            lambda: len({e["worker"] for e in process.events() if e.get("event") == "worker ready"}) == 2,
            timeout=30,
            what="both workers serving",
        )
        started = time.monotonic()
        answers = [call(process.target, SEARCH_KEY) for _ in range(CALLS)]
        seconds = time.monotonic() - started
        wait_until(
            lambda: sum(1 for e in process.events() if e.get("event") == "call") >= CALLS,
            what="every call's access-log line",
        )
        workers = Counter(
            (e["worker"], e["code"]) for e in process.events() if e.get("event") == "call" and "worker" in e
        )
        samples = scrape(serving(process)["metrics_port"])

    served = sum(outcome(answer) == "OK" for answer in answers)
    refill = int(seconds * LIMIT / 60) + 1
    assert LIMIT <= served <= LIMIT + refill, workers
    assert {worker for worker, _ in workers} == {0, 1}, workers  # the calls went to both workers
    assert (
        value(samples, "rerank_caller_calls_total", caller="search", model="qwen3-rerank", code="OK")
        == served
    )
    limited = value(samples, "rerank_caller_limited_total", caller="search", limit="requests_per_minute")
    assert limited == CALLS - served


def test_redis_killed_mid_run_costs_no_wait_falls_back_to_the_process_and_comes_back(
    tmp_path: Path, upstream: FakeUpstream, redis_own: RedisServer
) -> None:
    config = limited_config(tmp_path / "rerank.yaml", upstream, requests_per_minute=1000)
    store_key = "rerank:limits:{search}"
    with service(config, "--limits-store", redis_own.url, "--limits-store-timeout", "0.05") as process:
        assert outcome(call(process.target, SEARCH_KEY)) == "OK"
        with redis_own.client() as client:
            assert client.exists(store_key)  # the bucket lives in Redis
        redis_own.kill()
        timed: list[tuple[str, float]] = []
        for _ in range(10):
            began = time.monotonic()
            answer = call(process.target, SEARCH_KEY)
            timed.append((outcome(answer), time.monotonic() - began))
        redis_own.start()  # the same port, empty
        # Skipped for a second after the failure, then tried again: back in Redis.
        wait_until(
            lambda: outcome(call(process.target, SEARCH_KEY)) == "OK" and _exists(redis_own, store_key),
            timeout=15,
            interval=0.2,
            what="the bucket back in Redis",
        )
        samples = scrape(serving(process)["metrics_port"])
        events = [e["event"] for e in process.events() if "limits store" in str(e.get("event"))]

    # Served all along (--limits-store-failure open) from the process's own buckets, and
    # none waited on the dead Redis (a refused connection; a hung one: the 50 ms timeout).
    assert [code for code, _ in timed] == ["OK"] * 10
    assert max(seconds for _, seconds in timed) < 2.0
    assert value(samples, "rerank_limits_store_errors_total") >= 1
    assert events == [
        "limits store: redis unreachable; limits fall back (--limits-store-failure) until it answers",
        "limits store: redis answers again; limits are shared again",
    ]


def limit_refused(answer: rerank_pb2.RerankResponse | grpc.RpcError) -> str:
    """The limit a call was refused for (CALLER_LIMITED), or how it ended otherwise."""
    info = error_info(answer) if isinstance(answer, grpc.RpcError) else None
    return info.metadata["limit"] if info is not None and info.reason == "CALLER_LIMITED" else outcome(answer)


def test_a_caller_at_its_concurrent_limit_here_is_refused_at_once_with_redis_up_or_down(
    tmp_path: Path, upstream: FakeUpstream, redis_own: RedisServer
) -> None:
    """Its call in flight admitted through Redis: its next calls cost no round trip (each held
    an admission slot through two, the second 50 ms on: a flood filled them all, refusing
    others OVERLOADED), and the process still counts that call once Redis is gone."""
    config = limited_config(tmp_path / "rerank.yaml", upstream, concurrent=1)
    flags = ("--limits-store", redis_own.url, "--max-concurrent-requests", "2")
    upstream.inject(Fault(delay=NEVER))  # search's first call is held at the upstream
    with service(config, *flags) as process, channel(process.target) as opened:
        metrics_port = serving(process)["metrics_port"]
        held = rerank_pb2_grpc.RerankServiceStub(opened).Rerank.future(
            rerank_request(), metadata=bearer(SEARCH_KEY), timeout=60
        )
        try:
            assert upstream.wait_for(lambda fake: fake.in_flight == 1, timeout=30)
            round_trips = value(scrape(metrics_port), "rerank_limits_store_round_trips_total")
            flood = [limit_refused(call(process.target, SEARCH_KEY)) for _ in range(5)]
            after = value(scrape(metrics_port), "rerank_limits_store_round_trips_total")
            others = outcome(call(process.target, ADS_KEY))
            redis_own.kill()
            while_down = limit_refused(call(process.target, SEARCH_KEY))
        finally:
            held.cancel()
        wait_until(
            lambda: outcome(call(process.target, SEARCH_KEY)) == "OK",
            what="search served from the process's own count once its held call ended",
        )

    assert flood == ["concurrent"] * 5
    assert after == round_trips  # refused without asking Redis
    assert others == "OK"
    assert while_down == "concurrent"  # not let past its limit by the fallback


def _exists(server: RedisServer, key: str) -> bool:
    with server.client() as client:
        return bool(client.exists(key))
