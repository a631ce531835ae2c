"""Admission control: a hard bound on RerankService calls in flight.

Past the bound a call is refused at once with RESOURCE_EXHAUSTED instead of joining
an unbounded queue: under overload the caller learns immediately (and can try
another replica), and the server's memory stays bounded. Only RerankService calls
pass the edge (edge.py), so health checks and reflection are never counted or
refused, and probes keep working under overload.
"""

from __future__ import annotations

import grpc

from rerank_service.core.domain import ServiceError

# What refused callers are told to wait before trying again (a hint, as RetryInfo).
OVERLOAD_RETRY_AFTER = 0.05


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    def enter(self) -> None:
        """Take a slot, or raise RESOURCE_EXHAUSTED; every `enter` is paired with a `release`."""
        if self.in_flight >= self.max_in_flight:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"overloaded: {self.max_in_flight} calls in flight (--max-concurrent-requests); "
                "retry shortly",
                reason="OVERLOADED",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
