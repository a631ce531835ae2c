"""How long one upstream attempt may take.

The upstream timeout bounds the upstream's own time. An attempt first waits for a
connection of the service's own pool, for at most the upstream timeout; once it has one
(or room to open one), the timer is set anew, so connecting, sending and reading the
answer get the whole upstream timeout: a wait in our own busy pool is never taken for a
slow upstream. The caller's deadline cuts either shorter (a call must never outlive its
caller), and so does a probe's bound (counted from the attempt's start). Opening a new
connection has a bound of its own within that, the connect timeout (connections.py): a
host that drops what is sent to it is found unreachable long before the upstream timeout.
"""

from __future__ import annotations

import asyncio
import enum
import time
from contextvars import ContextVar

from rerank_service.core.domain import NO_TIME_LEFT


class Bound(enum.Enum):
    """What set an attempt's time: what a timeout says ran out."""

    UPSTREAM = "the upstream timeout"
    CALLER = "the call's deadline"
    PROBE = "the probe timeout"  # a probe of a down deployment (--upstream-breaker-probe-timeout)


# Less than this left of the caller's deadline (or of a probe's bound) is no time to send a
# request in (core/domain.py: the router and retries ask the same).
MIN_EXCHANGE = NO_TIME_LEFT
# A wait for the pool shorter than this leaves the attempt's timer as it is.
_NO_WAIT = 0.001


class AttemptBudget:
    """One attempt's time: `seconds()` at its start, and again (`connection_had`) once
    the wait for a connection of the pool is over. `timer` is the attempt's asyncio.timeout."""

    __slots__ = (
        "_probe_deadline",
        "_restarted",
        "_timeout",
        "bound",
        "connect_timeout",
        "connected",
        "connecting_since",
        "deadline",
        "pool_waited",
        "probe_timeout",
        "timer",
    )

    def __init__(
        self,
        upstream_timeout: float,
        deadline: float | None,
        probe_timeout: float | None,
        connect_timeout: float | None = None,
    ) -> None:
        """`deadline`: the caller's, on time.monotonic()'s clock; `probe_timeout`: the
        attempt is a probe of a down deployment, bounded by this many seconds from now;
        `connect_timeout`: opening a connection may take this many seconds (None: no bound
        of its own)."""
        self._timeout = upstream_timeout
        self.deadline = deadline
        self.probe_timeout = probe_timeout
        self.connect_timeout = connect_timeout
        # Its TCP connect (to the upstream, or to its proxy; connections.py marks both): when
        # it began, its host's address known (time.monotonic; None: none began), and whether
        # it is established. TLS and a proxy's tunnel come after: a slow one is no silence.
        self.connecting_since: float | None = None
        self.connected = False
        # Whether it waited for a connection of the pool to come free (connections.py marks
        # it): too little time left after that wait is our full pool's doing; with none (an
        # idle connection, or room for a new one, at once) it is the caller's (failures.py).
        self.pool_waited = False
        self._probe_deadline = None if probe_timeout is None else time.monotonic() + probe_timeout
        self.bound = Bound.UPSTREAM
        self.timer: asyncio.Timeout | None = None
        self._restarted = False

    def seconds(self) -> float:
        """The time the attempt may take from now (zero or less: none left); sets `bound`."""
        seconds, self.bound = self._timeout, Bound.UPSTREAM
        if self.deadline is None and self._probe_deadline is None:
            return seconds
        now = time.monotonic()
        if self.deadline is not None and self.deadline - now < seconds:
            seconds, self.bound = self.deadline - now, Bound.CALLER
        if self._probe_deadline is not None and self._probe_deadline - now < seconds:
            seconds, self.bound = self._probe_deadline - now, Bound.PROBE
        return seconds

    def connection_had(self) -> None:
        """The wait for a connection of the pool is over: the upstream's own time starts now.

        TimeoutError if (almost) nothing is left of the caller's deadline or the probe's
        bound: the request is not sent (what ran out, the pool's wait or the caller's
        deadline, failures.py tells by `pool_waited`). Only the first call counts (a
        connection found unusable is replaced at once)."""
        timer = self.timer
        if self._restarted or timer is None or timer.expired():
            return
        self._restarted = True
        seconds = self.seconds()
        if seconds < MIN_EXCHANGE and self.bound is not Bound.UPSTREAM:
            raise TimeoutError
        when = asyncio.get_running_loop().time() + seconds
        # Only ever later (the same deadlines, or the upstream timeout from now): not worth
        # a new timer when there was no wait to speak of (an idle connection at once).
        if when > (timer.when() or 0.0) + _NO_WAIT:
            timer.reschedule(when)

    def connect_went_unanswered(self) -> bool:
        """Whether the attempt's TCP connect is pending, unanswered for UNANSWERED_CONNECT
        or more: the upstream is unreachable, whatever cuts the attempt now. The name lookup
        before it and the TLS handshake or proxy tunnel after it do not count."""
        since = self.connecting_since
        return since is not None and not self.connected and time.monotonic() - since >= UNANSWERED_CONNECT


# Seconds a TCP connection request may go unanswered before the upstream counts as
# unreachable, even when the caller's deadline is what cut it: Linux resends an unanswered
# SYN after 1 s (its initial retransmission timeout), and a host that is there answers the
# first one in a round trip. Only the TCP connect (to the upstream, or to its proxy): a
# slow name lookup, TLS handshake or proxy tunnel is no silence of an absent host.
UNANSWERED_CONNECT = 1.0

# Set by the transport in the calling task for each attempt; read by the connector, which
# knows when the wait for a connection ends (connections.py).
ATTEMPT: ContextVar[AttemptBudget | None] = ContextVar("upstream_attempt_budget", default=None)
