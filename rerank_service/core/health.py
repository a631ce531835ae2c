"""Is a deployment worth calling? Judged from its own failures, so no caller decides for others.

Two questions, answered separately from the attempts a deployment made:

- **Ejected** (`--upstream-breaker-failures` failed attempts in a row, and more than half of
  its attempts in the last `window` seconds failed): the router prefers its other
  deployments. It is never refused for that alone: when every deployment of a route is
  ejected the router still tries them (panic mode), so a caller whose own requests make an
  upstream answer 500 or garbage cannot, by that, deny service to anyone else. Any success
  ends the ejection.
- **Down** (unreachable that many times in a row: refused, unroutable, a failed TLS
  handshake, a proxy refusing the tunnel, no connection within the connect timeout or
  a TCP connect cut after a second unanswered; no request's content causes that): calls are
  refused at once for `cooldown` seconds, then let through as probes, one every
  `cooldown` or every second, whichever is shorter (a probe that hangs does not hold the
  next one back), each bounded by `probe_timeout`. A success ends it; an answer of any
  kind (even a 500) proves the deployment reachable and ends it too.

- **Rate limited** (it answered 429 with a Retry-After, or 429 `--upstream-breaker-failures`
  times in a row): avoided as an ejected deployment is (`state` EJECTED, `rate_limited`),
  until that Retry-After (at most `cooldown` seconds) or, after the 429s in a row, for
  `cooldown`; any success ends it. A route with another deployment sends its calls there
  first, and a route without one still calls it. Not in pass-through mode: a 429 to a
  caller's own token is that caller's quota, not the deployment's (the backend records it
  neutral, not rate limited).

A failure is the deployment's fault only when `retry.judge` says so: a 4xx, a 429, our own
full pool or the caller's own deadline are neutral.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable

import grpc

from rerank_service.core.domain import DeploymentState, FailureKind, ServiceError
from rerank_service.core.window import SlidingCounts

_SUCCESSES, _FAILURES = 0, 1


class Outcome(enum.Enum):
    """What an attempt says about the deployment's health."""

    SUCCESS = "success"  # it answered (a 4xx counts: it is up and talking)
    FAILURE = "failure"  # unreachable, 5xx, timed out, garbage
    NEUTRAL = "neutral"  # says nothing: rate limited, cancelled, our own pool full


# The share of failed attempts in the window above which a deployment may be ejected.
EJECTION_FAILURE_SHARE = 0.5
# Waiting longer than this between probes of a down deployment leaves callers refused for
# no reason once it is back.
MAX_PROBE_INTERVAL = 1.0


