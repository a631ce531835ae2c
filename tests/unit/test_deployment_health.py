"""DeploymentHealth: ejected (tried last, never refused) and down (unreachable: refused but for probes)."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rerank_service.core.domain import DeploymentState, FailureKind, ServiceError
from rerank_service.core.health import DeploymentHealth, Outcome

FAILURES = 3
COOLDOWN = 5.0
PROBE_INTERVAL = 1.0  # min(cooldown, 1 s)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health_on(clock: Clock, min_failures: int = FAILURES, cooldown: float = COOLDOWN) -> DeploymentHealth:
    return DeploymentHealth(min_failures=min_failures, cooldown=cooldown, window=10.0, clock=clock)


def state_of(health: DeploymentHealth) -> DeploymentState:
    """Read afresh each time (mypy would narrow a property across the clock's moves)."""
    return health.state


def refusing_of(health: DeploymentHealth) -> bool:
    return health.refusing


def probe_due_of(health: DeploymentHealth) -> bool:
    return health.probe_due


def fail(
    health: DeploymentHealth,
    times: int = 1,
    unreachable: bool = False,
    probe: bool = False,
    answered: bool = False,
) -> None:
    """`answered`: a 500, a body it could not use; else a timeout, a reset (or `unreachable`)."""
    for _ in range(times):
        health.record(Outcome.FAILURE, probe=probe, unreachable=unreachable, answered=answered)


def succeed(health: DeploymentHealth, times: int = 1) -> None:
    for _ in range(times):
        health.record(Outcome.SUCCESS)


def refusal(health: DeploymentHealth) -> ServiceError:
    with pytest.raises(ServiceError) as raised:
        health.admit()
    return raised.value


def down(clock: Clock) -> DeploymentHealth:
    """A deployment that was just found unreachable FAILURES times in a row."""
    health = health_on(clock)
    fail(health, FAILURES, unreachable=True)
    assert state_of(health) is DeploymentState.DOWN
    return health


# --- ejection: failing answers ------------------------------------------------------------------


def test_a_new_deployment_is_healthy_and_admits_calls_that_are_not_probes() -> None:
    health = health_on(Clock())

    assert state_of(health) is DeploymentState.HEALTHY
    assert not refusing_of(health)
    assert not probe_due_of(health)
    assert health.admit() is False


def test_failures_in_a_row_with_most_of_the_window_failing_eject_but_never_refuse() -> None:
    health = health_on(Clock())

    fail(health, FAILURES - 1)
    assert state_of(health) is DeploymentState.HEALTHY  # one short of the count in a row

    fail(health)
    assert state_of(health) is DeploymentState.EJECTED
    assert not refusing_of(health)
    assert health.admit() is False  # still let through: ejection only orders the choice
    fail(health, 20)
    assert state_of(health) is DeploymentState.EJECTED
    assert health.admit() is False


def test_failures_in_a_row_do_not_eject_while_most_of_the_window_succeeded() -> None:
    health = health_on(Clock())
    succeed(health, 10)

    fail(health, 9)  # 9 of 19 failed: not more than half

    assert state_of(health) is DeploymentState.HEALTHY
    fail(health, 2)  # 11 of 21
    assert state_of(health) is DeploymentState.EJECTED


def test_a_failing_share_without_enough_failures_in_a_row_does_not_eject() -> None:
    health = health_on(Clock())

    for _ in range(10):
        fail(health, FAILURES - 1)
        succeed(health)  # two thirds failed, but never three in a row

    assert state_of(health) is DeploymentState.HEALTHY


def test_a_success_ends_an_ejection_at_once() -> None:
    health = health_on(Clock())
    fail(health, FAILURES)
    assert state_of(health) is DeploymentState.EJECTED

    succeed(health)

    assert state_of(health) is DeploymentState.HEALTHY
    fail(health, FAILURES - 1)  # the count in a row starts over
    assert state_of(health) is DeploymentState.HEALTHY


def test_an_ejection_ends_after_the_cooldown_and_one_more_failure_ejects_again() -> None:
    clock = Clock()
    health = health_on(clock)
    fail(health, FAILURES)

    clock.now += COOLDOWN - 0.1
    assert state_of(health) is DeploymentState.EJECTED
    clock.now += 0.1
    assert state_of(health) is DeploymentState.HEALTHY

    fail(health)  # still failing in a row, and the window still mostly failures
    assert state_of(health) is DeploymentState.EJECTED
    clock.now += COOLDOWN - 0.1
    assert state_of(health) is DeploymentState.EJECTED  # a full cool-down from the new ejection


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    clock = Clock()
    health = health_on(clock)
    fail(health, FAILURES)

    clock.now += COOLDOWN - 1
    fail(health, 5)
    clock.now += 1

    assert state_of(health) is DeploymentState.HEALTHY


def test_neutral_outcomes_neither_count_as_attempts_nor_reset_the_failures_in_a_row() -> None:
    health = health_on(Clock())
    fail(health, FAILURES - 1)
    for _ in range(50):
        health.record(Outcome.NEUTRAL)
    assert state_of(health) is DeploymentState.HEALTHY
    assert health.failure_summary() == "2 of 2 attempts in the last 10 s failed"

    fail(health)  # the third in a row, and 3 of 3: neutrals did not dilute the window

    assert state_of(health) is DeploymentState.EJECTED


def test_neutral_outcomes_do_not_end_an_ejection_or_a_down_state() -> None:
    clock = Clock()
    ejected = health_on(clock)
    fail(ejected, FAILURES)
    unreachable = down(clock)

    for health in (ejected, unreachable):
        health.record(Outcome.NEUTRAL)
        health.record(Outcome.NEUTRAL, probe=True)

    assert (state_of(ejected), state_of(unreachable)) == (DeploymentState.EJECTED, DeploymentState.DOWN)


# --- down: unreachable ----------------------------------------------------------------------------


def test_unreachable_in_a_row_makes_it_down_and_refused_at_once_with_the_time_left() -> None:
    clock = Clock()
    health = health_on(clock)
    fail(health, FAILURES - 1, unreachable=True)
    assert state_of(health) is not DeploymentState.DOWN
    assert health.admit() is False

    fail(health, unreachable=True)

    assert state_of(health) is DeploymentState.DOWN
    assert refusing_of(health)
    error = refusal(health)
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.reason == "UPSTREAM_CIRCUIT_OPEN"
    assert error.kind is FailureKind.DEPLOYMENT  # another deployment may answer
    assert error.retry_after == pytest.approx(COOLDOWN)

    clock.now += 2.0
    assert refusal(health).retry_after == pytest.approx(COOLDOWN - 2.0)


def test_an_answered_failure_between_unreachable_ones_restarts_the_count() -> None:
    health = health_on(Clock())

    fail(health, FAILURES - 1, unreachable=True)
    fail(health, answered=True)  # a 500: it was reached
    fail(health, FAILURES - 1, unreachable=True)

    assert state_of(health) is not DeploymentState.DOWN
    assert health.admit() is False


def test_a_neutral_answer_between_unreachable_ones_restarts_the_count() -> None:
    health = health_on(Clock())

    fail(health, FAILURES - 1, unreachable=True)
    health.record(Outcome.NEUTRAL, answered=True)  # a 429: an answer, so it was reached
    fail(health, unreachable=True)

    assert state_of(health) is not DeploymentState.DOWN
    assert health.admit() is False


def test_after_the_cooldown_one_probe_goes_and_a_second_caller_within_the_interval_is_refused() -> None:
    clock = Clock()
    health = down(clock)

    clock.now += COOLDOWN
    assert probe_due_of(health)
    assert not refusing_of(health)

    assert health.admit() is True  # the probe
    assert not probe_due_of(health)
    clock.now += 0.25
    error = refusal(health)  # another caller while the probe is out
    assert error.reason == "UPSTREAM_CIRCUIT_OPEN"
    assert error.retry_after == pytest.approx(PROBE_INTERVAL - 0.25)
    assert state_of(health) is DeploymentState.DOWN
    # What the router asks before it falls back to it: it would refuse at once (a fallback
    # was made, and its refusal hid the failure that ended the call).
    assert health.refuses_now
    assert not refusing_of(health)  # readiness: past the cool-down, probed
    clock.now += PROBE_INTERVAL
    assert not health.refuses_now  # the next probe is due


def test_a_probe_claimed_as_its_call_chose_the_deployment_is_that_calls_and_no_other_is_due() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN

    health.claim_probe()  # a call chose it; its first await (a cache lookup) comes before admit

    assert not probe_due_of(health)  # calls choosing meanwhile go elsewhere
    assert health.refuses_now
    health.claim_probe()  # one of them claims nothing
    assert health.admit() is True  # the claiming call, admitted as the probe
    assert refusal(health).reason == "UPSTREAM_CIRCUIT_OPEN"  # no second probe this interval
    clock.now += PROBE_INTERVAL
    assert probe_due_of(health)


def test_a_claim_on_a_healthy_deployment_or_within_the_cooldown_takes_nothing() -> None:
    clock = Clock()
    health = health_on(clock)
    health.claim_probe()
    assert health.admit() is False  # healthy: not a probe

    fail(health, FAILURES, unreachable=True)
    health.claim_probe()  # within the cool-down: nothing to claim
    assert refusal(health).reason == "UPSTREAM_CIRCUIT_OPEN"


def test_a_claimed_probe_is_void_once_the_deployment_goes_down_again() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True  # a probe that hangs
    clock.now += PROBE_INTERVAL
    health.claim_probe()  # the next interval's, its call still on its way

    fail(health, unreachable=True, probe=True)  # the first probe could not connect: a new cool-down

    assert refusal(health).retry_after == pytest.approx(COOLDOWN)  # the claim lets no call through


def test_a_probe_that_hangs_does_not_hold_back_the_next_one() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True  # a probe that never comes back

    clock.now += PROBE_INTERVAL

    assert probe_due_of(health)
    assert health.admit() is True  # the next probe, the first still unrecorded
    assert state_of(health) is DeploymentState.DOWN


def test_a_successful_probe_ends_down() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True

    health.record(Outcome.SUCCESS, probe=True)

    assert state_of(health) is DeploymentState.HEALTHY
    assert health.admit() is False
    fail(health, FAILURES - 1, unreachable=True)  # the count in a row starts over
    assert health.admit() is False


def test_an_unreachable_probe_is_down_again_for_a_full_cooldown() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True

    fail(health, unreachable=True, probe=True)

    assert state_of(health) is DeploymentState.DOWN
    assert refusing_of(health)
    assert refusal(health).retry_after == pytest.approx(COOLDOWN)
    clock.now += COOLDOWN - 0.1
    assert not probe_due_of(health)
    clock.now += 0.1
    assert health.admit() is True


def test_an_answered_failure_ends_down_because_it_proves_the_deployment_reachable() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True

    fail(health, probe=True, answered=True)  # a 500: an answer, whatever it says

    assert state_of(health) is not DeploymentState.DOWN
    assert not refusing_of(health)
    assert health.admit() is False  # not a probe: calls go through again


def test_an_answer_from_a_call_in_flight_ends_down_even_within_the_cooldown() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += 1.0

    fail(health, answered=True)  # a straggler started before it went down, answered 500

    assert state_of(health) is not DeploymentState.DOWN
    assert health.admit() is False


def test_a_probe_that_connects_but_times_out_without_an_answer_leaves_it_down() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True

    fail(health, probe=True)  # connected, then no answer in time: nothing proves it back

    assert state_of(health) is DeploymentState.DOWN
    refused = refusal(health)
    assert refused.reason == "UPSTREAM_CIRCUIT_OPEN"  # until the next probe is due
    # The count that made it down stands ("0 times in a row" read as though it never was).
    assert f"could not be reached {FAILURES} times in a row" in refused.message
    clock.now += PROBE_INTERVAL
    assert health.admit() is True  # the next probe


def test_a_reset_or_timeout_from_a_call_in_flight_does_not_end_down() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += 1.0

    fail(health)  # a straggler that connected before it went down, then got no answer

    assert state_of(health) is DeploymentState.DOWN
    assert refusing_of(health)


def test_a_straggling_unreachable_failure_does_not_extend_the_cooldown() -> None:
    clock = Clock()
    health = down(clock)

    clock.now += 2.0
    fail(health, 3, unreachable=True)  # calls started before it went down, failing late

    assert refusal(health).retry_after == pytest.approx(COOLDOWN - 2.0)
    clock.now += COOLDOWN - 2.0
    assert probe_due_of(health)
    assert health.admit() is True


def test_min_failures_zero_never_ejects_nor_goes_down() -> None:
    clock = Clock()
    health = health_on(clock, min_failures=0)

    fail(health, 100, unreachable=True)
    fail(health, 100)
    fail(health, 10, unreachable=True, probe=True)

    assert state_of(health) is DeploymentState.HEALTHY
    assert not refusing_of(health)
    assert not probe_due_of(health)
    assert health.admit() is False


def test_the_probe_interval_is_never_longer_than_the_cooldown() -> None:
    clock = Clock()
    health = health_on(clock, cooldown=0.3)
    fail(health, FAILURES, unreachable=True)
    clock.now += 0.3
    assert health.admit() is True

    clock.now += 0.3

    assert health.admit() is True


# --- listeners --------------------------------------------------------------------------------------


def test_listeners_hear_each_change_of_state_and_not_the_records_that_change_nothing() -> None:
    clock = Clock()
    health = health_on(clock)
    heard: list[tuple[DeploymentState, bool]] = []
    health.on_change(lambda: heard.append((state_of(health), refusing_of(health))))

    fail(health, FAILURES - 1)
    assert heard == []
    fail(health)
    fail(health, 5)  # still ejected: nothing new
    succeed(health)
    fail(health, FAILURES, unreachable=True)
    succeed(health)

    assert heard == [
        (DeploymentState.EJECTED, False),
        (DeploymentState.HEALTHY, False),
        (DeploymentState.DOWN, True),
        (DeploymentState.HEALTHY, False),
    ]


async def test_listeners_hear_the_end_of_a_cooldown_by_time_alone() -> None:
    cooldown = 0.05
    health = DeploymentHealth(min_failures=FAILURES, cooldown=cooldown)  # the real clock
    heard: list[tuple[DeploymentState, bool]] = []
    cooled = asyncio.Event()

    def listener() -> None:
        heard.append((state_of(health), refusing_of(health)))
        if not refusing_of(health) and state_of(health) is DeploymentState.DOWN:
            cooled.set()

    health.on_change(listener)

    fail(health, FAILURES, unreachable=True)
    assert heard == [(DeploymentState.DOWN, True)]

    await asyncio.wait_for(cooled.wait(), 2.0)  # no record in between: the cool-down's end alone
    assert heard[-1] == (DeploymentState.DOWN, False)
    assert probe_due_of(health)


async def test_listeners_hear_the_end_of_an_ejection_by_time_alone() -> None:
    health = DeploymentHealth(min_failures=FAILURES, cooldown=0.05)
    heard: list[DeploymentState] = []
    healthy = asyncio.Event()

    def listener() -> None:
        heard.append(state_of(health))
        if state_of(health) is DeploymentState.HEALTHY:
            healthy.set()

    health.on_change(listener)
    fail(health, FAILURES)

    await asyncio.wait_for(healthy.wait(), 2.0)
    assert heard == [DeploymentState.EJECTED, DeploymentState.HEALTHY]


# --- fairness: one caller's bad requests cannot deny service to others ------------------------------


@pytest.mark.parametrize(("poison", "victim"), [(1, 10), (10, 1), (1, 1), (50, 1)])
def test_a_caller_whose_requests_fail_never_gets_anyone_else_refused(poison: int, victim: int) -> None:
    clock = Clock()
    health = health_on(clock)
    states: set[DeploymentState] = set()

    for _ in range(200):
        for _ in range(poison):
            assert health.admit() is False  # never a refusal, never a probe
            fail(health)  # its request makes the upstream answer 500 or garbage
            states.add(state_of(health))
        for _ in range(victim):
            assert health.admit() is False
            succeed(health)
            states.add(state_of(health))
        clock.now += 0.1

    assert DeploymentState.DOWN not in states
    assert not refusing_of(health)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.NEUTRAL]), st.floats(0, 3)),
        max_size=200,
    )
)
def test_answered_attempts_of_any_mix_and_pace_never_get_a_call_refused(
    attempts: list[tuple[Outcome, float]],
) -> None:
    clock = Clock()
    health = health_on(clock, min_failures=2, cooldown=1.0)

    for outcome, pause in attempts:
        assert health.admit() is False
        health.record(outcome)
        clock.now += pause

    assert state_of(health) is not DeploymentState.DOWN
    assert not refusing_of(health)


