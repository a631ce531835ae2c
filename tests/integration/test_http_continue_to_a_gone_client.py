"""A client that resets its connection after sending `Expect: 100-continue` headers: the
`100 Continue` cannot be written ("Cannot write to closing transport"). Its call is one whose
client left, logged and counted CANCELLED (HTTP.md, Limits), as one gone while sending its
body is: it was taken for a bug of the service (an error-level line with a traceback and
INTERNAL, when every slot was taken and it could wait for one), or escaped the route
(aiohttp's error-level "Error handling request", no access line, no metrics).

The expect handler is held until the server has seen the reset (its transport closing):
the write then always meets a closing transport, whatever the timing of the reset."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from contextlib import closing

import grpc
import pytest
from aiohttp import web
from rerank.v1 import rerank_pb2

from rerank_service.api.http.app import FrontDoor
from rerank_service.config.secret import Secret
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import ServerFactory
from tests.integration.test_http_abuse import COHERE, connect, http_port, request_head
from tests.support.logs import LogCapture
from tests.support.rpc import request
from tests.support.waiting import wait_until, wait_until_async

FLOOD_KEY = "key-flood-aaaaaaaaaaaa"
POLITE_KEY = "key-polite-bbbbbbbbbbb"
SLOTS = 4

Expect = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _hold_expect_until_the_client_is_gone(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Each route's expect handler first waits for its connection to be closing (the event
    returned is set once one is waiting, its request's headers read). It polls
    with `sleep(0)`: it runs again before the loop calls `connection_lost` (scheduled when
    the transport began closing), which would cancel it, so the real handler then writes
    to a transport that is closing, as it did when the reset came in between."""
    original = FrontDoor._expect
    waiting = threading.Event()

    def expect_when_gone(self: FrontDoor, handle: Callable[[web.Request], Awaitable[web.Response]]) -> Expect:
        expect = original(self, handle)

        async def held(http: web.Request) -> web.StreamResponse | None:
            def gone() -> bool:
                return http.transport is None or http.transport.is_closing()

            waiting.set()
            await wait_until_async(gone, interval=0, what="the server seeing the client's reset")
            return await expect(http)

        return held

    monkeypatch.setattr(FrontDoor, "_expect", expect_when_gone)
    return waiting


def _reset(sock: socket.socket) -> None:
    """Closes `sock` with a TCP reset (SO_LINGER 0), as a client that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("flooded", [False, True], ids=["accepted", "held-back-may-wait"])
def test_a_client_that_resets_after_expect_100_continue_is_logged_cancelled_not_a_bug(
    serve: ServerFactory,
    upstream: FakeUpstream,
    logs: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
    flooded: bool,
) -> None:
    waiting = _hold_expect_until_the_client_is_gone(monkeypatch)
    upstream.always(Fault(delay=NEVER))  # the flood's calls hold their slots
    keys = (Secret(FLOOD_KEY), Secret(POLITE_KEY))
    with serve(http_port=0, api_keys=keys, max_concurrent_requests=SLOTS) as server:
        assert server.server is not None
        flood: list[grpc.Future[rerank_pb2.RerankResponse]] = []
        if flooded:  # every slot taken by one caller: the other's call may wait for one
            flood = [
                server.stub.Rerank.future(
                    request(), metadata=(("authorization", f"Bearer {FLOOD_KEY}"),), timeout=60
                )
                for _ in range(SLOTS)
            ]
            wait_until(lambda: upstream.in_flight == SLOTS, what="every slot held by the flood")
        port = http_port(server)
        auth = f"Authorization: Bearer {POLITE_KEY}\r\nExpect: 100-continue\r\n"
        with closing(connect(port)) as sock:
            sock.sendall(request_head(port, COHERE, 60, auth))
            assert waiting.wait(10), "the expect handler never ran"  # the reset comes after the headers
            _reset(sock)
            calls = logs.wait_for_calls(1)  # the flood's calls are still held
        cancelled = server.server.metrics.registry.get_sample_value(
            "rerank_calls_total", {"method": f"HTTP {COHERE}", "code": "CANCELLED"}
        )
        for held in flood:
            held.cancel()

    assert [(call["method"], call["code"]) for call in calls] == [(f"HTTP POST {COHERE}", "CANCELLED")]
    assert cancelled == 1
    assert not [event for event in logs.events() if event.get("level") == "error"]
