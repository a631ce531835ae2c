"""Which upstream failures are retried, and how long between attempts."""

from __future__ import annotations

import random

import grpc
import pytest

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.dialect import UpstreamErrorBody
from rerank_service.backends.upstream.retry import RetryPolicy, judge
from rerank_service.core.domain import FailureKind, ServiceError
from rerank_service.core.health import Outcome


def upstream_status(status: int) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "x", metadata={"upstream_status": str(status)})


def own_key_refused(status: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INTERNAL,
        "x",
        reason="UPSTREAM_AUTH_FAILED",
        metadata={"upstream_status": str(status)},
        kind=FailureKind.DEPLOYMENT,
    )


def mapped(status: int) -> ServiceError:
    """The error errors.py makes of an upstream answering `status`."""
    return errors.from_http_status(status, UpstreamErrorBody(), None, False, [])


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
        (upstream_status(401), False, Outcome.SUCCESS),  # the caller's own token (pass-through)
        (upstream_status(403), False, Outcome.SUCCESS),
        (own_key_refused(401), False, Outcome.FAILURE),  # the deployment's key: it answers nobody
        (own_key_refused(403), False, Outcome.FAILURE),
        # Answers the call falls over on (errors.py): failing, so enough in a row eject it.
        (mapped(408), False, Outcome.FAILURE),
        (mapped(301), False, Outcome.FAILURE),
        (mapped(405), False, Outcome.FAILURE),
        # The model or path the deployment was given (the operator's, not the caller's) is wrong.
        (mapped(404), False, Outcome.NEUTRAL),  # falls over, but about one model: no ejection
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


def passed_through(status: int) -> ServiceError:
    """The error errors.py makes of an upstream answering `status` to a caller's own token."""
    return errors.from_http_status(status, UpstreamErrorBody(), None, True, [])


@pytest.mark.parametrize(
    ("error", "retryable", "outcome"),
    [
        # The caller's own account (its quota, unpaid, no access): says nothing against the
        # deployment the other callers share; it answered.
        (passed_through(429), True, Outcome.NEUTRAL),
        (passed_through(402), False, Outcome.SUCCESS),
        (passed_through(403), False, Outcome.SUCCESS),
        (passed_through(405), False, Outcome.SUCCESS),
        (passed_through(431), False, Outcome.SUCCESS),
        (passed_through(404), False, Outcome.SUCCESS),
        # The upstream's own, whoever's token it was.
        (passed_through(408), False, Outcome.FAILURE),
        (passed_through(301), False, Outcome.FAILURE),
        (passed_through(503), True, Outcome.FAILURE),
    ],
)
def test_in_pass_through_mode_a_4xx_other_than_408_never_counts_against_the_deployment(
    error: ServiceError, retryable: bool, outcome: Outcome
) -> None:
    verdict = judge(error, caller_deadline_passed=False, pass_through=True)
    assert (verdict.retryable, verdict.outcome) == (retryable, outcome)
    # With the deployment's own key, a 402 fails it: enough in a row eject it.
    assert judge(mapped(402), caller_deadline_passed=False).outcome is Outcome.FAILURE


def test_a_timeout_is_never_retried_and_counts_against_the_upstream_only_if_it_was_its_own() -> None:
    timeout = reason("UPSTREAM_TIMEOUT")
    assert judge(timeout, caller_deadline_passed=False).outcome is Outcome.FAILURE
    assert judge(timeout, caller_deadline_passed=True).outcome is Outcome.NEUTRAL
    assert not judge(timeout, caller_deadline_passed=False).retryable


def test_a_connect_the_callers_deadline_cut_long_unanswered_counts_against_the_upstream() -> None:
    # client/failures.py: unanswered for a second or more before the deadline cut it.
    unanswered = errors.timed_out(by_caller_deadline=True, unreachable=True)
    verdict = judge(unanswered, caller_deadline_passed=True)
    assert (verdict.retryable, verdict.outcome) == (False, Outcome.FAILURE)
    assert (
        judge(errors.timed_out(by_caller_deadline=True), caller_deadline_passed=True).outcome
        is Outcome.NEUTRAL
    )


def test_no_connection_within_the_connect_timeout_is_retried_as_unreachable() -> None:
    verdict = judge(errors.connect_timed_out(5.0), caller_deadline_passed=False)
    assert (verdict.retryable, verdict.outcome, verdict.label) == (True, Outcome.FAILURE, "unreachable")


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