def test_only_unreachable_attempts_turn_a_deployment_down_among_mixed_ones() -> None:
    clock = Clock()
    health = health_on(clock)
    pattern = itertools.cycle([True, True, False])  # never FAILURES unreachable in a row

    for unreachable in itertools.islice(pattern, 300):
        assert health.admit() is False
        fail(health, unreachable=unreachable)
        clock.now += 0.05

    assert state_of(health) is DeploymentState.EJECTED  # failing, so tried last; but not down
    assert not refusing_of(health)


def test_a_claim_given_back_unsent_leaves_the_probe_due_for_the_next_call() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    claim = health.claim_probe()
    assert claim
    clock.now += 0.25

    health.unclaim(claim)  # its call ended without reaching admit (answered from the cache, cancelled)

    assert probe_due_of(health)  # not held back until the next interval
    assert not health.refuses_now
    assert health.claim_probe()  # the next call choosing it takes the probe
    assert health.admit() is True
    assert refusal(health).retry_after == pytest.approx(PROBE_INTERVAL)  # one probe, its interval anew


def test_a_claim_its_call_sent_is_not_given_back() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    claim = health.claim_probe()
    assert health.admit() is True  # the probe went out

    health.unclaim(claim)

    assert not probe_due_of(health)  # no second probe this interval
    assert refusal(health).reason == "UPSTREAM_CIRCUIT_OPEN"
    health.unclaim(health.claim_probe())  # none taken (0): none given back
    assert not probe_due_of(health)


