"""What a failed HTTP attempt becomes: a metrics label and the service's error.

The status codes themselves are chosen in errors.py (the one place for that); this
module only tells the exceptions of the HTTP layer apart.
"""

from __future__ import annotations

from typing import NamedTuple

import httpx

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.body import ResponseTooLarge, UndecodableBody
from rerank_service.core.domain import ServiceError


class Failure(NamedTuple):
    label: str  # rerank_upstream_requests_total's status label: a small, fixed set
    error: ServiceError | None  # None: not an upstream failure (a bug): let it propagate as it is


def classify(exc: Exception, by_caller_deadline: bool) -> Failure:
    """`exc` ended an attempt; `by_caller_deadline`: the caller's deadline set its time budget."""
    if isinstance(exc, TimeoutError):  # the whole exchange ran past its budget (asyncio.timeout)
        return Failure("timeout", errors.timed_out(by_caller_deadline))
    if isinstance(exc, httpx.HTTPError):
        return Failure(transport_failure(exc), errors.from_transport(exc, by_caller_deadline))
    if isinstance(exc, ResponseTooLarge):
        return Failure("too_large", errors.too_large(exc.limit))
    if isinstance(exc, UndecodableBody):
        # A body that is not what its headers say: a protocol failure of the upstream.
        return Failure("protocol_error", errors.undecodable(str(exc)))
    return Failure("error", None)


def transport_failure(exc: httpx.HTTPError) -> str:
    """The metrics label of an attempt that got no HTTP status."""
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_timeout"  # our own connection pool was full: the upstream never saw it
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"  # a refused connection, or a TLS handshake that failed
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol_error"  # includes a connection closed before any answer or mid-body
    return "transport_error"
