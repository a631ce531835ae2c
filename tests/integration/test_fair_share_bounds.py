"""One caller with a valid key cannot push the others out through the bounds besides the
call slots (TENANTS.md § Fair share under a flood): HTTP bodies declared and never sent,
silent RerankStreams, and a RerankStream's items running at once. Each held the others out:
the byte budget or --max-open-calls filled, or the upstream flooded past the caller's share.

Real servers on loopback; each wait is on a condition that holds with the fix (and another
that holds without it, so that the test fails on its assertions instead of waiting out)."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, closing, suppress
from pathlib import Path
from typing import Any

import grpc
from rerank.v1 import rerank_pb2

from rerank_service.config.sources import load_settings
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, upstream_settings
from tests.integration.test_http_abuse import COHERE, connect, read_response
from tests.support.server import ServerThread
from tests.support.tenants import (
    ADS_KEY,
    KEYS,
    SEARCH_KEY,
    bearer,
    caller,
    http_call,
    rerank_request,
    write_config,
)
from tests.support.waiting import wait_until

ENV = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, **KEYS}
MIB = 1 << 20
HOLD = "held at the upstream"


def _serve(tmp_path: Path, upstream: FakeUpstream, **settings: Any) -> ServerThread:
    """A server of two callers: "search" floods, "ads" is the other one."""
    path = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY"), caller("ads", "ADS_KEY")],
        **settings,
    )
    return ServerThread(load_settings({"config": str(path)}, env=ENV))


def _fair_share_refusals(server: ServerThread) -> float:
    assert server.server is not None
    value = server.server.metrics.registry.get_sample_value(
        "rerank_admission_refusals_total", {"bound": "fair_share"}
    )
    return value or 0.0


def _silent_bodies(stack: ExitStack, server: ServerThread, keys: list[str], size: int) -> list[socket.socket]:
    """A connection for each of `keys` that sends the head of a `size`-byte body and no body,
    each read by the server (its bytes taken, or its call refused for the share)."""
    assert server.server is not None
    assert server.server.http is not None
    port = server.server.http.port
    assert port is not None
    admission = server.server.admission
    refused_before = _fair_share_refusals(server)
    silent = []
    for key in keys:
        sock = stack.enter_context(closing(connect(port)))
        head = (
            f"POST {COHERE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {size}\r\n\r\n"
        )
        sock.sendall(head.encode())
        silent.append(sock)
    wait_until(
        lambda: (
            admission.bytes_in_flight + (_fair_share_refusals(server) - refused_before) * size
            == len(keys) * size
        ),
        what="every head read",
    )
    return silent


def test_http_bodies_one_caller_never_sends_hold_at_most_its_share_of_the_byte_budget(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    size = MIB // 4  # four of them are the whole budget; two its share
    with (
        _serve(tmp_path, upstream, http_port=0, max_inflight_bytes=MIB, max_message_bytes=MIB) as server,
        ExitStack() as stack,
    ):
        assert server.server is not None
        assert server.server.http is not None
        port = server.server.http.port
        assert port is not None
        admission = server.server.admission
        silent = _silent_bodies(stack, server, [SEARCH_KEY] * 4, size)  # from the flooding caller
        held = admission.bytes_in_flight
        by_http = http_call(port, ADS_KEY)
        by_grpc = server.stub.Rerank(rerank_request(), metadata=bearer(ADS_KEY), timeout=10)
        refused = [read_response(sock) for sock in silent[2:]]

    assert held == 2 * size
    assert by_http.status == 200, by_http.body
    assert len(by_grpc.output.results) == 3
    assert [status for status, _ in refused] == [429, 429]
    assert all(b"fair_share" in body and b"HTTP bodies still arriving" in body for _, body in refused)


def test_silent_streams_of_one_caller_hold_at_most_its_share_of_the_open_calls(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    silence: queue.Queue[rerank_pb2.RerankStreamRequest] = queue.Queue()

    def never() -> Iterator[rerank_pb2.RerankStreamRequest]:
        yield silence.get()  # blocks: the stream stays open without an item

    with _serve(tmp_path, upstream, max_open_calls=8, max_concurrent_requests=4) as server:
        assert server.server is not None
        admission = server.server.admission
        streams: list[Any] = [  # futures too (grpc's _MultiThreadedRendezvous): whether each ended
            server.stub.RerankStream(never(), metadata=bearer(SEARCH_KEY), timeout=30) for _ in range(8)
        ]
        try:
            wait_until(
                lambda: _fair_share_refusals(server) == 4 or admission.open == 8, what="every stream opened"
            )
            opened = admission.open
            answer = server.stub.Rerank(rerank_request(), metadata=bearer(ADS_KEY), timeout=10)
            refused = [stream for stream in streams if stream.done()]
        finally:
            for stream in streams:
                stream.cancel()

    assert opened == 4
    assert len(answer.output.results) == 3
    assert len(refused) == 4
    assert all(stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for stream in refused)
    assert all("--max-open-calls" in (stream.details() or "") for stream in refused)


def test_a_caller_alone_uses_every_slot_however_few_open_calls_that_leaves_its_share(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # The open calls' share holds streams, which may sit silent; a unary call takes a slot
    # at once, and a caller alone may hold every slot (TENANTS.md).
    upstream.poison(HOLD, Fault(delay=NEVER))
    held = rerank_request()
    held.query = HOLD
    with _serve(tmp_path, upstream, max_open_calls=6, max_concurrent_requests=4) as server:
        assert server.server is not None
        admission = server.server.admission
        calls = [server.stub.Rerank.future(held, metadata=bearer(SEARCH_KEY), timeout=30) for _ in range(4)]
        try:
            wait_until(
                lambda: admission.in_flight == 4 or any(call.done() for call in calls),
                what="every call admitted, or one refused",
            )
            in_flight, ended = admission.in_flight, [call for call in calls if call.done()]
        finally:
            for call in calls:
                call.cancel()

    assert [call.details() for call in ended] == []
    assert in_flight == 4
    assert _fair_share_refusals(server) == 0


def test_a_streams_items_run_at_most_its_callers_share_while_others_call(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.poison(HOLD, Fault(delay=NEVER))
    held = rerank_request()
    held.query = HOLD
    with _serve(tmp_path, upstream, max_concurrent_requests=4, stream_concurrency=8) as server:
        other = server.stub.Rerank.future(held, metadata=bearer(ADS_KEY), timeout=30)  # "ads" calls
        wait_until(lambda: upstream.in_flight == 1, what="the other caller's call at the upstream")
        items = [rerank_pb2.RerankStreamRequest(id=str(number), request=held) for number in range(4)]
        more: queue.Queue[rerank_pb2.RerankStreamRequest | None] = queue.Queue()

        def requests() -> Iterator[rerank_pb2.RerankStreamRequest]:
            yield from items
            yield from iter(more.get, None)  # open until the test ends it

        stream = server.stub.RerankStream(requests(), metadata=bearer(SEARCH_KEY), timeout=30)
        answers: list[rerank_pb2.RerankStreamResponse] = []

        def read() -> None:
            with suppress(grpc.RpcError):
                answers.extend(stream)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            wait_until(lambda: len(answers) == 2 or upstream.in_flight == 5, what="the items read")
            at_upstream = upstream.in_flight
            early = list(answers)
        finally:
            stream.cancel()
            other.cancel()
            more.put(None)
            reader.join(timeout=30)

    assert at_upstream == 3  # the other's call, and 2 items: the share of 4 slots
    assert len(early) == 2
    assert all(answer.WhichOneof("result") == "error" for answer in early), early
    assert [(answer.error.reason, answer.error.metadata["limit"]) for answer in early] == [
        ("CALLER_LIMITED", "fair_share")
    ] * 2


def test_pass_through_tokens_share_their_client_address_s_share_of_bodies_arriving(
    upstream: FakeUpstream,
) -> None:
    """With no caller keys and no upstream key, each bearer token names a caller the upstream
    has not yet checked: junk tokens, a fresh one a connection, would each get a share of
    the bodies arriving (and one body alone is always let in). They share their address's."""
    size = MIB // 4  # four of them are the whole budget; two its share
    settings = upstream_settings(
        upstream, upstream_api_key=None, http_port=0, max_inflight_bytes=MIB, max_message_bytes=MIB
    )
    with ServerThread(settings) as server, ExitStack() as stack:
        assert server.server is not None
        assert server.server.http is not None
        port = server.server.http.port
        assert port is not None
        admission = server.server.admission
        silent = _silent_bodies(stack, server, [f"junk-token-{index}" for index in range(4)], size)
        held = admission.bytes_in_flight
        refused = [read_response(sock) for sock in silent[2:]]

    assert held == 2 * size
    assert [status for status, _ in refused] == [429, 429]
