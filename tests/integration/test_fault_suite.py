"""The fault suite: every way the upstream can fail, and what the caller sees.

Each scenario of tests/support/fault_scenarios.py runs against a live
server in front of the fake upstream: the exact status code and reason, the number
of upstream attempts, the time taken (bounded by the deadline), a valid call
answered right after, and no task, file descriptor or connection left behind after
repeating it. The same scenarios feed `make bench-reliability` and
docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from rerank_service.testing.fake_upstream import NATIVE_PATH, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.support.fault_scenarios import (
    BREAKER_SETTINGS,
    RETRY_EVENT,
    SCENARIOS,
    SERVICE_SETTINGS,
    Scenario,
    disarm,
    problems,
    run_breaker,
    run_round,
)
from tests.support.leaks import LeakChecker
from tests.support.logs import LogCapture

REPEATS = 3  # calls of a scenario after the first, which must leave nothing behind
BODY = {"model": "qwen3-rerank", "input": {"query": "red apple", "documents": ["a red apple", "a car"]}}


def slug(scenario: Scenario) -> str:
    return re.sub(r"[^a-z0-9]+", "-", scenario.name.lower()).strip("-")


@pytest.fixture
def healed(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream, listening and fault-free again whatever the test did."""
    yield upstream
    disarm(upstream)


@pytest.fixture
def http(healed: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=healed.url, headers={"authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=10
    ) as client:
        yield client


# --- the fake upstream's faults, seen from a plain HTTP client -----------------------


def test_fake_trickles_a_body_piece_by_piece(healed: FakeUpstream, http: httpx.Client) -> None:
    healed.inject(Fault(trickle=(16, 0.02)))

    started = time.monotonic()
    response = http.post(NATIVE_PATH, json=BODY)
    taken = time.monotonic() - started

    pieces = -(-len(response.content) // 16)
    assert response.json()["output"]["results"][0]["index"] == 0
    assert taken >= (pieces - 1) * 0.02
    # The last byte reaches the client a moment before the fake marks the answer done.
    assert healed.wait_for(lambda fake: fake.requests[-1].answered, timeout=2)


def test_fake_resets_the_connection_mid_body(healed: FakeUpstream, http: httpx.Client) -> None:
    healed.inject(Fault(reset_after_bytes=40))

    with pytest.raises(httpx.TransportError):
        http.post(NATIVE_PATH, json=BODY)

    assert healed.requests[-1].body_bytes_sent == 40
    assert not healed.requests[-1].answered


def test_fake_streams_a_50_mb_body_that_is_valid_json(healed: FakeUpstream, http: httpx.Client) -> None:
    healed.inject(Fault(pad_to=50 * 1024 * 1024))

    response = http.post(NATIVE_PATH, json=BODY)

    assert len(response.content) == 50 * 1024 * 1024
    assert response.json()["usage"]["total_tokens"] > 0


def test_fake_counts_the_connections_it_holds_open(healed: FakeUpstream) -> None:
    assert healed.wait_for(lambda fake: fake.open_connections == 0)
    accepted = healed.connections_accepted
    with httpx.Client(base_url=healed.url) as client:
        for _ in range(3):
            client.post(NATIVE_PATH, json=BODY)
        assert healed.open_connections == 1  # kept alive and reused
    assert healed.wait_for(lambda fake: fake.open_connections == 0)
    assert healed.connections_accepted == accepted + 1


def test_fake_flaps_through_its_cycle(healed: FakeUpstream, http: httpx.Client) -> None:
    healed.cycle([Fault(status=503), Fault()])

    statuses = [http.post(NATIVE_PATH, json=BODY).status_code for _ in range(4)]

    assert statuses == [503, 200, 503, 200]


def test_fake_goes_down_and_comes_back_on_the_same_port(healed: FakeUpstream, http: httpx.Client) -> None:
    healed.go_down()
    with pytest.raises(httpx.ConnectError):
        http.post(NATIVE_PATH, json=BODY)
    healed.come_back()

    assert http.post(NATIVE_PATH, json=BODY).status_code == 200


# --- the scenarios against a live server ------------------------------------------


def test_every_scenario_is_bounded_by_its_deadline() -> None:
    for scenario in SCENARIOS:
        assert scenario.max_seconds <= scenario.deadline + 0.5, scenario.name
        assert scenario.min_seconds < scenario.max_seconds, scenario.name
    assert len({slug(scenario) for scenario in SCENARIOS}) == len(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=slug)
def test_fault_scenario_gives_the_promised_status_attempts_and_time_and_leaves_nothing_behind(
    scenario: Scenario, serve: ServerFactory, healed: FakeUpstream, logs: LogCapture
) -> None:
    def retries_logged() -> int:
        return sum(1 for event in logs.events() if event.get("event") == RETRY_EVENT)

    with serve(**{**SERVICE_SETTINGS, **scenario.settings}) as server:
        first = run_round(server.stub, healed, scenario, retries_logged)
        assert problems(scenario, first) == []

        checker = LeakChecker(server, healed)
        baseline = checker.baseline()
        for _ in range(REPEATS):
            again = run_round(server.stub, healed, scenario, retries_logged)
            assert problems(scenario, again) == []
        left = checker.growth(baseline)
        assert left is None, f"left behind after {REPEATS} calls: {left} (baseline {baseline})"


def test_an_answering_upstream_is_never_refused_an_unreachable_one_fails_fast_then_comes_back(
    serve: ServerFactory, healed: FakeUpstream
) -> None:
    with serve(**{**SERVICE_SETTINGS, **BREAKER_SETTINGS}) as server:
        assert server.channel is not None
        steps = run_breaker(server.channel, healed)

    assert [problem for step in steps for problem in step.problems] == []
    assert [step.seen.attempts for step in steps] == [3, 3, 0, 0, 0, 1, 1]
    assert [step.health for step in steps] == ["SERVING"] * 3 + ["NOT_SERVING"] * 2 + ["SERVING"] * 2
    assert [step.liveness for step in steps] == ["SERVING"] * 7
    assert [step.seen.code for step in steps] == [grpc.StatusCode.UNAVAILABLE] * 5 + [grpc.StatusCode.OK] * 2
    # The call that made it down ends with what its last attempt met (docs/RELIABILITY.md's
    # breaker table); the calls after it are refused.
    assert steps[3].seen.reason == "UPSTREAM_UNAVAILABLE"
    assert steps[3].seen.retry_delay is None
    assert steps[4].seen.reason == "UPSTREAM_CIRCUIT_OPEN"


def test_leak_checker_notices_a_task_a_descriptor_and_a_connection_left_behind(
    serve: ServerFactory, healed: FakeUpstream
) -> None:
    with serve() as server:
        checker = LeakChecker(server, healed)
        gc.collect()  # what earlier tests dropped is closed before the count, not during it
        baseline = checker.baseline()
        forgotten = server.begin(asyncio.sleep(30))  # a task left running: the leak to notice
        held = socket.create_connection(healed.address)
        try:
            assert healed.wait_for(lambda fake: fake.open_connections > baseline.connections)
            left = checker.growth(baseline, settle=0.2)
        finally:
            held.close()
            forgotten.cancel()

    # Process-wide counts: another descriptor or task may come or go meanwhile, so each
    # grew, rather than by exactly what was left.
    assert left is not None
    assert left.tasks > baseline.tasks
    assert left.fds > baseline.fds  # both ends of the connection are in this process
    assert left.connections == baseline.connections + 1
