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
anyone else may take it (`SlotWait`, `wait_for_slot`); past SLOT_WAIT it is refused. What a
caller holds and the calls it has waiting stay within its share: it waits only while they
are under it, and a slot is handed only to a waiter whose caller is still under it.
Each item in flight of a RerankStream counts as one slot held by its caller for the share
(`enter_item`), though the stream takes one slot of the bound. Two more of the bounds are
held to the share always, whether others call or not (a flood that filled them while the
others were quiet would keep them out for as long as its calls stay open): the calls one
known caller has open (`open_call`), and the bytes of the HTTP bodies of one caller (or one
client address) that are still arriving (`enter_body`).
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
from rerank_service.observability import tracing
from rerank_service.pipeline.limits import FAIR_SHARE, fair_share_refusal, share_refusal

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

# Seconds before a call's deadline that its wait for a slot ends: refused then, its refusal
# (with RetryInfo) reaches the client before grpc's deadline ends the call, rather than
# racing it (the client would see DEADLINE_EXCEEDED while the service records a refusal).
DEADLINE_MARGIN = 0.05


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
        self._share_cap = _share_of(caller_max_share, max_in_flight)
        self._held: dict[str, int] = {}  # slots held, by caller (a stream's items each count one)
        # The two callers seen last, each with when: enough to tell whether another than
        # a given caller called within OTHERS_WINDOW.
        self._last: tuple[str | None, float] = (None, float("-inf"))
        self._before: tuple[str | None, float] = (None, float("-inf"))
        self._clock = clock
        # Calls open, working or not (a stream that has sent nothing yet, or a unary call whose
        # request has not come, included): grpc's own limit also counts health and reflection
        # calls, which have bounds of their own.
        self.max_open = max_open
        # The calls one caller may have open, and the bytes of one caller's (or client
        # address's) HTTP bodies still arriving: held to the share always (None: share 1).
        self._open_cap = _share_of(caller_max_share, max_open)
        self._body_cap = _share_of(caller_max_share, max_bytes)
        self._open_by: dict[str, int] = {}  # calls open, by caller (those with any only)
        self._arriving: dict[str, int] = {}  # bytes of bodies still arriving, by whose (ditto)
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.open = 0
        self._freed: asyncio.Event | None = None  # set when bytes are given back
        # Calls waiting for a slot (SlotWait), first come first: each a future resolved True
        # when a released slot is handed to it, by its caller. Only while every slot is taken,
        # or while a free one waits for a waiter's caller to be under its share again.
        self._waiters: dict[asyncio.Future[bool], str] = {}
        self._waiting_by: dict[str, int] = {}  # those waiters, by caller (those with any only)
        # Told the bound of each refusal: SLOTS, BYTES, OPEN_CALLS or FAIR_SHARE.
        self._on_refusal = on_refusal or _unrecorded

    def open_call(self, caller: str | None = None) -> None:
        """Count a call open, or raise RESOURCE_EXHAUSTED; paired with `close_call(caller)`.
        `caller` (None: not known, or known by no key of its own): held to its share of
        --max-open-calls always, so that one caller's silent calls (streams, or unary calls
        whose request never comes) cannot keep every other caller's calls out until the
        idle timeout ends them."""
        if self.max_open is not None and self.open >= self.max_open:
            self._on_refusal(OPEN_CALLS)
            raise _overloaded(f"{self.max_open} calls open (--max-open-calls)")
        if caller is not None and self._open_cap is not None:
            held = self._open_by.get(caller, 0)
            if held >= self._open_cap:
                self._on_refusal(FAIR_SHARE)
                raise _share_refusal(
                    caller, f"{held} of {self.max_open} calls open (--max-open-calls)", self.caller_max_share
                )
            self._open_by[caller] = held + 1
        self.open += 1

    def close_call(self, caller: str | None = None) -> None:
        self.open -= 1
        self.release_open_share(caller)

    def release_open_share(self, caller: str | None) -> None:
        """A call `open_call(caller)` counted no longer counts against `caller`'s share of
        the open calls, and stays open (then `close_call()`, without the caller): a unary
        call once its request is in and it holds its slot, which the slots' own share
        bounds (a caller alone may hold every slot, however few its share of the open calls)."""
        if caller is not None and self._open_cap is not None:
            _uncount(self._open_by, caller, 1)

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
            raise self._slots_refused()
        held = self._within_share(caller, capped)
        self.enter_bytes(size)
        self.in_flight += 1
        if caller is not None:
            self._held[caller] = held + 1

    def enter_item(self, caller: str | None, *, capped: bool = True) -> None:
        """Count one more item in flight of a stream that holds a slot already (`enter`
        counted its first) as a slot its caller holds, or raise the fair share refusal: a
        stream takes one slot of the bound, but its items run at once, each an upstream
        call. Paired with `release_item`, or with the `release` of the stream's slot."""
        if caller is None:
            return
        self._seen(caller)
        self._held[caller] = self._within_share(caller, capped) + 1

    def release_item(self, caller: str | None) -> None:
        """An item counted by `enter_item` (or its stream's first) answered, its stream's
        slot still held for the others in flight."""
        if caller is not None:
            _uncount(self._held, caller, 1)
            if self._waiters and self.in_flight < self.max_in_flight:
                self._hand_on()  # a free slot its caller's share kept from a waiter may go now

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

    def body_fits(self, size: int, whose: str) -> bool:
        """Whether `enter_body(size, whose)` would take the bytes now."""
        return self._body_share_ok(size, whose) and self._fits(size)

    def enter_body(self, size: int, whose: str, caller: str) -> None:
        """Take `size` bytes for an HTTP body about to be read (as `enter_bytes`), or raise
        RESOURCE_EXHAUSTED. The bytes of the bodies still arriving of `whose` (its caller,
        or its client's address) are held to its share of the budget always, so that bodies
        that never come cannot hold it all for --http-body-timeout; one body alone is always
        let in. Paired with `body_arrived(size, whose)` once it is in, or given up; its bytes
        stay taken until `give_bytes`. `caller`: the caller's name, as the refusal says it."""
        if not self._body_share_ok(size, whose):
            self._on_refusal(FAIR_SHARE)
            held = self._arriving[whose]
            raise _share_refusal(
                caller,
                f"{held} bytes of HTTP bodies still arriving from {_whose(whose)}, {size} more would pass "
                f"{self._body_cap} of {self.max_bytes} (--max-inflight-bytes)",
                self.caller_max_share,
            )
        self.enter_bytes(size)
        if size and self._body_cap is not None:
            self._arriving[whose] = self._arriving.get(whose, 0) + size

    def body_arrived(self, size: int, whose: str) -> None:
        """The body `enter_body` took `size` bytes for is in (or will never be): no longer
        counted as arriving; its bytes stay taken."""
        if size and self._body_cap is not None:
            _uncount(self._arriving, whose, size)

    def _body_share_ok(self, size: int, whose: str) -> bool:
        cap = self._body_cap
        if cap is None:
            return True
        held = self._arriving.get(whose, 0)
        return not held or held + size <= cap

    def release(self, size: int = 0, caller: str | None = None) -> None:
        self.in_flight -= 1
        self.give_bytes(size)
        if caller is not None:
            _uncount(self._held, caller, 1)  # the map holds callers with slots only
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
        DEADLINE_MARGIN before `within` (seconds to the call's deadline, None: none), at once
        if that is past. Cancelled, it holds nothing."""
        timeout = SLOT_WAIT if within is None else min(SLOT_WAIT, within - DEADLINE_MARGIN)
        if timeout <= 0:
            raise self._slots_refused()
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[bool] = loop.create_future()
        self._waiters[handed] = wait.caller
        self._waiting_by[wait.caller] = self._waiting_by.get(wait.caller, 0) + 1
        timer = loop.call_later(timeout, _expire, handed)
        # The wait, a span of the call's (a call let in at once never gets here: no span).
        span = tracing.child("rerank.admission.wait", {"rerank.caller": wait.caller})
        try:
            got = await handed
            if not got and span is not None:  # its time ran out: refused, as the call's span says
                span.set("error.type", "OVERLOADED")
        except asyncio.CancelledError:
            # The client is gone: a slot handed to it meanwhile goes to the next waiter.
            if handed.done() and not handed.cancelled() and handed.result():
                self.release(0, wait.caller)
            raise
        finally:
            timer.cancel()
            self._unwait(handed)
            if span is not None:
                span.end()
        if not got:
            raise self._slots_refused()
        try:
            self.enter_bytes(wait.size)
        except ServiceError:
            self.release(0, wait.caller)
            raise

    def _may_wait(self, caller: str) -> bool:
        """Whether a call of `caller` (held to the share) that finds every slot taken may
        wait for the next one: what it holds and has waiting is less than its share while
        another caller holds more than its share, and the waiters are not past their bound."""
        cap = self._share_cap
        if cap is None or len(self._waiters) >= self.max_in_flight:
            return False
        if self._held.get(caller, 0) + self._waiting_by.get(caller, 0) >= cap:
            return False  # its waiters would take it past its share once handed slots
        return any(held > cap for other, held in self._held.items() if other != caller)

    def _hand_on(self) -> None:
        """Each free slot (the one just released), handed to the first waiter whose caller
        holds less than its share: in flight again at once, as its caller's, so nobody else
        takes it first. A waiter whose caller reached its share meanwhile (its stream items,
        `enter_item`) is passed over and waits on, for a later slot or its time's end."""
        cap = self._share_cap
        for handed, caller in list(self._waiters.items()):
            if self.in_flight >= self.max_in_flight:
                return
            if handed.done():  # one that timed out or was cancelled is leaving
                self._unwait(handed)
            elif cap is None or self._held.get(caller, 0) < cap:
                self._unwait(handed)
                self.in_flight += 1
                self._held[caller] = self._held.get(caller, 0) + 1
                handed.set_result(True)

    def _unwait(self, handed: asyncio.Future[bool]) -> None:
        """A waiter out of the queue (handed a slot, or leaving), once."""
        caller = self._waiters.pop(handed, None)
        if caller is not None:
            _uncount(self._waiting_by, caller, 1)

    def _slots_refused(self) -> ServiceError:
        """The slots refusal, counted."""
        self._on_refusal(SLOTS)
        return _overloaded(f"{self.max_in_flight} calls in flight (--max-concurrent-requests)")

    def _within_share(self, caller: str | None, capped: bool) -> int:
        """The slots `caller` holds, or the fair share refusal (counted) where one more would
        take a caller held to the share past it while others call."""
        if caller is None:
            return 0
        held, cap = self._held.get(caller, 0), self._share_cap
        if capped and cap is not None and held >= cap and self._others_calling(caller):
            self._on_refusal(FAIR_SHARE)
            raise fair_share_refusal(caller, held, self.max_in_flight, self.caller_max_share)
        return held

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


def _share_of(share: float, bound: int | None) -> int | None:
    """A caller's share of `bound` (at least 1), or None: no share (1), or no bound."""
    return None if share >= 1 or bound is None else max(1, math.floor(share * bound))


def _uncount(counts: dict[str, int], key: str, amount: int) -> None:
    """Take `amount` from `key`'s count, dropping the key at 0 (the maps hold only counts above 0)."""
    left = counts[key] - amount
    if left:
        counts[key] = left
    else:
        del counts[key]


def _whose(whose: str) -> str:
    return f"client address {whose[len(PEER_PREFIX) :]}" if whose.startswith(PEER_PREFIX) else "this caller"


# What `enter_body`'s `whose` starts with where it is a client address, not a caller's name
# (which starts with a letter or digit).
PEER_PREFIX = "peer "


def _share_refusal(caller: str, what: str, share: float) -> ServiceError:
    """RESOURCE_EXHAUSTED for a caller at its share of a bound other than the slots
    (`fair_share_refusal` says the slots')."""
    return share_refusal(caller, "", f"{what}, at most {share:g} of it for one caller")


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
