"""A RerankStream item waiting for admission (a slot, or room in the byte budget) when the
server begins to drain is answered UNAVAILABLE at once, without running (STREAMING.md).

It waited on: for the slot, until the wait's bound, then answered RESOURCE_EXHAUSTED
OVERLOADED "retry shortly", which sent its client back to a server shutting down.

What holds the slots or bytes is held at the fake upstream (`Fault(delay=NEVER)` on its
query) until the test lets it go, and SLOT_WAIT is set long: the item is answered by the
drain, not by a clock."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from rerank.v1 import rerank_pb2

from rerank_service.config.sources import load_settings
from rerank_service.pipeline import admission as admission_module
from rerank_service.testing.fake_upstream import NEVER, FakeUpstream, Fault, RecordedRequest
from tests.conftest import UPSTREAM_KEY, ServerFactory
from tests.integration.test_stream import Outbox, item
from tests.support.server import ServerThread
from tests.support.tenants import ADS_KEY, KEYS, SEARCH_KEY, bearer, caller, rerank_request, write_config
from tests.support.waiting import wait_until

ENV = {"RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY, **KEYS}
SLOTS = 4
HOLD = "held at the upstream"  # in the held calls' queries: they never end by themselves
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def held_at(upstream: FakeUpstream) -> list[RecordedRequest]:
    """The requests held at the upstream (recorded by this test: `in_flight` may still count
    an earlier test's held ones, ending as their connections close)."""
    return [recorded for recorded in upstream.requests if HOLD in str(recorded.body)]


def test_a_stream_item_waiting_for_a_slot_when_the_drain_begins_is_answered_unavailable_at_once(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission_module, "SLOT_WAIT", 60.0, raising=False)
    upstream.poison(HOLD, Fault(delay=NEVER))
    path = write_config(
        tmp_path / "rerank.yaml",
        upstream,
        [caller("search", "SEARCH_KEY"), caller("ads", "ADS_KEY")],
        max_concurrent_requests=SLOTS,
        upstream_timeout=120,  # the flood is held past the item's deadline
    )
    flood_request = rerank_request()
    flood_request.query = HOLD
    with ServerThread(load_settings({"config": str(path)}, env=ENV)) as server:
        assert server.server is not None
        admission = server.server.admission
        flood = [
            server.stub.Rerank.future(flood_request, metadata=bearer(SEARCH_KEY), timeout=60)
            for _ in range(SLOTS)
        ]
        try:
            wait_until(lambda: len(held_at(upstream)) == SLOTS, what="every slot held by the flood")
            polite = rerank_pb2.RerankStreamRequest(id="polite", request=rerank_request())
            # Its deadline bounds the slot wait where the drain does not end it (OVERLOADED then).
            answers = server.stub.RerankStream(iter([polite]), metadata=bearer(ADS_KEY), timeout=10)
            wait_until(lambda: admission.waiting == 1, what="the polite item waiting for a slot")
            stopping = server.begin(server.server.stop(grace=60))
            answer = next(answers)  # while the flood still holds every slot
            flood_meanwhile = [call.done() for call in flood]
            waiting_after = admission.waiting
            refused = server.server.metrics.registry.get_sample_value(
                "rerank_admission_refusals_total", {"bound": "slots"}
            )
        finally:
            for call in flood:
                call.cancel()
        stopping.result(timeout=30)
        server.server = None  # stopped: the harness need not stop it again

    assert (answer.id, answer.WhichOneof("result")) == ("polite", "error")
    assert answer.error.code == UNAVAILABLE, answer.error
    assert "shutting down" in answer.error.message
    assert flood_meanwhile == [False] * SLOTS  # answered by the drain, not by a slot freed
    assert waiting_after == 0
    assert refused == 0  # its wait was cut short: no slots refusal at its bound


def test_a_stream_item_waiting_for_byte_budget_when_the_drain_begins_is_answered_unavailable_at_once(
    serve: ServerFactory, upstream: FakeUpstream
) -> None:
    upstream.poison(HOLD, Fault(delay=NEVER))
    document = "apple " * 10_000  # 60 kB; ten of them make an item of 600 kB
    limits = {"max_message_bytes": 1 << 20, "max_inflight_bytes": 1 << 20}
    with serve(**limits, shutdown_grace=60.0, upstream_timeout=120.0) as server:
        assert server.server is not None
        admission = server.server.admission
        outbox = Outbox()
        # Its deadline bounds the wait for room where the drain does not end it.
        stream = server.stub.RerankStream(outbox.items(), timeout=10)
        try:
            outbox.put(item("held", query=HOLD, documents=[document] * 10))
            wait_until(lambda: len(held_at(upstream)) == 1, what="the first item held at the upstream")
            outbox.put(item("next", documents=[document] * 10))
            wait_until(lambda: admission._freed is not None, what="the next item waiting for byte budget")
            stopping = server.begin(server.server.stop())
            answer = next(stream)  # while the first item still holds its bytes
            [held] = held_at(upstream)
            held_meanwhile = held.answered
        finally:
            stream.cancel()  # the held item is cut: the drain ends
            outbox.put(None)
        stopping.result(timeout=30)
        server.server.port = None  # stopped: the fixture need not stop it again

    assert (answer.id, answer.WhichOneof("result")) == ("next", "error")
    assert answer.error.code == UNAVAILABLE, answer.error
    assert not held_meanwhile  # answered by the drain, not by room freed
    assert admission.bytes_in_flight == 0
