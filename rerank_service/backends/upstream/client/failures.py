"""What a failed HTTP attempt becomes: a metrics label and the service's error.

The status codes themselves are chosen in errors.py (the one place for that); this
module only tells the exceptions of the HTTP layer apart. aiohttp's exceptions are first
named in httpx's vocabulary of transport errors (ConnectError, ReadError, ...), which
errors.py and the metric's labels are written in.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import NamedTuple, TypeGuard

import aiohttp
import httpx
from aiohttp import http_exceptions

from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.body import ResponseTooLarge, UndecodableBody
from rerank_service.backends.upstream.client.budget import AttemptBudget, Bound
from rerank_service.backends.upstream.client.connections import ConnectTimedOut, Phase
from rerank_service.core.domain import ServiceError


class Failure(NamedTuple):
    label: str  # rerank_upstream_requests_total's status label: a small, fixed set
    error: ServiceError | None  # None: not an upstream failure (a bug): let it propagate as it is


def classify(exc: Exception, budget: AttemptBudget, phase: Phase) -> Failure:
    """`exc` ended an attempt; `budget`: its time, and what set it; `phase`: where the
    attempt was when it ended (connections.PHASE)."""
    if isinstance(exc, ConnectTimedOut):  # the connect timeout: unreachable, as a refused connect
        return Failure("timeout", errors.connect_timed_out(exc.seconds))
    if isinstance(exc, TimeoutError):  # the attempt ran past its budget (asyncio.timeout)
        if budget.bound is Bound.PROBE and phase is not Phase.POOL:
            # The probe's own bound, not the caller's deadline: the deployment is still down.
            return Failure("timeout", errors.probe_timed_out(budget.probe_timeout, phase is Phase.CONNECT))
        if budget.bound is Bound.CALLER and phase is Phase.CONNECT:
            # The caller's deadline cut a connect short. A reachable host answers a TCP
            # connection request well within budget.UNANSWERED_CONNECT (Linux's first SYN
            # retransmission): one pending that long says the upstream is unreachable,
            # whoever's time ran out (not a TLS handshake or tunnel that slow: it answered).
            unreachable = budget.connect_went_unanswered()
            return Failure("timeout", errors.timed_out(by_caller_deadline=True, unreachable=unreachable))
        if budget.bound is Bound.CALLER and phase is Phase.POOL and not budget.pool_waited:
            # A connection (or room to open one) came at once, with too little of the caller's
            # deadline left to send on it (budget.connection_had): the caller's deadline ran
            # out, as for a call that comes with none left (transport.py), not our pool.
            return Failure("timeout", errors.timed_out(by_caller_deadline=True))
        exc = _timeout_in(phase)
    if phase is Phase.EXCHANGE and _refused_by_the_parser(exc):
        # The upstream answered, with something that is no HTTP/1.1: not an unreachable
        # upstream, and no retry would parse it (retry.py: a bad response is not retried).
        return Failure("protocol_error", errors.not_http(_parser_refused(exc)))
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


def _refused_by_the_parser(exc: Exception) -> TypeGuard[aiohttp.ClientResponseError]:
    """Whether aiohttp's parser refused the answer's head: ClientResponse.start raises
    ClientResponseError for that and nothing else here (no redirect is followed, no status
    raised for). A proxy's refusal is one too, but answers the CONNECT, not the request."""
    return isinstance(exc, aiohttp.ClientResponseError) and not isinstance(exc, aiohttp.ClientHttpProxyError)


# What the parser refused, by the class of its error: its message is never shown, as it
# quotes the upstream's bytes (they may hold anything, a reflected key) in shapes that
# differ between aiohttp's C parser and its pure-Python one (AIOHTTP_NO_EXTENSIONS, PyPy).
# The C parser raises the bare BadHttpMessage for most of what it refuses (a repeated
# Content-Length, a bad chunk size): _MALFORMED.
_REFUSALS: tuple[tuple[type[http_exceptions.HttpProcessingError], str], ...] = (
    (http_exceptions.BadStatusLine, "bad status line"),  # bytes past an answer's end too
    (http_exceptions.LineTooLong, "line too long"),
    (http_exceptions.InvalidHeader, "malformed header"),
    (http_exceptions.TransferEncodingError, "malformed chunked encoding"),
    (http_exceptions.ContentLengthError, "body shorter than its Content-Length"),
)
_MALFORMED = "malformed head or framing"


def _parser_refused(exc: BaseException) -> str:
    """What the parser refused in the answer, a fixed phrase: aiohttp raises its
    ClientResponseError from a copy of the parser's error, raised from the original."""
    seen: BaseException | None = exc
    for _ in range(4):  # never walk a cycle
        if seen is None:
            break
        for kind, phrase in _REFUSALS:
            if isinstance(seen, kind):
                return phrase
        seen = seen.__cause__
    return _MALFORMED


def _timeout_in(phase: Phase) -> httpx.TimeoutException:
    """The attempt's time ran out in `phase`: what that says, in httpx's timeouts."""
    if phase is Phase.POOL:  # it waited, and every connection of our own pool stayed busy: nothing sent
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
        # The proxy answered its CONNECT with another status than 200: no tunnel, so no
        # connection to the upstream. Its status with the standard phrase, not the proxy's
        # own reason text (which a proxy may fill with anything, the credentials it got).
        error = httpx.ProxyError(f"the proxy refused the tunnel: {_status_named(exc.status)}")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        # Refused, unresolvable, unroutable, a failed TLS handshake: no connection at all.
        error = httpx.ConnectError(text)
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        # Closed before any answer, or mid-body (cut short, broken chunking).
        error = httpx.RemoteProtocolError(text)
    elif isinstance(exc, asyncio.IncompleteReadError):
        error = httpx.RemoteProtocolError("the connection closed before the whole body came")
    elif isinstance(exc, aiohttp.ClientResponseError):
        # The parser refused the proxy's answer to the CONNECT (the upstream's: classify).
        error = httpx.RemoteProtocolError(f"not an HTTP answer: {_parser_refused(exc)}")
    elif isinstance(exc, aiohttp.ClientOSError | aiohttp.ClientConnectionResetError | OSError):
        error = httpx.ReadError(text)  # reset, broken pipe
    else:
        error = httpx.TransportError(text)
    # aiohttp's certificate error poses as an ssl one without its fields: chain the real one.
    error.__cause__ = (
        exc.certificate_error if isinstance(exc, aiohttp.ClientConnectorCertificateError) else exc
    )
    return error


def _status_named(status: int) -> str:
    """`status` with its standard phrase when it has one: "407 Proxy Authentication Required"."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)
