"""A flood that took every slot while the other callers were quiet does not push out the next
call of a caller under its share (TENANTS.md § Fair share): that call waits for the next slot
released, which is handed to it, and is answered. It was refused RESOURCE_EXHAUSTED at once.

The flood's calls are held at the fake upstream (`Fault(delay=NEVER)` on their query) until
the test cancels one: the polite call then gets that slot, whatever the timing. SLOT_WAIT is
set long, so the wait ends when the test releases a slot, not on a clock."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.config.sources import load_settings
from rerank_service.pipeline import admission as admission_module
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.integration.test_http_abuse import connect, read_response
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
SLOTS = 4
HOLD = "held at the upstream"  # in the flood's queries: its calls never end by themselves


class Flooded:
    """A server whose every slot holds a call of "search" (the flood); "ads" is polite."""

    def __init__(self, server: ServerThread, held: list[grpc.Future[rerank_pb2.RerankResponse]]) -> None:
        self.server = server
        self.held = held
        assert server.server is not None
        self.admission = server.server.admission

    def release_one(self) -> None:
        """One flood call ends (its client cancels it): its slot is released."""
        self.held.pop().cancel()

    def refusals(self, bound: str) -> float | None:
        assert self.server.server is not None
        registry = self.server.server.metrics.registry
        return registry.get_sample_value("rerank_admission_refusals_total", {"bound": bound})


@pytest.fixture
def flooded(tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flooded]:
    monkeypatch.setattr(admission_module, "SLOT_WAIT", 60.0, raising=False)
    upstream.poison(HOLD, Fault(delay=NEVER))
    path = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY"), caller("ads", "ADS_KEY")],
        max_concurrent_requests=SLOTS,
        http_port=0,
    )
    flood_request = rerank_request()
    flood_request.query = HOLD
    with ServerThread(load_settings({"config": str(path)}, env=ENV)) as server:
        held: list[grpc.Future[rerank_pb2.RerankResponse]] = [
            server.stub.Rerank.future(flood_request, metadata=bearer(SEARCH_KEY), timeout=60)
            for _ in range(SLOTS)
        ]
        try:
            wait_until(lambda: upstream.in_flight == SLOTS, what="every slot held by the flood")
            yield Flooded(server, held)
        finally:
            for call in held:
                call.cancel()


def test_a_polite_unary_call_waits_for_the_slot_a_flood_call_releases_and_is_answered(
    flooded: Flooded,
) -> None:
    polite = flooded.server.stub.Rerank.future(rerank_request(), metadata=bearer(ADS_KEY), timeout=30)
    wait_until(lambda: polite.done() or flooded.admission.waiting == 1, what="the polite call waiting")

    flooded.release_one()
    answer = polite.result(timeout=30)

    assert len(answer.output.results) == 3
    assert flooded.admission.held("search") == SLOTS - 1
    assert flooded.refusals("slots") == 0  # it waited: no refusal


def test_a_polite_stream_item_waits_for_the_slot_likewise(flooded: Flooded) -> None:
    item = rerank_pb2.RerankStreamRequest(id="polite", request=rerank_request())
    answers = flooded.server.stub.RerankStream(iter([item]), metadata=bearer(ADS_KEY), timeout=30)
    wait_until(lambda: flooded.admission.waiting == 1, what="the polite item waiting")

    flooded.release_one()
    [answer] = list(answers)

    assert answer.id == "polite"
    assert answer.WhichOneof("result") == "response", answer
    assert flooded.refusals("slots") == 0


def test_a_polite_http_call_waits_for_the_slot_likewise(flooded: Flooded) -> None:
    assert flooded.server.server is not None
    assert flooded.server.server.http is not None
    port = flooded.server.server.http.port
    assert port is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        polite = pool.submit(http_call, port, ADS_KEY)
        wait_until(lambda: polite.done() or flooded.admission.waiting == 1, what="the polite call waiting")

        flooded.release_one()
        answer = polite.result(timeout=30)

    assert answer.status == 200, answer.body
    assert flooded.refusals("slots") == 0


def test_the_flood_past_its_share_is_refused_while_the_polite_call_waits(flooded: Flooded) -> None:
    polite = flooded.server.stub.Rerank.future(rerank_request(), metadata=bearer(ADS_KEY), timeout=30)
    wait_until(lambda: polite.done() or flooded.admission.waiting == 1, what="the polite call waiting")

    with pytest.raises(grpc.RpcError) as refused:
        flooded.server.stub.Rerank(rerank_request(), metadata=bearer(SEARCH_KEY), timeout=30)
    flooded.release_one()

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(polite.result(timeout=30).output.results) == 3


def test_a_polite_caller_has_no_more_calls_waiting_than_its_share_and_the_rest_are_refused(
    flooded: Flooded,
) -> None:
    share = SLOTS // 2  # --caller-max-share 0.5 (the default)
    stub = flooded.server.stub
    polite = [
        stub.Rerank.future(rerank_request(), metadata=bearer(ADS_KEY), timeout=30) for _ in range(share)
    ]
    wait_until(lambda: flooded.admission.waiting == share, what="its share of calls waiting")

    past = stub.Rerank.future(rerank_request(), metadata=bearer(ADS_KEY), timeout=30)
    wait_until(lambda: past.done() or flooded.admission.waiting > share, what="the call past its share")
    waiting = flooded.admission.waiting
    refused = past.exception(timeout=0) if past.done() else None
    while flooded.held:  # the flood ends: its slots go to the waiters, no more than their share
        flooded.release_one()
    answers = [call.result(timeout=30) for call in polite]

    assert waiting == share
    assert isinstance(refused, grpc.RpcError)  # at once, not after a wait
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(len(answer.output.results) == 3 for answer in answers)
    assert flooded.refusals("slots") == 1


def test_a_polite_http_call_held_at_100_continue_is_told_to_send_its_body_before_it_waits(
    flooded: Flooded,
) -> None:
    """A call that may wait for a slot takes it only once its body is in, as any HTTP call:
    held at `Expect: 100-continue` until a slot came, a client that never sent its body
    held a working slot for --http-body-timeout."""
    assert flooded.server.server is not None
    assert flooded.server.server.http is not None
    port = flooded.server.server.http.port
    assert port is not None
    body = json.dumps({"model": "qwen3-rerank", "query": "which bucket", "documents": ["a bucket"]}).encode()
    with closing(connect(port, timeout=30)) as sock:
        sock.sendall(
            f"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {ADS_KEY}\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = b""
        while b"\r\n\r\n" not in interim:  # before any slot is released
            interim += sock.recv(1)
        waiting_before_body = flooded.admission.waiting
        sock.sendall(body)
        wait_until(lambda: flooded.admission.waiting == 1, what="the call waiting, its body in")
        flooded.release_one()
        status, answer = read_response(sock)

    assert interim.startswith(b"HTTP/1.1 100")
    assert waiting_before_body == 0
    assert status == 200, answer
    assert flooded.refusals("slots") == 0


def test_an_http_call_refused_at_100_continue_closes_its_connection(flooded: Flooded) -> None:
    """Refused from its headers, its body never asked for: the client may send it or not, so
    the connection cannot go on (what it sends next could be read as the body)."""
    assert flooded.server.server is not None
    assert flooded.server.server.http is not None
    port = flooded.server.server.http.port
    assert port is not None
    with closing(connect(port, timeout=30)) as sock:
        sock.sendall(  # the flood, past its share: refused 429 from its headers
            f"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {SEARCH_KEY}\r\nExpect: 100-continue\r\n"
            f"Content-Length: 100\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)

    assert head.startswith(b"HTTP/1.1 429"), head
    assert b"\r\nconnection: close" in head.lower()
