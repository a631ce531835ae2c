"""Server lifecycle: build, start, health that follows the backend, graceful drain."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.auth import KeyChecker
from rerank_service.backends import build_backend
from rerank_service.backends.base import Backend
from rerank_service.config import Settings
from rerank_service.engine import RerankEngine
from rerank_service.interceptors import AccessLogInterceptor, AuthInterceptor
from rerank_service.logging import get_logger
from rerank_service.reflection import enable_reflection
from rerank_service.servicer import RerankServicer

RERANK_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name
# "" is the whole server's status, as probes ask for it by default.
HEALTH_SERVICES = ("", RERANK_SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_log = get_logger("rerank_service.server")


class BackendStartError(RuntimeError):
    """The backend could not be started; the message says why."""


class RerankServer:
    """One gRPC server: RerankService, health and reflection on one port."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or build_backend(settings)
        self.engine = RerankEngine(self.backend, chunk_concurrency=settings.chunk_concurrency)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        interceptors: list[grpc.aio.ServerInterceptor] = [AccessLogInterceptor()]
        checker = KeyChecker(settings.api_keys)
        if checker.enabled:
            interceptors.append(AuthInterceptor(checker))
        self._server = grpc.aio.server(interceptors=interceptors)
        rerank_pb2_grpc.add_RerankServiceServicer_to_server(
            RerankServicer(self.engine, stream_concurrency=settings.stream_concurrency), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection(
            self._server, (RERANK_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        )

    async def start(self) -> int:
        """Open the port (health NOT_SERVING), start the backend, then report SERVING."""
        address = f"{self.settings.host}:{self.settings.port}"
        if ":" in self.settings.host and not self.settings.host.startswith("["):
            address = f"[{self.settings.host}]:{self.settings.port}"
        self.port = self._server.add_insecure_port(address)
        for service in HEALTH_SERVICES:
            await self.health.set(service, _NOT_SERVING)
        await self._server.start()
        _log.info(
            "listening",
            host=self.settings.host,
            port=self.port,
            backend=self.settings.backend,
            auth=_auth_mode(self.settings),
            models=[model.name for model in self.engine.models()],
        )
        try:
            await self.backend.start()
        except Exception as exc:
            await self._server.stop(0)
            raise BackendStartError(f"the {self.settings.backend} backend failed to start: {exc}") from exc
        if self.backend.ready:
            for service in HEALTH_SERVICES:
                await self.health.set(service, _SERVING)
        _log.info("serving", port=self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish within `grace`."""
        grace = self.settings.shutdown_grace if grace is None else grace
        _log.info("draining", grace_s=grace)
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self.backend.close()
        _log.info("stopped")


def _auth_mode(settings: Settings) -> str:
    if settings.api_keys:
        return "api-keys"
    if settings.pass_through:
        return "pass-through"
    return "open"


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain; the process's exit code."""
    server = RerankServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
    except BackendStartError as exc:
        _log.error("start failed", error=str(exc))
        return 1
    await stop.wait()
    await server.stop()
    return 0
