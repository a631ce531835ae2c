"""A real RerankServer on a loopback port, run on its own event loop in a thread.

Tests then call it with ordinary blocking gRPC stubs, exactly as a client would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from rerank.v1 import rerank_pb2_grpc

from rerank_service.config import Settings
from rerank_service.core.backend import Backend
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing import CallTracer
from rerank_service.server import RerankServer
from tests.support.waiting import wait_until

T = TypeVar("T")


class ServerThread:
    """`with ServerThread(settings) as server:` gives a started server and a stub.

    `metrics`: where the server records (a given `backend` records where it was told);
    None: a Metrics of the server's own. `tracer`: the calls' spans go to it (None: off)."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend | None = None,
        start: bool = True,
        metrics: Metrics | None = None,
        tracer: CallTracer | None = None,
    ) -> None:
        self.settings = dataclasses.replace(settings, host="127.0.0.1", port=0)
        self._backend = backend
        self._metrics = metrics
        self._tracer = tracer
        self._start = start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rerank-server", daemon=True)
        self.server: RerankServer | None = None
        self.channel: grpc.Channel | None = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return self.begin(coroutine).result(timeout)

    def begin(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the server's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    @property
    def target(self) -> str:
        assert self.server is not None
        assert self.server.port is not None
        return f"127.0.0.1:{self.server.port}"

    @property
    def stub(self) -> rerank_pb2_grpc.RerankServiceStub:
        assert self.channel is not None
        return rerank_pb2_grpc.RerankServiceStub(self.channel)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.server = self.run(self._create())
        if self._start:
            self.run(self.server.start())
            self.connect()
        return self

    def start_until_listening(self) -> concurrent.futures.Future[int]:
        """Start the server by hand and return once its port is open, start() still running.

        For looking at the server while its backend starts (health, refused calls).
        """
        assert self.server is not None
        starting = self.begin(self.server.start())
        server = self.server
        wait_until(lambda: server.port is not None, timeout=5, what="the server's port open")
        self.connect()
        assert self.channel is not None
        # The port is bound a moment before the server answers on it.
        grpc.channel_ready_future(self.channel).result(timeout=5)
        return starting

    def connect(self) -> None:
        """Open the test's client channel (once the port is known)."""
        self.channel = grpc.insecure_channel(self.target)

    async def _create(self) -> RerankServer:
        return RerankServer(self.settings, self._backend, metrics=self._metrics, tracer=self._tracer)

    def __exit__(self, *exc: object) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None and self.server.port is not None:
            self.run(self.server.stop(grace=1))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