def test_a_void_claim_given_back_leaves_a_later_calls_claim_alone() -> None:
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.admit() is True  # a probe that hangs
    clock.now += PROBE_INTERVAL
    stale = health.claim_probe()  # its call still on its way
    fail(health, unreachable=True, probe=True)  # the first probe could not connect: a new cool-down
    clock.now += COOLDOWN
    claim = health.claim_probe()  # the new interval's, another call's

    health.unclaim(stale)  # the first call ends unsent

    assert not probe_due_of(health)  # the later claim still holds this interval's probe
    assert health.admit() is True  # and is the probe
    health.unclaim(claim)
    assert refusal(health).reason == "UPSTREAM_CIRCUIT_OPEN"


def test_a_claim_sent_after_its_interval_passed_leaves_no_second_probe_due() -> None:
    """A probe claimed, then sent a while later (its call waited on a slow cache lookup):
    the next probe is an interval after it was sent, not due at once beside it."""
    clock = Clock()
    health = down(clock)
    clock.now += COOLDOWN
    assert health.claim_probe()
    clock.now += 1.5 * PROBE_INTERVAL  # the claim's interval has passed meanwhile

    assert health.admit() is True  # its probe goes now

    assert not probe_due_of(health)
    assert refusal(health).reason == "UPSTREAM_CIRCUIT_OPEN"


