"""Admission control: hard bounds on the RerankService work in flight, in calls and in bytes.

Past a bound a call is refused at once with RESOURCE_EXHAUSTED instead of joining an
unbounded queue: under overload the caller learns immediately (and can try another
replica), and the server's memory stays bounded. Calls are counted (a stream is one
call), and so are the bytes of the request messages being worked on (a stream item
counts like a call): ten 15 MB calls hold far more than ten 1 KB ones, and the process
holds about five times a request's bytes while it works on it (docs/RELIABILITY.md).
A unary call past the byte budget is refused; a stream stops reading its next item
until the budget has room (its client then waits under HTTP/2 flow control).
Only RerankService calls pass the edge (edge.py): health checks and reflection have bounds
of their own (api/grpc/side_calls.py), so probes keep working under overload.
"""

from __future__ import annotations

import asyncio

import grpc

from rerank_service.core.domain import ServiceError

# What refused callers are told to wait before trying again (a hint, as RetryInfo).
OVERLOAD_RETRY_AFTER = 0.05


class Admission:
    def __init__(self, max_in_flight: int, max_bytes: int | None = None, max_open: int | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.max_bytes = max_bytes
        # Calls open, working or not (a stream that has sent nothing yet included): grpc's own
        # limit also counts health and reflection calls, which have bounds of their own.
        self.max_open = max_open
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.open = 0
        self._freed: asyncio.Event | None = None  # set when bytes are given back

    def open_call(self) -> None:
        """Count a call open, or raise RESOURCE_EXHAUSTED; paired with `close_call`."""
        if self.max_open is not None and self.open >= self.max_open:
            raise _overloaded(f"{self.max_open} calls open (--max-open-calls)")
        self.open += 1

    def close_call(self) -> None:
        self.open -= 1

    def enter(self, size: int = 0) -> None:
        """Take a call slot and `size` bytes, or raise RESOURCE_EXHAUSTED; every `enter`
        is paired with a `release` of the same size."""
        if self.in_flight >= self.max_in_flight:
            raise _overloaded(f"{self.max_in_flight} calls in flight (--max-concurrent-requests)")
        self.enter_bytes(size)
        self.in_flight += 1

    def has_room(self, size: int) -> bool:
        """Whether `enter(size)` would let a call in now."""
        return self.in_flight < self.max_in_flight and self._fits(size)

    def enter_bytes(self, size: int) -> None:
        """Take `size` bytes and no call slot, or raise RESOURCE_EXHAUSTED: an HTTP body holds
        its bytes while it arrives, and takes its slot (`enter(0)`) only once it has."""
        if not self._fits(size):
            raise _overloaded(
                f"{self.bytes_in_flight} bytes of requests in flight, {size} more would pass "
                f"{self.max_bytes} (--max-inflight-bytes)"
            )
        self.bytes_in_flight += size

    def release(self, size: int = 0) -> None:
        self.in_flight -= 1
        self.give_bytes(size)

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


def _overloaded(why: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"overloaded: {why}; retry shortly",
        reason="OVERLOADED",
        retry_after=OVERLOAD_RETRY_AFTER,
    )
