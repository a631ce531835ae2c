"""The HTTP listener: aiohttp on the gRPC server's event loop, with the same TLS and drain."""

from __future__ import annotations

import ssl

from aiohttp import web

from rerank_service.config import Settings
from rerank_service.http.app import FrontDoor
from rerank_service.observability.logging import get_logger

_log = get_logger("rerank_service.http")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The same TLS as the gRPC port: its certificate and key, and mTLS with its client CA."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpServer:
    """`start` listens on `--http-port`; `stop` drains like the gRPC server does."""

    def __init__(self, front_door: FrontDoor, settings: Settings, *, reuse_port: bool = False) -> None:
        self._front_door = front_door
        self._reuse_port = reuse_port  # a worker: the port is shared with the others (SO_REUSEPORT)
        self._settings = settings
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> int:
        assert self._settings.http_port is not None
        self._runner = web.AppRunner(
            self._front_door.application(),
            handle_signals=False,  # the gRPC server's loop owns SIGTERM and SIGINT
            access_log=None,  # the front door logs each call itself, once
            shutdown_timeout=self._settings.shutdown_grace,
            keepalive_timeout=self._settings.http_keepalive_timeout,
        )
        await self._runner.setup()
        tls = ssl_context(self._settings)
        site = web.TCPSite(
            self._runner,
            self._settings.host,
            self._settings.http_port,
            ssl_context=tls,
            backlog=1024,
            reuse_port=self._reuse_port or None,
        )
        await site.start()
        # aiohttp says where it listens only through its server's sockets (port 0 picks one).
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self._settings.http_port
        _log.info("http listening", port=self.port, tls=tls is not None)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within --shutdown-grace, close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
