"""Which upstream failures are worth another attempt, and how long to wait first.

Reranking is a pure function of its input, so repeating a call is always safe; what
decides a retry is whether it is *likely to pass*: the upstream was unreachable, reset
the connection, was briefly overloaded (502/503/504) or rate-limited us (429). A
request it rejected (4xx), an internal error (500, or TEI's 424 for a failed inference),
a timeout (the time is spent) or a broken body would only fail again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rerank_service.backends.upstream import errors
from rerank_service.core.domain import FailureKind, ServiceError
from rerank_service.core.health import Outcome

RETRYABLE_HTTP_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Verdict:
    retryable: bool
    outcome: Outcome  # for the deployment's health
    label: str  # for logs and the retries metric: an HTTP status or a failure kind


def judge(error: ServiceError, caller_deadline_passed: bool, pass_through: bool = False) -> Verdict:
    """Classify a failed attempt (the ServiceError that errors.py mapped it to);
    `pass_through`: it carried the caller's own credential, not the deployment's key."""
    status = error.metadata.get("upstream_status")
    if status is not None:
        code = int(status)
        if errors.server_fault(code):  # a 5xx, or a 424 (TEI's failed inference: not retried, as a 500)
            return Verdict(code in RETRYABLE_HTTP_STATUSES, Outcome.FAILURE, status)
        if code == 429:
            return Verdict(True, Outcome.NEUTRAL, status)
        if pass_through and 400 <= code < 500 and code != 408:
            # A 4xx may be about the caller's own account (a 402: unpaid, a 403: no access),
            # which other callers of the deployment do not share: it shows the deployment
            # up and talking, as the request's own fault does. (A 408 is the upstream's.)
            return Verdict(False, Outcome.SUCCESS, status)
        if code == 404 and error.kind is FailureKind.DEPLOYMENT:
            # The call falls over (errors.py: the model or path the deployment was given is
            # wrong), but a 404 is about one model, and a deployment may serve several (routes
            # sharing it, --upstream-models): it neither ejects the deployment nor shows it up.
            return Verdict(False, Outcome.NEUTRAL, status)
        if error.kind is FailureKind.DEPLOYMENT:
            # An answer the call falls over on (errors.py): its own key refused (it can answer
            # nobody until an operator fixes the key), a 408 (it gave up waiting), a status no
            # rerank API answers. Failing:
            # enough in a row eject it, as 5xx do, so its route's calls go to its other
            # deployments first rather than each failing here first. Not retried: it would
            # only answer the same.
            return Verdict(False, Outcome.FAILURE, status)
        # Any other answer (the request's own fault) proves the upstream is up and talking.
        return Verdict(False, Outcome.SUCCESS, status)
    reason = error.reason or "unknown"
    # Without an HTTP status, this reason is a transport failure before any answer:
    # a connect error, a reset, a protocol error (errors.from_transport).
    if reason == errors.UNAVAILABLE:
        return Verdict(True, Outcome.FAILURE, "unreachable")
    if reason == errors.TIMEOUT:
        # Cut short by the caller's own deadline, a timeout says nothing about the upstream;
        # unless it cut a TCP connect pending long past any answer from a host that is there
        # (client/failures.py): then the upstream is unreachable, however short the deadline.
        neutral = caller_deadline_passed and not error.unreachable
        return Verdict(False, Outcome.NEUTRAL if neutral else Outcome.FAILURE, "timeout")
    if reason == errors.BAD_RESPONSE:
        return Verdict(False, Outcome.FAILURE, "bad_response")
    # Our own pool was full, or an error that is not the upstream's.
    return Verdict(False, Outcome.NEUTRAL, reason.lower())


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff: float  # upper bound of the first wait
    max_backoff: float

    def wait_before(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 = the second attempt).

        Full jitter (a uniform draw below an exponentially growing cap) spreads the
        retries of many callers that failed together; the upstream's Retry-After is a floor.
        """
        cap = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        wait = rng.uniform(0.0, cap)
        return max(wait, retry_after) if retry_after is not None else wait
