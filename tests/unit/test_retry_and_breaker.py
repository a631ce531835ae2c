"""Which upstream failures are retried, how long between attempts, and the circuit breaker."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from rerank_service.backends.upstream.breaker import CircuitBreaker, CircuitState, Outcome
from rerank_service.backends.upstream.retry import RetryPolicy, judge
from rerank_service.core.domain import ServiceError


def upstream_status(status: int) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "x", metadata={"upstream_status": str(status)})


def reason(name: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "x", reason=name)


@pytest.mark.parametrize(
    ("error", "retryable", "outcome"),
    [
        (upstream_status(429), True, Outcome.NEUTRAL),
        (upstream_status(502), True, Outcome.FAILURE),
        (upstream_status(503), True, Outcome.FAILURE),
        (upstream_status(504), True, Outcome.FAILURE),
        (upstream_status(500), False, Outcome.FAILURE),
        (upstream_status(400), False, Outcome.SUCCESS),
        (upstream_status(401), False, Outcome.SUCCESS),
        (upstream_status(403), False, Outcome.SUCCESS),
        (upstream_status(404), False, Outcome.SUCCESS),
        (upstream_status(408), False, Outcome.SUCCESS),
        (upstream_status(422), False, Outcome.SUCCESS),
        (reason("UPSTREAM_UNAVAILABLE"), True, Outcome.FAILURE),  # connect error, reset
        (reason("UPSTREAM_BAD_RESPONSE"), False, Outcome.FAILURE),
        (reason("UPSTREAM_POOL_EXHAUSTED"), False, Outcome.NEUTRAL),
    ],
)
def test_only_failures_likely_to_pass_are_retried(
    error: ServiceError, retryable: bool, outcome: Outcome
) -> None:
    verdict = judge(error, caller_deadline_passed=False)
    assert (verdict.retryable, verdict.outcome) == (retryable, outcome)


def test_a_timeout_is_never_retried_and_counts_against_the_upstream_only_if_it_was_its_own() -> None:
    timeout = reason("UPSTREAM_TIMEOUT")
    assert judge(timeout, caller_deadline_passed=False).outcome is Outcome.FAILURE
    assert judge(timeout, caller_deadline_passed=True).outcome is Outcome.NEUTRAL
    assert not judge(timeout, caller_deadline_passed=False).retryable


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    policy = RetryPolicy(max_attempts=6, backoff=0.1, max_backoff=0.35)
    rng = random.Random(7)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.35), (5, 0.35)]:
        waits = [policy.wait_before(retry, None, rng) for _ in range(300)]
        assert 0 <= min(waits) < cap * 0.1  # the draw reaches down to zero...
        assert cap * 0.9 < max(waits) <= cap  # ...and up to the cap, never past it


def test_retry_after_is_a_floor_on_the_wait() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=0.1, max_backoff=2.0)
    assert policy.wait_before(1, 1.5, random.Random(1)) == 1.5


def state(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state  # a call: mypy would narrow the property across a test's asserts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_consecutive_failures_open_the_circuit_and_calls_are_refused_with_the_time_left() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=clock)
    for _ in range(3):
        assert breaker.admit() is False
        breaker.record(Outcome.FAILURE, probe=False)

    assert state(breaker) is CircuitState.OPEN
    clock.now += 2.0
    with pytest.raises(ServiceError) as refused:
        breaker.admit()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.reason == "UPSTREAM_CIRCUIT_OPEN"
    assert refused.value.retry_after == pytest.approx(3.0)


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=Clock())
    for outcome in [Outcome.FAILURE, Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE]:
        breaker.record(outcome, probe=breaker.admit())
    assert state(breaker) is CircuitState.CLOSED


def test_neutral_outcomes_neither_count_nor_reset() -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown=5.0, clock=Clock())
    for outcome in [Outcome.FAILURE, Outcome.NEUTRAL, Outcome.FAILURE]:
        breaker.record(outcome, probe=breaker.admit())
    assert state(breaker) is CircuitState.OPEN


def test_after_the_cooldown_exactly_one_probe_goes_through() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=5.0, clock=clock)
    breaker.record(Outcome.FAILURE, probe=breaker.admit())
    clock.now += 5.0

    assert state(breaker) is CircuitState.HALF_OPEN
    assert not breaker.open  # health reports SERVING again, so the probe can arrive
    assert breaker.admit() is True
    with pytest.raises(ServiceError):
        breaker.admit()  # a second caller while the probe is out
    breaker.record(Outcome.SUCCESS, probe=True)
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.admit() is False


def test_a_failed_probe_opens_the_circuit_for_another_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=5.0, clock=clock)
    breaker.record(Outcome.FAILURE, probe=breaker.admit())
    clock.now += 5.0
    breaker.record(Outcome.FAILURE, probe=breaker.admit())

    assert state(breaker) is CircuitState.OPEN
    clock.now += 4.9
    assert state(breaker) is CircuitState.OPEN


def test_a_cancelled_probe_lets_the_next_caller_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=1.0, clock=clock)
    breaker.record(Outcome.FAILURE, probe=breaker.admit())
    clock.now += 1.0
    breaker.record(Outcome.NEUTRAL, probe=breaker.admit())
    assert breaker.admit() is True


def test_a_straggling_failure_does_not_extend_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=5.0, clock=clock)
    breaker.record(Outcome.FAILURE, probe=breaker.admit())
    clock.now += 4.0
    breaker.record(Outcome.FAILURE, probe=False)  # an attempt admitted before it opened
    clock.now += 1.0
    assert state(breaker) is CircuitState.HALF_OPEN


def test_threshold_zero_never_opens() -> None:
    breaker = CircuitBreaker(failure_threshold=0, cooldown=5.0, clock=Clock())
    for _ in range(100):
        breaker.record(Outcome.FAILURE, probe=breaker.admit())
    assert state(breaker) is CircuitState.CLOSED


# --- telling health when the circuit opens, closes and cools down ---


async def test_the_listener_hears_the_circuit_open_and_then_cool_down() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown=0.05)
    heard: list[bool] = []
    breaker.on_change(lambda: heard.append(breaker.open))

    breaker.record(Outcome.FAILURE, probe=False)
    await asyncio.sleep(0.2)

    assert heard == [True, False]  # opened, then half-open by time alone (a probe may go)


async def test_a_cool_down_timer_that_runs_ahead_of_the_breaker_s_clock_waits_the_rest() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown=0.05, clock=lambda: now[0])
    heard: list[bool] = []
    breaker.on_change(lambda: heard.append(breaker.open))
    breaker.record(Outcome.FAILURE, probe=False)

    await asyncio.sleep(0.15)  # the loop's timer fired, but the breaker's clock stood still
    assert heard == [True]
    now[0] = 0.04  # 10 ms of the cool-down left on the breaker's own clock
    await asyncio.sleep(0.1)
    assert heard == [True]
    now[0] = 1.0
    await asyncio.sleep(0.1)

    assert heard == [True, False]


def test_a_success_after_the_circuit_opened_tells_the_listener_it_closed() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown=1.0, clock=lambda: now[0])
    heard: list[bool] = []
    breaker.on_change(lambda: heard.append(breaker.open))
    breaker.record(Outcome.FAILURE, probe=False)
    now[0] = 2.0
    probe = breaker.admit()

    breaker.record(Outcome.SUCCESS, probe)

    assert heard == [True, False]
    assert breaker.state is CircuitState.CLOSED
