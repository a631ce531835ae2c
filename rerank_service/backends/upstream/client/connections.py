"""The aiohttp session that carries one deployment's upstream calls: its pool and route.

Each deployment has a session of its own, so its own connection pool: at most
`max_connections` sockets (aiohttp's TCPConnector `limit`; a call past that waits for one
to come free, within its time budget), idle ones reused for a while, then closed
(KEEPALIVE_EXPIRY). The connector drops an idle connection the upstream has closed (its
socket saw the end of stream) before it would carry a request; one whose close was still
on its way is retried once (exchange.py), for which the connector says whether the
connection it handed out was reused, and its protocol counts the bytes of an answer that
came on it. Only HTTP/1.1 is spoken.

One timer bounds each attempt (transport.py), so a timeout alone does not say what ran
out: the connector marks, in the calling task (PHASE), while it waits for a pooled
connection to come free and while it opens a new one. Our own full pool is not the
upstream's fault; a connection that never opens is an unreachable upstream; only the
rest is an upstream slow to answer. (aiohttp's trace signals would say the same, for
several microseconds of every call.) Where the wait for the pool ends, the connector
also sets the attempt's timer anew (budget.py): the upstream timeout bounds the
upstream's own time, not the time spent queued behind other calls. Opening a connection
has a bound of its own, the connect timeout: past it, ConnectTimedOut (the upstream is
unreachable, as when it refuses the connection), not a timeout of the attempt.

Whether calls go straight to the upstream or through a proxy (proxies.py), and which
certificates are trusted (tls.py), is settled here once, never per call.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import math
import ssl
import time
import weakref
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx
from aiohttp.abc import ResolveResult
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from rerank_service.backends.upstream.client.budget import ATTEMPT
from rerank_service.backends.upstream.client.proxies import proxy_for
from rerank_service.backends.upstream.client.tls import upstream_ssl_context

# Seconds within which an idle connection is closed. aiohttp sweeps the pool every
# keepalive_timeout, closing the connections idle longer than that (and reuses none idle
# longer): one that went idle just after a sweep stays open until the one after next,
# almost twice as long. So aiohttp is given half of this (open_session): an idle
# connection is reused for up to half of it, and closed by the end of it.
KEEPALIVE_EXPIRY = 30.0


class CountingHandler(ResponseHandler):
    """aiohttp's protocol of one connection, counting the bytes that came on it since the
    pool last handed it out: whether an answer had begun is all that tells a reset after
    part of one from a reset before any (aiohttp reports both as ECONNRESET)."""

    __slots__ = ("handed_out_at", "idle_for", "last_received", "received")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.received = 0
        # When its last byte came (time.monotonic), and how long it had then sat idle when
        # the pool last handed it out: a reset is taken for the idle-close race only after
        # a wait an upstream's idle timer could have ended (exchange.py).
        self.last_received = time.monotonic()
        self.idle_for = 0.0
        self.handed_out_at = 0.0  # when the pool last handed it out kept alive (time.monotonic)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.last_received = time.monotonic()
        super().data_received(data)


# Set by the connector in the calling task: the protocol of the connection it last handed
# out, if that was a kept-alive one; None for a new one.
HANDED_OUT: ContextVar[CountingHandler | None] = ContextVar("upstream_connection_handed_out", default=None)


class ConnectTimedOut(Exception):
    """No connection opened within the attempt's connect timeout (a host gone, a firewall
    dropping what is sent to it). Not a TimeoutError: aiohttp would take it for its own
    connect timeout, and failures.py for the attempt's budget running out."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no connection within {seconds:g} s")
        self.seconds = seconds


class Phase(enum.Enum):
    """Where an attempt is: what a timeout cut short."""

    POOL = "waiting for a free connection of the pool"
    CONNECT = "opening a connection"  # TCP, TLS, a proxy's tunnel
    EXCHANGE = "sending the request and reading the answer"