# --- rate limited: 429s ------------------------------------------------------------------------


def rate_limited(health: DeploymentHealth, times: int = 1, retry_after: float | None = None) -> None:
    for _ in range(times):
        health.record(Outcome.NEUTRAL, answered=True, rate_limited=True, retry_after=retry_after)


def rate_limited_of(health: DeploymentHealth) -> bool:
    return health.rate_limited


def test_429s_in_a_row_avoid_it_as_an_ejection_for_a_cooldown_but_never_refuse() -> None:
    clock = Clock()
    health = health_on(clock)
    rate_limited(health, FAILURES - 1)
    assert state_of(health) is DeploymentState.HEALTHY

    rate_limited(health)

    assert state_of(health) is DeploymentState.EJECTED  # the route calls its others first
    assert rate_limited_of(health)
    assert not refusing_of(health)
    assert health.admit() is False
    clock.now += COOLDOWN
    assert state_of(health) is DeploymentState.HEALTHY


def test_a_429_with_retry_after_avoids_it_that_long_at_most_a_cooldown() -> None:
    clock = Clock()
    health = health_on(clock)

    rate_limited(health, retry_after=2.0)
    assert state_of(health) is DeploymentState.EJECTED
    clock.now += 2.0
    assert state_of(health) is DeploymentState.HEALTHY

    rate_limited(health, retry_after=3600.0)
    clock.now += COOLDOWN - 0.1
    assert state_of(health) is DeploymentState.EJECTED
    clock.now += 0.1
    assert state_of(health) is DeploymentState.HEALTHY


def test_another_answer_between_429s_restarts_their_count_and_a_success_ends_the_avoidance() -> None:
    health = health_on(Clock())
    rate_limited(health, FAILURES - 1)
    health.record(Outcome.SUCCESS)
    rate_limited(health, FAILURES - 1)
    assert state_of(health) is DeploymentState.HEALTHY

    rate_limited(health, retry_after=2.0)
    health.record(Outcome.SUCCESS)
    assert state_of(health) is DeploymentState.HEALTHY
    assert not rate_limited_of(health)


def test_429s_never_avoid_it_with_min_failures_zero() -> None:
    health = health_on(Clock(), min_failures=0)
    rate_limited(health, 10, retry_after=2.0)
    assert state_of(health) is DeploymentState.HEALTHY
