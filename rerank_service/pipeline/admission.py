"""Admission control: hard bounds on the RerankService work in flight, in calls and in bytes.

Past a bound a call is refused at once with RESOURCE_EXHAUSTED instead of joining an
unbounded queue: under overload the caller learns immediately (and can try another
replica), and the server's memory stays bounded. Calls are counted (a stream is one
call), and so are the bytes of the request messages being worked on (a stream item
counts like a call): ten 15 MB calls hold far more than ten 1 KB ones, and the process
holds about five times a request's bytes while it works on it (docs/RELIABILITY.md).
While several callers call, one without a concurrent limit of its own holds at most its
share of the slots (--caller-max-share), so a caller that floods leaves the others room.
The share reserves nothing while one caller is alone: a flood may then take every slot. A
call of a caller under its share that finds them all taken while another caller holds more
than its share waits (at most SLOT_WAIT) for the next slot released, handed to it before
anyone else may take it (`SlotWait`, `wait_for_slot`); past SLOT_WAIT it is refused.
A unary call past the byte budget is refused; a stream stops reading its next item
until the budget has room (its client then waits under HTTP/2 flow control).
Only RerankService calls pass the edge (edge.py): health checks and reflection have bounds
of their own (api/grpc/side_calls.py), so probes keep working under overload.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import grpc

from rerank_service.core.domain import ServiceError
from rerank_service.pipeline.limits import FAIR_SHARE, fair_share_refusal

# The bound a refusal names (rerank_admission_refusals_total's `bound`), FAIR_SHARE besides.
SLOTS, BYTES, OPEN_CALLS = "slots", "bytes", "open_calls"
BOUNDS = (SLOTS, BYTES, OPEN_CALLS, FAIR_SHARE)

# What refused callers are told to wait before trying again (a hint, as RetryInfo).
OVERLOAD_RETRY_AFTER = 0.05


# Seconds a caller counts as calling after its last call arrived (admitted or refused): a
# caller past its share is refused while another one called within this.
OTHERS_WINDOW = 1.0

# Seconds at most a call of a caller under its share waits for a slot while every slot is
# taken and another caller holds more than its share (less if its deadline comes first):
# the next slot released is handed to it, so a flood that filled the slots while the
# others were quiet cannot keep them out. Past it the call is refused OVERLOADED.
SLOT_WAIT = 1.0


class SlotWait(Exception):
    """Raised by `enter(..., may_wait=True)` instead of the slots refusal when the call may
    wait for the next slot released: its front door awaits `wait_for_slot(wait, ...)`, which
    takes the slot (and the bytes) or refuses. Only a refusal path raises it: a call that
    finds a free slot never waits, nor costs anything more."""

    def __init__(self, size: int, caller: str) -> None:
        super().__init__(size, caller)
        self.size = size  # the bytes the call takes with its slot
        self.caller = caller


class Admission:
    def __init__(
        self,
        max_in_flight: int,
        max_bytes: int | None = None,
        max_open: int | None = None,
        *,
        caller_max_share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_bytes = max_bytes
        # Fair share: the slots one caller may hold while others call (--caller-max-share).
        self.caller_max_share = caller_max_share
        self._share_cap = (
            max(1, math.floor(caller_max_share * max_in_flight)) if caller_max_share < 1 else None
        )
        self._held: dict[str, int] = {}  # slots held, by caller
        # The two callers seen last, each with when: enough to tell whether another than
        # a given caller called within OTHERS_WINDOW.
        self._last: tuple[str | None, float] = (None, float("-inf"))
        self._before: tuple[str | None, float] = (None, float("-inf"))
        self._clock = clock
        # Calls open, working or not (a stream that has sent nothing yet included): grpc's own
        # limit also counts health and reflection calls, which have bounds of their own.
        self.max_open = max_open
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.open = 0
        self._freed: asyncio.Event | None = None  # set when bytes are given back
        # Calls waiting for a slot (SlotWait), first come first: each a future resolved True
        # when a released slot is handed to it, by its caller. Only while every slot is taken.
        self._waiters: dict[asyncio.Future[bool], str] = {}
        # Told the bound of each refusal: SLOTS, BYTES, OPEN_CALLS or FAIR_SHARE.
        self._on_refusal = on_refusal or _unrecorded

    def open_call(self) -> None:
        """Count a call open, or raise RESOURCE_EXHAUSTED; paired with `close_call`."""
        if self.max_open is not None and self.open >= self.max_open:
            self._on_refusal(OPEN_CALLS)
            raise _overloaded(f"{self.max_open} calls open (--max-open-calls)")
        self.open += 1

    def close_call(self) -> None:
        self.open -= 1

    def enter(
        self, size: int = 0, caller: str | None = None, *, capped: bool = True, may_wait: bool = False
    ) -> None:
        """Take a call slot and `size` bytes, or raise RESOURCE_EXHAUSTED; every `enter`
        is paired with a `release` of the same size and caller. `caller` (None: not known):
        whose slot it is, which the fair share counts as calling; `capped`: held to the share
        itself (a caller with a concurrent limit of its own is held to that instead).
        `may_wait`: the front door can await `wait_for_slot`, which `SlotWait` (raised instead
        of the slots refusal) tells it to do."""
        if caller is not None:
            self._seen(caller)
        if self.in_flight >= self.max_in_flight:
            if may_wait and caller is not None and capped and self._may_wait(caller):
                raise SlotWait(size, caller)
            self._on_refusal(SLOTS)
            raise self._slots_refusal()
        if caller is not None and capped and self._share_cap is not None:
            held = self._held.get(caller, 0)
            if held >= self._share_cap and self._others_calling(caller):
                self._on_refusal(FAIR_SHARE)
                raise fair_share_refusal(caller, held, self.max_in_flight, self.caller_max_share)
        self.enter_bytes(size)
        self.in_flight += 1
        if caller is not None:
            self._held[caller] = self._held.get(caller, 0) + 1

    def has_room(self, size: int) -> bool:
        """Whether `enter(size)` would let a call in now."""
        return self.in_flight < self.max_in_flight and self._fits(size)

    def enter_bytes(self, size: int) -> None:
        """Take `size` bytes and no call slot, or raise RESOURCE_EXHAUSTED: an HTTP body holds
        its bytes while it arrives, and takes its slot (`enter(0)`) only once it has."""
        if not self._fits(size):
            self._on_refusal(BYTES)
            raise _overloaded(
                f"{self.bytes_in_flight} bytes of requests in flight, {size} more would pass "
                f"{self.max_bytes} (--max-inflight-bytes)"
            )
        self.bytes_in_flight += size

    def release(self, size: int = 0, caller: str | None = None) -> None:
        self.in_flight -= 1
        self.give_bytes(size)
        if caller is not None:
            held = self._held[caller] - 1
            if held:
                self._held[caller] = held
            else:
                del self._held[caller]  # the map holds callers with slots only
        if self._waiters:
            self._hand_on()

    def held(self, caller: str) -> int:
        """Slots `caller` holds now."""
        return self._held.get(caller, 0)

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot (`wait_for_slot`)."""
        return len(self._waiters)

    async def wait_for_slot(self, wait: SlotWait, within: float | None = None) -> None:
        """Wait for the slot `enter` found none for (`wait`), then take the call's bytes;
        RESOURCE_EXHAUSTED OVERLOADED (a slots refusal) if none comes within SLOT_WAIT or
        `within` (seconds to the call's deadline, None: none). Cancelled, it holds nothing."""
        timeout = SLOT_WAIT if within is None else min(SLOT_WAIT, within)
        if timeout <= 0:
            self._on_refusal(SLOTS)
            raise self._slots_refusal()
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[bool] = loop.create_future()
        self._waiters[handed] = wait.caller
        timer = loop.call_later(timeout, _expire, handed)
        try:
            got = await handed
        except asyncio.CancelledError:
            # The client is gone: a slot handed to it meanwhile goes to the next waiter.
            if handed.done() and not handed.cancelled() and handed.result():
                self.release(0, wait.caller)
            raise
        finally:
            timer.cancel()
            self._waiters.pop(handed, None)
        if not got:
            self._on_refusal(SLOTS)
            raise self._slots_refusal()
        try:
            self.enter_bytes(wait.size)
        except ServiceError:
            self.release(0, wait.caller)
            raise

    def _may_wait(self, caller: str) -> bool:
        """Whether a call of `caller` (held to the share) that finds every slot taken may
        wait for the next one: it holds less than its share while another caller holds more
        than its share, and the waiters are not past their bound."""
        cap = self._share_cap
        if cap is None or self._held.get(caller, 0) >= cap or len(self._waiters) >= self.max_in_flight:
            return False
        return any(held > cap for other, held in self._held.items() if other != caller)

    def _hand_on(self) -> None:
        """The slot just released, handed to the first waiter: in flight again at once, as
        its caller's, so nobody else takes it first."""
        for handed, caller in self._waiters.items():
            if not handed.done():  # one that timed out or was cancelled is leaving
                del self._waiters[handed]
                self.in_flight += 1
                self._held[caller] = self._held.get(caller, 0) + 1
                handed.set_result(True)
                return

    def _slots_refusal(self) -> ServiceError:
        return _overloaded(f"{self.max_in_flight} calls in flight (--max-concurrent-requests)")

    def _seen(self, caller: str) -> None:
        now = self._clock()
        if self._last[0] != caller:
            self._before = self._last
        self._last = (caller, now)

    def _others_calling(self, caller: str) -> bool:
        """Whether a caller other than `caller` holds a slot or called within OTHERS_WINDOW."""
        if len(self._held) > 1 or (self._held and caller not in self._held):
            return True
        other = self._before if self._last[0] == caller else self._last
        return other[0] is not None and self._clock() - other[1] < OTHERS_WINDOW

    async def take_bytes(self, size: int) -> None:
        """Take `size` bytes, waiting while the budget has no room for them."""
        while not self._fits(size):
            if self._freed is None:
                self._freed = asyncio.Event()
            await self._freed.wait()
        self.bytes_in_flight += size

    def give_bytes(self, size: int) -> None:
        if not size:
            return
        self.bytes_in_flight -= size
        freed, self._freed = self._freed, None
        if freed is not None:
            freed.set()  # every waiter looks again; those that still do not fit wait anew

    def _fits(self, size: int) -> bool:
        # A request alone is always let in when nothing else holds bytes: the message
        # size bound (--max-message-bytes) already limits it.
        return (
            self.max_bytes is None
            or not self.bytes_in_flight
            or self.bytes_in_flight + size <= self.max_bytes
        )


def _expire(handed: asyncio.Future[bool]) -> None:
    """A waiter's SLOT_WAIT (or deadline) ran out before a slot was handed to it."""
    if not handed.done():
        handed.set_result(False)


def _unrecorded(bound: str) -> None:
    """A refusal nobody counts (an Admission made without `on_refusal`: tests)."""


def _overloaded(why: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"overloaded: {why}; retry shortly",
        reason="OVERLOADED",
        retry_after=OVERLOAD_RETRY_AFTER,
    )
