"""A drain lasts at most --shutdown-grace, and only as long as calls are in flight.

A live server in front of the fake upstream. An HTTP call outlasting the grace is cut at
the grace, as a gRPC call is (aiohttp alone waited the grace twice over, then dropped it
all the same); a health Watch (client-side health checking) or an idle reflection stream
sees the drain begin and ends, rather than hold it for the whole grace.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rerank_service.api.grpc.server import RERANK_SERVICE
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import ServerFactory
from tests.support.logs import LogCapture
from tests.support.rpc import request
from tests.support.waiting import wait_until

GRACE = 4.0
Status = health_pb2.HealthCheckResponse.ServingStatus


def test_an_http_call_outlasting_the_grace_is_cut_at_the_grace_as_a_grpc_call_is(
    serve: ServerFactory, upstream: FakeUpstream, logs: LogCapture, tmp_path: Path
) -> None:
    usage = tmp_path / "usage.jsonl"
    upstream.always(Fault(delay=NEVER))
    settings: dict[str, Any] = {"http_port": 0, "shutdown_grace": GRACE, "usage_log": str(usage)}
    # Neither the upstream's timeout nor the HTTP call's (60 s by default) ends them first.
    settings.update(upstream_timeout=600.0, upstream_max_attempts=1, http_call_timeout=600.0)
    with serve(**settings) as server, ThreadPoolExecutor(2) as pool:
        assert server.server is not None
        assert server.server.http is not None
        url = f"http://127.0.0.1:{server.server.http.port}/v1/rerank"
        body = {"model": "qwen3-rerank", "query": "q", "documents": ["a", "b"]}
        http_call = pool.submit(httpx.post, url, json=body, timeout=120)
        grpc_call = pool.submit(server.stub.Rerank, request(), timeout=120)
        wait_until(lambda: upstream.in_flight == 2, what="both calls waiting on the upstream")

        began = time.monotonic()
        server.run(server.server.stop(), timeout=4 * GRACE)
        took = time.monotonic() - began
        server.server.port = None  # stopped: the fixture need not stop it again

        http_error = http_call.exception(timeout=10)
        grpc_error = grpc_call.exception(timeout=10)

    # The calls had their grace, and the drain ended with it (not at twice the grace).
    assert GRACE <= took < 2 * GRACE - 1, took
    assert isinstance(grpc_error, grpc.RpcError)
    assert grpc_error.code() == grpc.StatusCode.UNAVAILABLE
    assert isinstance(http_error, httpx.RemoteProtocolError)  # its connection closed, no answer
    # Each call cut is logged and metered, both doors alike.
    cut = {event["method"]: event["code"] for event in logs.calls()}
    assert cut == {"/rerank.v1.RerankService/Rerank": "CANCELLED", "HTTP POST /v1/rerank": "CANCELLED"}
    metered = [json.loads(line) for line in usage.read_text().splitlines()]
    assert sorted((line["method"], line["code"]) for line in metered) == [
        ("/rerank.v1.RerankService/Rerank", "CANCELLED"),
        ("HTTP POST /v1/rerank", "CANCELLED"),
    ]


class _Watch:
    """A health Watch read in a thread: the statuses it was sent, then how it ended."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.statuses: list[str] = []
        self.ended: str | None = None
        self._stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=300
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for answer in self._stream:
                self.statuses.append(Status.Name(answer.status))
        except grpc.RpcError as error:
            self.ended = error.code().name
        else:
            self.ended = "OK"


class _Reflection:
    """A reflection stream that asks once, then stays open, asking nothing more."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.answers = 0
        self.ended: str | None = None
        self.done_asking = threading.Event()
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self._stream = stub.ServerReflectionInfo(self._requests(), timeout=300)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        self.done_asking.wait()  # the stream stays open until the test ends

    def _read(self) -> None:
        try:
            for _ in self._stream:
                self.answers += 1
        except grpc.RpcError as error:
            self.ended = error.code().name
        else:
            self.ended = "OK"


def test_health_watches_see_not_serving_then_end_and_streams_never_hold_the_drain(
    serve: ServerFactory,
) -> None:
    grace = 120.0  # a drain that waited for the streams would take all of it
    with serve(shutdown_grace=grace) as server:
        assert server.server is not None
        with grpc.insecure_channel(server.target) as channel:
            watches = {service: _Watch(channel, service) for service in ("", RERANK_SERVICE, "no.Such")}
            reflection = _Reflection(channel)
            try:
                wait_until(
                    lambda: all(watch.statuses for watch in watches.values()) and reflection.answers == 1,
                    what="each stream's first answer",
                )
                stopping = server.begin(server.server.stop())
                # Nothing is in flight: the drain ends at once, not at the grace.
                stopping.result(timeout=grace / 4)
                server.server.port = None  # stopped: the fixture need not stop it again
                wait_until(
                    lambda: reflection.ended is not None and all(w.ended for w in watches.values()),
                    what="every stream ended",
                )
            finally:
                reflection.done_asking.set()

    # Each watcher was sent the drain's NOT_SERVING before its stream ended.
    assert {service: (watch.statuses, watch.ended) for service, watch in watches.items()} == {
        "": (["SERVING", "NOT_SERVING"], "UNAVAILABLE"),
        RERANK_SERVICE: (["SERVING", "NOT_SERVING"], "UNAVAILABLE"),
        "no.Such": (["SERVICE_UNKNOWN"], "UNAVAILABLE"),
    }
    assert reflection.ended == "UNAVAILABLE"
