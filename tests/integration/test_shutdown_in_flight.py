"""SIGTERM while 50 calls and a stream are in flight: every one completes, exit 0.

A real `rerank-service serve` process in front of a fake upstream that takes 4 s a
call. 50 unary calls and a RerankStream of 5 items are all waiting on the upstream
when SIGTERM arrives; the stream is half-closed only after it. Every call and item
must succeed (none cut, on either side), the stream must end OK, the server must
stop taking new calls, and the process must exit 0 once the calls are done, well
within the grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from rerank_service.testing.fake_upstream import FakeUpstream
from tests.conftest import UPSTREAM_KEY
from tests.support.fault_scenarios import sigterm_in_flight
from tests.support.process import ServiceProcess

CALLS = 50
ITEMS = 5
# Long enough that all 55 calls are at the upstream together on a loaded machine (their
# arrivals spread over a second or more there), and the grace far past the calls' end, so
# an exit at the calls' end and one at the grace are told apart by many seconds.
LATENCY = 4.0
GRACE = 30.0


@pytest.fixture
def slow_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, latency=LATENCY) as upstream:
        yield upstream


def test_sigterm_lets_50_calls_and_a_stream_in_flight_finish_then_exits_zero(
    slow_upstream: FakeUpstream,
) -> None:
    args = [
        "--backend",
        "upstream",
        "--upstream-url",
        slow_upstream.url,
        "--shutdown-grace",
        str(GRACE),
    ]
    with ServiceProcess(args, env={"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY}) as service:
        result = asyncio.run(sigterm_in_flight(service, slow_upstream, CALLS, ITEMS, GRACE))

    assert result.in_flight_at_signal == CALLS + ITEMS
    assert result.unary == {"OK": CALLS}
    assert result.stream_answers == {"OK": ITEMS}
    assert result.stream_code == "OK"
    assert result.upstream_abandoned == 0
    assert len(slow_upstream.requests) == CALLS + ITEMS
    assert all(request.answered for request in slow_upstream.requests)
    # New calls, health checks included, are turned away once the drain starts. A check
    # sent on the connection the server is closing may instead go unanswered until its
    # 1 s deadline while the client reconnects: not served either.
    assert result.health_after_signal[-1] in {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert result.late_call == "UNAVAILABLE"
    assert result.exit_code == 0
    # It exits when the calls are done (about one upstream latency), not at the grace.
    assert result.exit_seconds < GRACE - 10
    events = service.events()
    assert [event["event"] for event in events][-1] == "stopped"
    drained = [
        event
        for event in events[[e["event"] for e in events].index("draining") :]
        if event["event"] == "call"
    ]
    # Every call finished during the drain was logged as a success.
    assert len(drained) >= CALLS
    assert {event["code"] for event in drained} == {"OK"}