# Set by the connector in the calling task: where the attempt is (what a timeout cut short).
PHASE: ContextVar[Phase] = ContextVar("upstream_connection_phase", default=Phase.EXCHANGE)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's pool, telling the calling task (HANDED_OUT) whether its connection was
    reused and (PHASE) whether it is waiting for one or opening one, and never handing
    out an idle connection that has unread bytes waiting. A call that gives up waiting
    passes a free connection on; one still waiting when the pool closes fails, not
    cancelled."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._seen: weakref.WeakSet[object] = weakref.WeakSet()
        # aiohttp makes each connection's protocol (a TLS one in a proxy's tunnel too) with
        # this private attribute: without a CountingHandler nothing is resent, and
        # tests/integration/test_upstream_pool.py's idle-close race test fails. Made as the
        # TCP connect is established, it marks that for the attempt (_connected_protocol).
        # (The cast: partial is invariant in what it makes.)
        self._factory = cast(
            "functools.partial[ResponseHandler]", functools.partial(_connected_protocol, loop=self._loop)
        )

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Connection:
        # An idle connection comes at once; else this is a wait for a free one, unless
        # there is room to open one (_create_connection).
        PHASE.set(Phase.POOL)
        try:
            connection = await super().connect(req, traces, timeout)
        except BaseException as exc:
            self._pass_on_a_free_slot()
            if isinstance(exc, asyncio.CancelledError) and self.closed and not _cancelled():
                # Closing the session (a reload's grace ran out) cancels the waits for a
                # free connection, not the calls: a bare CancelledError would end each one
                # with no status for its caller. A closed transport fails the call, as it
                # fails the calls it cut off mid-exchange.
                raise aiohttp.ClientConnectionError("the upstream transport was closed") from None
            raise
        try:
            _pool_wait_over()
        except TimeoutError:
            connection.release()  # nothing was sent on it: the next call may have it
            raise
        PHASE.set(Phase.EXCHANGE)
        protocol = connection.protocol
        if protocol is not None:
            if protocol in self._seen:
                if protocol.should_close:
                    # Bytes came while it was idle (a 408, say): they would be read as the
                    # answer to the next request. Not reusable: take another.
                    connection.close()
                    return await self.connect(req, traces, timeout)
                if isinstance(protocol, CountingHandler):
                    now = time.monotonic()
                    protocol.received = 0
                    protocol.idle_for = now - protocol.last_received
                    protocol.handed_out_at = now
                    HANDED_OUT.set(protocol)
            else:
                self._seen.add(protocol)
        return connection

    def _pass_on_a_free_slot(self) -> None:
        """Wake the next call waiting for a connection, if one is free: this call gives up.

        aiohttp wakes one waiter per connection given back; a waiter woken and then
        cancelled (its caller hung up, its deadline fired) before it ran takes the wake-up
        with it, and the next waiter would wait out its whole budget beside an idle
        connection. aiohttp offers nothing public for this: _release_waiter is what its
        own release calls, and wakes a waiter only while a slot is free (a woken waiter
        finding none waits again, first in line). tests/integration/test_upstream_pool.py's
        lost wake-up test fails if it moves."""
        self._release_waiter()

    async def _wait_for_available_connection(self, key: ConnectionKey, traces: list[Trace]) -> None:
        # aiohttp's own (private) wait for a free slot of the pool, its only wait for one (an
        # idle connection, or room for a new one, comes without it): marked for the attempt,
        # as a connection had with too little time left is then our full pool's doing, else
        # the caller's deadline (failures.py). tests/integration/test_upstream_pool.py's tests
        # of a call left almost no time fail if it moves.
        budget = ATTEMPT.get()
        if budget is not None:
            budget.pool_waited = True
        await super()._wait_for_available_connection(key, traces)

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> ResponseHandler:
        # aiohttp's own (private) step that opens a new connection: the socket, TLS, a
        # proxy's tunnel. tests/unit/test_transport.py's connect timeout fails if it moves.
        _pool_wait_over()  # there is room for a new connection: the wait is over
        PHASE.set(Phase.CONNECT)
        budget = ATTEMPT.get()
        if budget is None or budget.connect_timeout is None:
            return await super()._create_connection(req, traces, timeout)
        # Within the attempt's own timer: whichever ends first cuts the connect (the
        # attempt's, as before: a TimeoutError of the attempt).
        connect = asyncio.timeout(budget.connect_timeout)
        try:
            async with connect:
                return await super()._create_connection(req, traces, timeout)
        except TimeoutError:
            if connect.expired():
                raise ConnectTimedOut(budget.connect_timeout) from None
            raise

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        # aiohttp's own (private) name lookup of the upstream's host (or its proxy's), in the
        # calling task just before the TCP connect: that connect's silence starts now
        # (budget.py), not a slow lookup's. Without it no connect cut by a deadline would
        # count as unreachable: tests/unit/test_transport.py's black hole tests fail if it moves.
        hosts = await super()._resolve_host(host, port, traces)
        budget = ATTEMPT.get()
        if budget is not None:
            budget.connecting_since, budget.connected = time.monotonic(), False
        return hosts


