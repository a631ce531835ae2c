"""Fail fast while the upstream is down: a consecutive-failure circuit breaker.

Closed: every call goes through. After `failure_threshold` failed attempts in a row
it opens: calls are refused at once (UNAVAILABLE with the time left as RetryInfo)
for `cooldown` seconds, so callers stop queueing on a dead upstream and it is not
hammered while it recovers. Then half-open: exactly one call goes through as a
probe; success closes the circuit, failure opens it for another cool-down.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable

import grpc

from rerank_service.core.domain import ServiceError
from rerank_service.observability import metrics
from rerank_service.observability.logging import get_logger

_log = get_logger("rerank_service.upstream")


class CircuitState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class Outcome(enum.Enum):
    """What an attempt says about the upstream's health."""

    SUCCESS = "success"  # it answered (a 4xx counts: it is up and talking)
    FAILURE = "failure"  # unreachable, 5xx, timed out, garbage
    NEUTRAL = "neutral"  # says nothing: rate limited, cancelled, our own pool full


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # 0 turns the breaker off: it never opens.
        self._threshold = failure_threshold
        self._cooldown = cooldown
        self._clock = clock
        self._on_change: Callable[[], None] | None = None
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False
        metrics.set_circuit_state(CircuitState.CLOSED.value)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever `open` may have changed: on opening, on closing, and
        when a cool-down ends (the circuit turns half-open by time alone)."""
        self._on_change = listener

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at < self._cooldown:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    @property
    def open(self) -> bool:
        """True while calls are refused outright (health reports NOT_SERVING)."""
        return self.state is CircuitState.OPEN

    def admit(self) -> bool:
        """Let one attempt through, or raise UNAVAILABLE at once.

        Returns True when the attempt is the half-open probe; pass that to `record`.
        """
        state = self.state
        if state is CircuitState.CLOSED:
            return False
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            metrics.set_circuit_state(CircuitState.HALF_OPEN.value)
            return True
        raise self._refusal()

    def record(self, outcome: Outcome, probe: bool) -> None:
        if probe:
            self._probe_in_flight = False
        if outcome is Outcome.SUCCESS:
            was_open = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
            metrics.set_circuit_state(CircuitState.CLOSED.value)
            if was_open:
                _log.info("upstream circuit closed")
                self._changed()
        elif outcome is Outcome.FAILURE:
            self._failures += 1
            tripped = probe or self._failures >= self._threshold
            # A straggler failing after the circuit opened does not extend the cool-down.
            if self._threshold and tripped and (self._opened_at is None or probe):
                _log.warning("upstream circuit opened", failures=self._failures, cooldown_s=self._cooldown)
                self._opened_at = self._clock()
                metrics.set_circuit_state(CircuitState.OPEN.value)
                self._changed()
                self._when_cooled_down()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _when_cooled_down(self) -> None:
        """Tell the listener when the cool-down ends (the circuit turns half-open by time alone)."""
        if self._on_change is None or self._opened_at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used outside an event loop (a unit test with its own clock)
            return
        left = self._cooldown - (self._clock() - self._opened_at)
        loop.call_later(max(left, 0.0), self._cooled_down)

    def _cooled_down(self) -> None:
        if self.open:  # the loop's timer ran ahead of the breaker's clock: wait the rest
            self._when_cooled_down()
        else:
            self._changed()

    def _refusal(self) -> ServiceError:
        assert self._opened_at is not None
        left = max(0.0, self._cooldown - (self._clock() - self._opened_at))
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"the upstream failed {self._failures} times in a row; not calling it for another {left:.1f} s",
            reason="UPSTREAM_CIRCUIT_OPEN",
            # While a probe is in flight the cool-down is over; callers retry shortly.
            retry_after=left if left > 0 else min(1.0, self._cooldown),
        )
