"""The HTTP listener: aiohttp on the gRPC server's event loop, with the same TLS and drain.

Every connection holds a file descriptor until it closes (an idle keep-alive one for
--http-keepalive-timeout), so the listener caps them, in all and per peer address, and
closes a connection over a cap as soon as it is accepted, before anything is read.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import cast

from aiohttp import hdrs, web

from rerank_service.api.http.app import SERVER_NAME, FrontDoor
from rerank_service.config.server import HttpConfig, TlsConfig
from rerank_service.config.tls_files import TlsFiles
from rerank_service.observability.logging import CALLER_LOG_INTERVAL, RateLimit, get_logger
from rerank_service.observability.process_limits import file_limit, log_accept_errors_sparingly

_log = get_logger("rerank_service.api.http")

# The listen queue's length, and so the connections asyncio accepts per wake-up before any
# of them reaches the gate: it bounds the descriptors a burst of connections holds at once.
ACCEPT_BATCH = 128


# How often the HTTP port looks whether its TLS files changed on disk (a renewed certificate).
TLS_CHECK_SECONDS = 10.0


def ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The same TLS as the gRPC port: its certificate and key, and mTLS with its client CA."""
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:
        _trust_client_ca(context, tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _trust_client_ca(context: ssl.SSLContext, client_ca: Path) -> None:
    """Trust the client CA file's certificates, each as the end of a chain, as gRPC does:
    an intermediate CA given alone (cert-manager's ca.crt of a CA issuer backed by one)
    verifies its clients. Without VERIFY_X509_PARTIAL_CHAIN, OpenSSL looks for a self-signed
    root above it and refuses every client ("unable to get issuer certificate")."""
    context.load_verify_locations(client_ca)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


async def keep_renewed(context: ssl.SSLContext, tls: TlsConfig, every: float) -> None:
    """Load the TLS files into `context` again whenever they change (checked every `every`
    seconds): the listener keeps its context, and each new connection's handshake takes the
    certificate loaded last. A client CA read again is added to those trusted (OpenSSL keeps
    a context's trusted CAs until it is dropped: a removed one stays until a restart)."""
    cert, key, client_ca = tls.cert, tls.key, tls.client_ca
    if cert is None or key is None:
        return
    files = TlsFiles(tls, port="http")
    pending = False  # checked, not loaded: changed again in between
    while True:
        await asyncio.sleep(every)
        if files.renewed() is None and not pending:
            continue
        try:
            context.load_cert_chain(cert, key)
            if client_ca is not None:
                _trust_client_ca(context, client_ca)
            pending = False
        except (ssl.SSLError, OSError) as exc:  # the next look loads them again
            pending = True
            _log.warning("tls files not loaded into the http port", error=type(exc).__name__)


class ConnectionGate:
    """The HTTP port's connection caps: in all, and per peer address."""

    def __init__(self, max_open: int, max_per_peer: int) -> None:
        self.max_open = max_open
        self.max_per_peer = max_per_peer
        self.open = 0
        self._by_peer: dict[str, int] = {}
        self._refusals = RateLimit(CALLER_LOG_INTERVAL)
        self.handshakes: set[asyncio.Task[None]] = set()  # TLS handshakes of admitted connections

    def close_handshakes(self) -> None:
        """Close the connections still in their TLS handshake (the port is closing)."""
        for handshake in list(self.handshakes):
            handshake.cancel()

    def admit(self, peer: str) -> bool:
        """Count a new connection from `peer` in, or say no (and log it, sparingly)."""
        held = self._by_peer.get(peer, 0)
        if self.open >= self.max_open:
            self._refused(peer, f"{self.max_open} connections open (--http-max-connections)")
            return False
        if held >= self.max_per_peer:
            self._refused(peer, f"{held} connections open from it (--max-connections-per-peer)")
            return False
        self._by_peer[peer] = held + 1
        self.open += 1
        return True

    def leave(self, peer: str) -> None:
        held = self._by_peer[peer] - 1
        if held:
            self._by_peer[peer] = held
        else:
            del self._by_peer[peer]
        self.open -= 1

    def protocol_factory(
        self, handlers: Callable[[], asyncio.Protocol], tls: ssl.SSLContext | None, handshake_timeout: float
    ) -> Callable[[], asyncio.Protocol]:
        """What the listener calls per accepted connection: a gate in front of aiohttp's
        handler, and of the TLS handshake (`tls`: the port's context, None for plain HTTP)."""
        return lambda: _GatedConnection(self, handlers, tls, handshake_timeout)

    def _refused(self, peer: str, why: str) -> None:
        left_out = self._refusals.allow(why.partition(" ")[2])
        if left_out is not None:
            _log.warning("http connection refused", peer=peer, why=why, left_out=left_out)


class _QuietRequestHandler(web.RequestHandler):
    """aiohttp's handler, whose answer to a request it cannot parse (a 400 before any route
    runs) says only its status: aiohttp's own repeats the offending line, which is as
    often as not the Authorization header with its key (its log line is cleaned on the way,
    observability/logging.py; a body goes to the sender, and to any proxy that logs it).
    It names the server as routed answers do, not by aiohttp's and Python's versions."""

    __slots__ = ()  # nothing of its own: aiohttp's handlers become one (_quiet_handlers)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        try:
            said = f"{status} {HTTPStatus(status).phrase}"
        except ValueError:  # a status http.HTTPStatus does not name
            said = str(status)
        response = super().handle_error(request, status, exc, said)
        # No route runs for it, so the application's on_response_prepare (app.py) does not.
        response.headers["Server"] = SERVER_NAME
        return response


def _quiet_handlers(server: web.Server) -> Callable[[], asyncio.Protocol]:
    """`server`'s handler for each connection, made quiet. aiohttp makes each one itself,
    with its own arguments (web.Server.__call__): its class is changed afterwards, which
    the empty __slots__ above allows, rather than made here from aiohttp's private fields."""

    def handler() -> asyncio.Protocol:
        made = server()
        made.__class__ = _QuietRequestHandler
        return made

    return handler


class _GatedConnection(asyncio.Protocol):
    """One accepted connection: closed at once over a cap, else (over TLS, once its handshake
    is done) aiohttp's handler, made only then, takes it, and the transport's every event
    goes to it. A TLS connection is counted from its accept, not from the end of its
    handshake: one that never ends its handshake holds a descriptor all the same."""

    __slots__ = (
        "_early",
        "_early_eof",
        "_gate",
        "_handler",
        "_handlers",
        "_handshake_timeout",
        "_peer",
        "_tls",
    )

    def __init__(
        self,
        gate: ConnectionGate,
        handlers: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        self._gate = gate
        self._handlers = handlers
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self._handler: asyncio.Protocol | None = None
        self._peer: str | None = None
        # Over TLS, what arrives after the handshake and before the handler is made.
        self._early: list[bytes] | None = [] if tls is not None else None
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)
        if not self._gate.admit(peer):
            cast(asyncio.Transport, transport).abort()  # at once, unread: its descriptor is free now
            return
        self._peer = peer
        if self._tls is None:
            self._serve(transport)
            return
        handshake = asyncio.get_running_loop().create_task(
            self._secure(cast(asyncio.Transport, transport), self._tls)
        )
        self._gate.handshakes.add(handshake)
        handshake.add_done_callback(self._gate.handshakes.discard)

    async def _secure(self, transport: asyncio.Transport, tls: ssl.SSLContext) -> None:
        """The TLS handshake on the admitted connection, then aiohttp's handler on it; a
        handshake that fails or runs past the timeout closes it (and it leaves the count)."""
        try:
            secured = await asyncio.get_running_loop().start_tls(
                transport, self, tls, server_side=True, ssl_handshake_timeout=self._handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
            self._left()  # start_tls has closed the connection
            return
        if secured is None or self._peer is None:  # closed as the handshake ended, or since
            self._left()
            return
        self._serve(secured)

    def _serve(self, transport: asyncio.BaseTransport) -> None:
        handler = self._handlers()
        self._handler = handler
        handler.connection_made(transport)
        # What came between the handshake's end and this task's turn (a client sends its
        # request at once): the handler's now, in order.
        early, self._early = self._early or [], None
        for data in early:
            handler.data_received(data)
        if self._early_eof:
            handler.eof_received()

    def _left(self) -> None:
        if self._peer is not None:
            self._gate.leave(self._peer)
            self._peer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._left()
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
        elif self._early is not None:  # the handshake ended, the handler is not made yet
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            self._early_eof = True
            return None
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


class _GatedSite(web.BaseSite):
    """aiohttp's TCPSite, with the connection gate in front of its handlers."""

    __slots__ = ("_gate", "_handshake_timeout", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        gate: ConnectionGate,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        reuse_port: bool,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=ACCEPT_BATCH)
        self._host = host
        self._port = port
        self._gate = gate
        self._handshake_timeout = handshake_timeout
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        handlers = _quiet_handlers(server)
        self._server = await asyncio.get_running_loop().create_server(
            # TLS is the gate's to start, once a connection is admitted: asyncio's own would
            # hand the gate only connections whose handshake has ended. A handshake must not
            # take longer than an idle connection may stay (asyncio's default is 60 s).
            self._gate.protocol_factory(handlers, self._ssl_context, self._handshake_timeout),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )


class HttpServer:
    """`start` listens on `--http-port`; `stop` drains like the gRPC server does."""

    def __init__(
        self,
        front_door: FrontDoor,
        config: HttpConfig,
        tls: TlsConfig,
        *,
        shutdown_grace: float,
        reuse_port: bool = False,
    ) -> None:
        self._front_door = front_door
        self._reuse_port = reuse_port  # a worker: the port is shared with the others (SO_REUSEPORT)
        self._config = config
        self._tls = tls
        self._shutdown_grace = shutdown_grace
        self._runner: web.AppRunner | None = None
        self._draining = False
        self._renewing: asyncio.Task[None] | None = None  # keep_renewed, with TLS
        self.port: int | None = None
        self.gate: ConnectionGate | None = None

    async def start(self) -> int:
        assert self._config.port is not None
        application = self._front_door.application()
        application.on_response_prepare.append(self._close_when_draining)
        self._runner = web.AppRunner(
            application,
            handle_signals=False,  # the gRPC server's loop owns SIGTERM and SIGINT
            access_log=None,  # the front door logs each call itself, once
            shutdown_timeout=self._shutdown_grace,
            keepalive_timeout=self._config.keepalive_timeout,
            # Bodies are read as sent: a compressed one is refused (415), never inflated.
            auto_decompress=False,
            # A client that hangs up (its own timeout, say) cancels its call, as over gRPC: the
            # upstream call stops and the slot is given back, not held until the answer nobody reads.
            handler_cancellation=True,
        )
        await self._runner.setup()
        log_accept_errors_sparingly(asyncio.get_running_loop())
        tls = ssl_context(self._tls)
        gate = ConnectionGate(connection_cap(self._config), self._config.max_connections_per_peer)
        self.gate = gate
        site = _GatedSite(
            self._runner,
            self._config.host,
            self._config.port,
            gate,
            ssl_context=tls,
            handshake_timeout=self._config.keepalive_timeout,
            reuse_port=self._reuse_port,
        )
        await site.start()
        if tls is not None:
            self._renewing = asyncio.get_running_loop().create_task(
                keep_renewed(tls, self._tls, TLS_CHECK_SECONDS), name="http-tls-renewal"
            )
        # aiohttp says where it listens only through its server's sockets (port 0 picks one).
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self._config.port
        _log.info(
            "http listening",
            port=self.port,
            tls=tls is not None,
            max_connections=gate.max_open,
            max_connections_per_peer=gate.max_per_peer,
        )
        return self.port

    async def _close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        # Draining, the connection is closed once its call is answered: said in the answer,
        # a client opens a new connection for its next call (elsewhere, once this process is
        # out of the load balancer) instead of sending it down one about to close, where a
        # POST, which clients do not resend, would fail with a broken pipe.
        if self._draining:
            response.force_close()
            # aiohttp writes its Connection header before this hook runs: set here too.
            response.headers[hdrs.CONNECTION] = "close"

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let requests in flight finish within `grace` seconds (None:
        --shutdown-grace), close. From now on every answer says `Connection: close`."""
        self._draining = True
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None
        if self.gate is not None:
            self.gate.close_handshakes()
        runner = self._runner
        if runner is None:
            return
        # aiohttp's cleanup waits shutdown_timeout for a request in flight, then only marks
        # it cancelled (a handler waiting on the upstream goes on) and waits as long again:
        # a call outlasting the grace held the drain for twice the grace. At the grace the
        # connections still busy are closed instead, which cancels their handlers
        # (handler_cancellation), as grpc cancels its calls at the grace; each cancelled
        # call is logged and metered before the cleanup ends.
        cleanup = asyncio.ensure_future(runner.cleanup())
        done, _ = await asyncio.wait((cleanup,), timeout=self._shutdown_grace if grace is None else grace)
        if not done and runner.server is not None:
            for connection in runner.server.connections:
                connection.force_close()
        await cleanup
        self._runner = None


def connection_cap(config: HttpConfig) -> int:
    """--http-max-connections, lowered to half the open-file limit: HTTP connections alone
    then never take the descriptors gRPC, upstream calls and the process itself need."""
    limit = file_limit()
    if limit is None or config.max_connections <= limit // 2:
        return config.max_connections
    lowered = max(1, limit // 2)
    _log.warning(
        "http connection cap lowered",
        http_max_connections=config.max_connections,
        to=lowered,
        file_limit=limit,
        why="at most half the open-file limit",
    )
    return lowered