class DeploymentHealth:
    def __init__(
        self,
        min_failures: int,
        cooldown: float,
        window: float = 10.0,
        probe_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # 0 turns the judgement off: never ejected, never down.
        self._min_failures = min_failures
        self._cooldown = cooldown
        self._probe_interval = min(cooldown, MAX_PROBE_INTERVAL)
        self.probe_timeout = probe_timeout
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []
        self._attempts = SlidingCounts(2, window, clock)
        self._failures_in_a_row = 0
        self._unreachable_in_a_row = 0
        self._down_until: float | None = None  # set while down, until a success
        self._next_probe_at = 0.0
        # This interval's probe, taken by a call on its way (`claim_probe`) and not yet admitted:
        # the claim's number, 0 for none. Numbered so that a call gives back only its own.
        self._claim = 0
        self._claims = 0
        self._ejected_until = 0.0  # ejected while the clock is before this
        self._rate_limited_until = 0.0  # avoided for its 429s while the clock is before this
        self._rate_limited_in_a_row = 0

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever `state` or `refusing` may have changed, including when a
        cool-down or an ejection ends by time alone."""
        self._listeners.append(listener)

    @property
    def state(self) -> DeploymentState:
        if self._down_until is not None:
            return DeploymentState.DOWN
        avoided_until = max(self._ejected_until, self._rate_limited_until)
        return DeploymentState.EJECTED if self._clock() < avoided_until else DeploymentState.HEALTHY

    @property
    def rate_limited(self) -> bool:
        """Avoided (`state` EJECTED) for its 429s, and not for failing too."""
        now = self._clock()
        return self._down_until is None and now < self._rate_limited_until and now >= self._ejected_until

    @property
    def refusing(self) -> bool:
        """True while calls are refused outright (down, within its cool-down)."""
        return self._down_until is not None and self._clock() < self._down_until

    @property
    def refuses_now(self) -> bool:
        """True while a call now would be refused outright: down, within its cool-down, or
        past it with this interval's probe already sent (`admit` lets one through each)."""
        down_until = self._down_until
        return down_until is not None and self._clock() < max(down_until, self._next_probe_at)

    @property
    def refused_for(self) -> float:
        """Seconds until a call would be let through (0: now): while down, until its
        cool-down has ended and its next probe may go."""
        down_until = self._down_until
        if down_until is None:
            return 0.0
        return max(max(down_until, self._next_probe_at) - self._clock(), 0.0)

    @property
    def probe_due(self) -> bool:
        """Down, past its cool-down, and the next probe may go now."""
        now = self._clock()
        return self._down_until is not None and now >= self._down_until and now >= self._next_probe_at

    def claim_probe(self) -> int:
        """A call chose this deployment and goes on to call it: if it is down with its probe
        due, that call is the probe. Taken now, at the choice: the call may wait (a score
        cache lookup) before it reaches `admit`, and calls choosing meanwhile must see this
        interval's probe gone, not each be chosen for it and refused.

        Returns the claim (0: none taken), for `unclaim` once the call ends."""
        if self._down_until is not None and self.probe_due:
            self._next_probe_at = self._clock() + self._probe_interval
            self._claims += 1
            self._claim = self._claims
            return self._claim
        return 0

    def unclaim(self, claim: int) -> None:
        """The call that took `claim` has ended. If it never reached `admit` (the score cache
        answered it whole; it was cancelled or failed before sending), its probe was not sent:
        due again at once, so the next call choosing the deployment probes it, rather than
        every call going elsewhere until the next interval (and a popular cached query taking
        each interval's probe of a deployment that is back)."""
        if claim and claim == self._claim:  # unconsumed, and not void (down again since)
            self._claim = 0
            self._next_probe_at = min(self._next_probe_at, self._clock())

    def admit(self) -> bool:
        """Let one attempt through, or raise UNAVAILABLE at once.

        Returns True when the attempt is a probe of a down deployment: bound it by
        `probe_timeout` and pass True to `record`.
        """
        if self._down_until is None:
            return False
        if self._claim:  # the probe `claim_probe` took (this call's, most often)
            self._claim = 0
            # Sent now: the next is an interval from now, even if the claim waited past its
            # own interval (a slow cache lookup), or another call would probe meanwhile.
            self._next_probe_at = max(self._next_probe_at, self._clock() + self._probe_interval)
            return True
        if self.probe_due:
            self._next_probe_at = self._clock() + self._probe_interval
            return True
        raise self._refusal(self.refused_for)

    def record(
        self,
        outcome: Outcome,
        probe: bool = False,
        unreachable: bool = False,
        answered: bool = False,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """What one attempt showed; `unreachable`: it never got a connection; `answered`: an
        HTTP answer came back (a 500 or a neutral 429 too: reachable, so no longer down);
        `rate_limited`: that answer was a 429, asking for `retry_after` seconds (None: not said)."""
        if not rate_limited and (answered or outcome is not Outcome.NEUTRAL):
            # An answer of another kind, or a failure: the 429s are no longer in a row.
            self._rate_limited_in_a_row = 0
        if outcome is Outcome.NEUTRAL:
            if answered:
                before = self.state, self.refusing, self.rate_limited
                # Reachable (a 429 is an answer): the unreachable attempts are no longer in a row.
                self._unreachable_in_a_row = 0
                self._down_until = None
                if rate_limited:
                    self._avoid_for_429(retry_after)
                if (self.state, self.refusing, self.rate_limited) != before:
                    self._changed()
            return
        before = self.state, self.refusing, self.rate_limited
        now = self._clock()
        if outcome is Outcome.SUCCESS:
            self._attempts.add(_SUCCESSES)
            self._failures_in_a_row = self._unreachable_in_a_row = 0
            self._ejected_until = self._rate_limited_until = 0.0
            self._down_until = None
        else:
            self._attempts.add(_FAILURES)
            self._failures_in_a_row += 1
            if unreachable:
                self._unreachable_in_a_row += 1
            elif answered or self._down_until is None:  # a probe that hung while down: as it was
                self._unreachable_in_a_row = 0
            # Neither answered nor unreachable (a probe that hung, or was cut off) changes
            # nothing: still down, probed again after the probe interval.
            if answered:
                self._down_until = None  # it answered: reachable, whatever it said
            elif unreachable and self._goes_down(probe):
                self._down_until = self._next_probe_at = now + self._cooldown
                self._claim = 0  # a claim of an earlier interval's probe is void
                self._notify_at(self._down_until)
            if self._min_failures and now >= self._ejected_until and self._failing():
                self._ejected_until = now + self._cooldown
                self._notify_at(self._ejected_until)
        if (self.state, self.refusing, self.rate_limited) != before:
            self._changed()

    def _avoid_for_429(self, retry_after: float | None) -> None:
        """A 429: avoided until its Retry-After (at most a cool-down), and for a cool-down
        once the 429s come `min_failures` in a row (with or without Retry-After: one of 0
        asks for nothing, and its route would call it first again and again)."""
        self._rate_limited_in_a_row += 1
        if not self._min_failures:
            return
        now = self._clock()
        until = now if retry_after is None else now + min(retry_after, self._cooldown)
        if self._rate_limited_in_a_row >= self._min_failures:
            until = now + self._cooldown
        if until > self._rate_limited_until and until > now:
            self._rate_limited_until = until
            self._notify_at(until)

    def failure_summary(self) -> str:
        """The recent record in words, for logs."""
        successes, failures = self._attempts.totals()
        return f"{failures} of {successes + failures} attempts in the last {self._attempts.seconds} s failed"

    def _goes_down(self, probe: bool) -> bool:
        """After an unreachable attempt: down now? A failed probe is down again at once; a
        straggler failing while already down does not extend the cool-down."""
        if not self._min_failures:
            return False
        return probe or (self._down_until is None and self._unreachable_in_a_row >= self._min_failures)

    def _failing(self) -> bool:
        if self._failures_in_a_row < self._min_failures:
            return False
        successes, failures = self._attempts.totals()
        return failures > EJECTION_FAILURE_SHARE * (successes + failures)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _notify_at(self, instant: float) -> None:
        """Tell the listeners when `instant` is reached (a cool-down or an ejection ends)."""
        if not self._listeners:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used outside an event loop (a unit test with its own clock)
            return
        loop.call_later(max(instant - self._clock(), 0.0), self._reached, instant)

    def _reached(self, instant: float) -> None:
        if self._clock() < instant:  # the loop's timer ran ahead of this clock: wait the rest
            self._notify_at(instant)
        else:
            self._changed()

    def _refusal(self, left: float) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"the upstream could not be reached {self._unreachable_in_a_row} times in a row; "
            f"not calling it for another {max(left, 0.0):.1f} s",
            reason="UPSTREAM_CIRCUIT_OPEN",
            retry_after=max(left, 0.05),
            kind=FailureKind.DEPLOYMENT,
        )
