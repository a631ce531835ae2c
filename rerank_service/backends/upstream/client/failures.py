"""What a failed HTTP attempt becomes: a metrics label and the service's error.

The status codes themselves are chosen in errors.py (the one place for that); this
module only tells the exceptions of the HTTP layer apart. aiohttp's exceptions are first
named in httpx's vocabulary of transport errors (ConnectError, ReadError, ...), which
errors.py and the metric's labels are written in.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import aiohttp
import httpx

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.body import ResponseTooLarge, UndecodableBody
from rerank_service.backends.upstream.client.budget import AttemptBudget, Bound
from rerank_service.backends.upstream.client.connections import Phase
from rerank_service.core.domain import ServiceError


class Failure(NamedTuple):
    label: str  # rerank_upstream_requests_total's status label: a small, fixed set
    error: ServiceError | None  # None: not an upstream failure (a bug): let it propagate as it is


def classify(exc: Exception, budget: AttemptBudget, phase: Phase) -> Failure:
    """`exc` ended an attempt; `budget`: its time, and what set it; `phase`: where the
    attempt was when it ended (connections.PHASE)."""
    if isinstance(exc, TimeoutError):  # the attempt ran past its budget (asyncio.timeout)
        if budget.bound is Bound.PROBE and phase is not Phase.POOL:
            # The probe's own bound, not the caller's deadline: the deployment is still down.
            return Failure("timeout", errors.probe_timed_out(budget.probe_timeout, phase is Phase.CONNECT))
        exc = _timeout_in(phase)
    if isinstance(exc, aiohttp.ClientError | asyncio.IncompleteReadError | OSError):
        exc = transport_error(exc)
    if isinstance(exc, httpx.HTTPError):
        return Failure(transport_failure(exc), errors.from_transport(exc, budget.bound is Bound.CALLER))
    if isinstance(exc, ResponseTooLarge):
        return Failure("too_large", errors.too_large(exc.limit))
    if isinstance(exc, UndecodableBody):
        # A body that is not what its headers say: a protocol failure of the upstream.
        return Failure("protocol_error", errors.undecodable(str(exc)))
    return Failure("error", None)


def _timeout_in(phase: Phase) -> httpx.TimeoutException:
    """The attempt's time ran out in `phase`: what that says, in httpx's timeouts."""
    if phase is Phase.POOL:  # every connection of our own pool stayed busy: the upstream never saw it
        return httpx.PoolTimeout("no connection of the pool came free in time")
    if phase is Phase.CONNECT:  # no connection in time (a host that drops what is sent to it)
        return httpx.ConnectTimeout("no connection to the upstream in time")
    return httpx.ReadTimeout("no whole answer in time")


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


def transport_error(exc: Exception) -> httpx.TransportError:
    """aiohttp's failure (or a bare socket error) as the httpx transport error it amounts to.
    The original stays chained: errors.py reads a rejected certificate's reason from it."""
    error: httpx.TransportError
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        error = httpx.ProxyError(f"the proxy refused: {exc.status} {exc.message}")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        # Refused, unresolvable, unroutable, a failed TLS handshake: no connection at all.
        error = httpx.ConnectError(text)
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        # Closed before any answer, or mid-body (cut short, broken chunking).
        error = httpx.RemoteProtocolError(text)
    elif isinstance(exc, asyncio.IncompleteReadError):
        error = httpx.RemoteProtocolError("the connection closed before the whole body came")
    elif isinstance(exc, aiohttp.ClientResponseError):
        error = httpx.RemoteProtocolError(f"not an HTTP answer: {exc.message}")  # the parser refused it
    elif isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientConnectionResetError | OSError):
        error = httpx.ReadError(text)  # reset, broken pipe
    else:
        error = httpx.TransportError(text)
    # aiohttp's certificate error poses as an ssl one without its fields: chain the real one.
    error.__cause__ = (
        exc.certificate_error if isinstance(exc, aiohttp.ClientConnectorCertificateError) else exc
    )
    return error