def _connected_protocol(loop: asyncio.AbstractEventLoop) -> CountingHandler:
    """A new connection's protocol. asyncio makes it in the calling task as soon as the TCP
    connect is established (before any TLS handshake, or a proxy's CONNECT on it): the
    upstream, or its proxy, has answered (budget.py)."""
    budget = ATTEMPT.get()
    if budget is not None:
        budget.connected = True
    return CountingHandler(loop)


def _pool_wait_over() -> None:
    """The calling attempt has a connection, or room to open one: its timer is set anew
    (budget.py); TimeoutError, still waiting for the pool (PHASE), if too little is left."""
    budget = ATTEMPT.get()
    if budget is not None:
        budget.connection_had()


def _cancelled() -> bool:
    """Whether the running task itself is being cancelled (its caller, or its own timeout),
    rather than a future it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(frozen=True, slots=True)
class Route:
    """Where each request goes first: None, straight to the upstream; else this proxy."""

    proxy: URL | None = None
    # Proxy-Authorization, when the proxy URL had credentials: on the CONNECT that opens a
    # tunnel to an https upstream; with each request forwarded to a plain http one.
    proxy_headers: dict[str, str] | None = None
    forward_headers: dict[str, str] | None = None


def check_connection_settings(base_url: str, proxy: str | None, ca_file: Path | None) -> None:
    """ConfigError, naming the setting, if `ca_file` or the proxy that applies is unusable."""
    upstream_ssl_context(ca_file)
    proxy_for(httpx.URL(base_url), proxy)


def route_to(base_url: str, proxy: str | None) -> Route:
    """The route for calls to `base_url`; ConfigError for a bad proxy URL."""
    found = proxy_for(httpx.URL(base_url), proxy)
    if found is None:
        return Route()
    # httpx.Proxy has taken any user:password out of the URL (into `auth`).
    headers = dict(found.headers)
    if found.auth is not None:
        user, password = found.auth
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Proxy-Authorization"] = f"Basic {credentials}"
    tunnelled = URL(base_url).scheme == "https"
    if not headers:
        return Route(URL(str(found.url)))
    return Route(URL(str(found.url)), headers if tunnelled else None, None if tunnelled else headers)


def open_session(
    max_connections: int,
    ssl_context: ssl.SSLContext,
    keepalive_expiry: float = KEEPALIVE_EXPIRY,
) -> aiohttp.ClientSession:
    """A session with its own pool of at most `max_connections`, each idle one closed within
    `keepalive_expiry` seconds; must run inside the event loop.

    Bodies come as they are on the wire (body.py decodes gzip within its size bound), and
    nothing is read from the environment here: proxies.py has settled the route already."""
    ssl_context.set_alpn_protocols(["http/1.1"])
    connector = _Connector(
        limit=max_connections,
        keepalive_timeout=keepalive_expiry / 2,  # the sweep's period: KEEPALIVE_EXPIRY says why
        # aiohttp rounds a timer of 5 s or more up to a whole second of the loop's clock:
        # the sweep would come up to a second past the bound.
        timeout_ceil_threshold=math.inf,
        ssl=ssl_context,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
        # One session carries every caller's calls: a cookie an answer sets is never sent
        # on (the next call may be another caller's), and none is parsed or kept.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Each attempt, pool wait and connect included, is bounded by its own budget
        # (asyncio.timeout in transport.py), not by aiohttp's five-minute default.
        timeout=aiohttp.ClientTimeout(total=None),
    )
