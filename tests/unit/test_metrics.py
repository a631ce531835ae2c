"""Metrics are registered with their labels, recorded cheaply, and the per-call record
adds up time the way the timing metadata promises; trace context is validated."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any, TextIO, cast

import grpc
import httpx
import pytest

from rerank_service.backends.local.batcher import MicroBatcher
from rerank_service.backends.upstream.http.transport import UpstreamTransport, transport_failure
from rerank_service.grpc.servicer import trace_context, valid_tracestate
from rerank_service.observability import metrics
from rerank_service.observability.logging import configure_logging, get_logger
from rerank_service.observability.metrics import REGISTRY, CallRecord
from tests.support.logs import LogCapture
from tests.unit.test_batcher import RecordingScorer, pair

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def value(name: str, **labels: str) -> float:
    """A sample's current value (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def call() -> Iterator[CallRecord]:
    """A call record made current, as the access-log interceptor does."""
    record = CallRecord("/rerank.v1.RerankService/Rerank", "test", metrics.new_request_id(), 0.0)
    token = metrics.enter_call(record)
    yield record
    metrics.leave_call(token)


# --- registration and labels ---


@pytest.mark.parametrize(
    ("metric", "name", "kind", "labels"),
    [
        (metrics.CALLS, "rerank_calls", "counter", ("method", "code")),
        (metrics.CALL_LATENCY, "rerank_call_latency_seconds", "histogram", ("method",)),
        (metrics.CALLS_IN_FLIGHT, "rerank_calls_in_flight", "gauge", ("method",)),
        (metrics.DOCUMENTS, "rerank_documents_per_call", "histogram", ()),
        (metrics.TOKENS, "rerank_tokens_per_call", "histogram", ()),
        (metrics.UPSTREAM_REQUESTS, "rerank_upstream_requests", "counter", ("status",)),
        (metrics.UPSTREAM_LATENCY, "rerank_upstream_latency_seconds", "histogram", ()),
        (metrics.UPSTREAM_RETRIES, "rerank_upstream_retries", "counter", ("reason",)),
        (metrics.CIRCUIT_STATE, "rerank_upstream_circuit_state", "gauge", ()),
        (metrics.BATCH_SIZE, "rerank_local_batch_size", "histogram", ()),
        (metrics.QUEUE_TIME, "rerank_local_queue_seconds", "histogram", ()),
        (metrics.INFERENCE_TIME, "rerank_local_inference_seconds", "histogram", ()),
    ],
)
def test_every_metric_is_registered_with_its_type_and_labels(
    metric: Any, name: str, kind: str, labels: tuple[str, ...]
) -> None:
    assert (metric._name, metric._type, tuple(metric._labelnames)) == (name, kind, labels)
    assert name in {family.name for family in REGISTRY.collect()}


def test_a_finished_call_is_counted_by_short_method_name_and_code_name() -> None:
    measured = metrics.for_method("/rerank.v1.RerankService/Rerank")
    before_ok = value("rerank_calls_total", method="Rerank", code="OK")
    before_invalid = value("rerank_calls_total", method="Rerank", code="INVALID_ARGUMENT")
    before_latency = value("rerank_call_latency_seconds_count", method="Rerank")
    before_documents = value("rerank_documents_per_call_sum")
    before_tokens = value("rerank_tokens_per_call_sum")
    in_flight = value("rerank_calls_in_flight", method="Rerank")

    measured.started()
    assert value("rerank_calls_in_flight", method="Rerank") == in_flight + 1
    measured.finished(grpc.StatusCode.OK, 0.012, documents=3, tokens=42)
    measured.started()
    measured.finished(3, 0.001, documents=0, tokens=None)  # context.code() may be a bare number

    assert value("rerank_calls_total", method="Rerank", code="OK") == before_ok + 1
    assert value("rerank_calls_total", method="Rerank", code="INVALID_ARGUMENT") == before_invalid + 1
    assert value("rerank_call_latency_seconds_count", method="Rerank") == before_latency + 2
    assert value("rerank_calls_in_flight", method="Rerank") == in_flight
    assert value("rerank_documents_per_call_sum") == before_documents + 3
    assert value("rerank_tokens_per_call_sum") == before_tokens + 42


def test_label_children_are_bound_once_per_method() -> None:
    first = metrics.for_method("/rerank.v1.RerankService/ListModels")
    assert metrics.for_method("/rerank.v1.RerankService/ListModels") is first
    assert first.name == "ListModels"
    assert metrics.STREAM_ITEMS.name == "RerankStream/item"


def test_code_names_cover_enums_numbers_and_unknown_numbers() -> None:
    assert metrics.code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DEADLINE_EXCEEDED"
    assert metrics.code_name(14) == "UNAVAILABLE"
    assert metrics.code_name(99) == "99"


def test_upstream_attempts_are_counted_by_status_and_timed() -> None:
    before_200 = value("rerank_upstream_requests_total", status="200")
    before_reset = value("rerank_upstream_requests_total", status="reset")
    before_count = value("rerank_upstream_latency_seconds_count")

    metrics.observe_upstream(200, 0.05)
    metrics.observe_upstream("reset", 0.001)

    assert value("rerank_upstream_requests_total", status="200") == before_200 + 1
    assert value("rerank_upstream_requests_total", status="reset") == before_reset + 1
    assert value("rerank_upstream_latency_seconds_count") == before_count + 2


def test_the_lead_s_retry_and_circuit_hooks_still_record() -> None:
    before = value("rerank_upstream_retries_total", reason="503")
    metrics.count_upstream_retry("503")
    assert value("rerank_upstream_retries_total", reason="503") == before + 1
    for state, number in (("open", 2), ("half_open", 1), ("closed", 0)):
        metrics.set_circuit_state(state)
        assert value("rerank_upstream_circuit_state") == number


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (httpx.ConnectError("refused"), "connect_error"),
        (httpx.ConnectTimeout("slow"), "timeout"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (httpx.PoolTimeout("full"), "pool_timeout"),
        (httpx.ReadError("reset by peer"), "reset"),
        (httpx.WriteError("broken pipe"), "reset"),
        (httpx.RemoteProtocolError("server disconnected"), "protocol_error"),
        (httpx.UnsupportedProtocol("gopher"), "transport_error"),
    ],
)
def test_transport_failures_have_a_bounded_set_of_labels(error: httpx.HTTPError, label: str) -> None:
    assert transport_failure(error) == label


class _Body(httpx.AsyncByteStream):
    """A streamed body, as the real transport gives (the transport reads it raw)."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._content


# --- the per-call record ---


def test_parallel_upstream_exchanges_count_once_as_wall_time() -> None:
    record = CallRecord("m", "p")
    record.upstream_began(10.0)  # chunk A
    record.upstream_began(10.5)  # chunk B, while A is in flight
    record.upstream_ended(11.0)  # A
    record.upstream_ended(12.0)  # B
    record.upstream_began(20.0)  # a retry after a 8 s wait: the wait is not upstream time
    record.upstream_ended(20.5)

    assert record.upstream_seconds == pytest.approx(2.5)


def test_queue_time_of_a_split_call_is_its_longest_wait_for_a_chunk_slot() -> None:
    record = CallRecord("m", "p")
    for waited in (0.0, 0.3, 0.1):
        record.waited_for_slot(waited)
    assert record.queue_seconds == 0.3


def test_request_ids_are_32_hex_digits_and_unique() -> None:
    ids = {metrics.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)


def test_outside_a_call_there_is_no_record_to_add_to() -> None:
    assert metrics.active_call() is None
    assert metrics.current_call().request_id is None  # a throwaway record


# --- hooks: the upstream transport and the micro-batcher ---


async def test_the_transport_times_each_attempt_and_sends_the_trace_headers(call: CallRecord) -> None:
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        await asyncio.sleep(0.02)
        return httpx.Response(503 if len(seen) == 1 else 200, stream=_Body(b"{}"))

    transport = UpstreamTransport("http://upstream.test", 5.0, 4, transport=httpx.MockTransport(answer))
    before_503 = value("rerank_upstream_requests_total", status="503")
    before_200 = value("rerank_upstream_requests_total", status="200")

    first = await transport.post_json("/rerank", {}, None, None, traceparent=TRACEPARENT, tracestate="a=1")
    second = await transport.post_json("/rerank", {}, None, None)
    await transport.close()

    assert (first.status, second.status) == (503, 200)
    assert seen[0].headers["traceparent"] == TRACEPARENT
    assert seen[0].headers["tracestate"] == "a=1"
    assert "traceparent" not in seen[1].headers
    assert value("rerank_upstream_requests_total", status="503") == before_503 + 1
    assert value("rerank_upstream_requests_total", status="200") == before_200 + 1
    assert call.upstream_seconds >= 0.04


async def test_a_transport_failure_is_counted_by_its_kind(call: CallRecord) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    transport = UpstreamTransport("http://upstream.test", 5.0, 4, transport=httpx.MockTransport(refuse))
    before = value("rerank_upstream_requests_total", status="connect_error")

    with pytest.raises(Exception, match="unreachable"):
        await transport.post_json("/rerank", {}, None, None)
    await transport.close()

    assert value("rerank_upstream_requests_total", status="connect_error") == before + 1


async def test_the_batcher_records_batch_size_queue_and_inference_time(call: CallRecord) -> None:
    batcher = MicroBatcher(RecordingScorer(delay=0.03))
    batcher.start()
    before_batches = value("rerank_local_batch_size_count")
    before_pairs = value("rerank_local_batch_size_sum")
    before_queue = value("rerank_local_queue_seconds_count")
    before_inference = value("rerank_local_inference_seconds_count")
    try:
        await batcher.score([pair(3), pair(4), pair(5)])
    finally:
        await batcher.close()

    assert value("rerank_local_batch_size_count") == before_batches + 1
    assert value("rerank_local_batch_size_sum") == before_pairs + 3
    assert value("rerank_local_queue_seconds_count") == before_queue + 1
    assert value("rerank_local_inference_seconds_count") == before_inference + 1
    # The call that waited gets the time, although the batch ran in the worker's task.
    assert call.inference_seconds >= 0.03
    assert call.queue_seconds > 0


# --- logs: the request id of the call on every line ---


def test_a_line_logged_inside_a_call_carries_its_request_id(call: CallRecord) -> None:
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    try:
        get_logger("test").warning("upstream retry")
        get_logger("test").info("explicit", request_id="named-by-the-line")
    finally:
        configure_logging("json", "warning")

    lines = [json.loads(line) for line in capture.text.splitlines()]
    assert lines[0]["request_id"] == call.request_id
    assert lines[1]["request_id"] == "named-by-the-line"


def test_a_line_logged_outside_a_call_has_no_request_id() -> None:
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    try:
        get_logger("test").info("start-up")
    finally:
        configure_logging("json", "warning")

    assert "request_id" not in json.loads(capture.text)


# --- the /metrics endpoint ---


def test_the_endpoint_serves_the_registry_on_a_free_port_and_stops() -> None:
    server, port = metrics.start_metrics_server("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.stop_metrics_server(server)

    assert port > 0
    assert "# TYPE rerank_calls_total counter" in text
    assert "# TYPE rerank_upstream_circuit_state gauge" in text
    assert "process_resident_memory_bytes" in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


# --- W3C trace context ---

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "traceparent", [TRACEPARENT, f"00-{TRACE_ID}-{PARENT_ID}-00", f"00-{TRACE_ID}-{PARENT_ID}-ff"]
)
def test_a_well_formed_traceparent_is_kept(traceparent: str) -> None:
    assert trace_context([("traceparent", traceparent)]) == (traceparent, None)


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # uppercase hex
        f"01-{TRACE_ID}-{PARENT_ID}-01",  # a version this service does not know
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # the forbidden version
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",  # short trace id
        f"00-{TRACE_ID}-{PARENT_ID}-1",  # short flags
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        f"{TRACEPARENT}\n",  # a trailing newline: `$` would accept it, fullmatch does not
        f"{TRACEPARENT}\r\nx-injected: 1",
        f" {TRACEPARENT}",
        f"00_{TRACE_ID}_{PARENT_ID}_01",
    ],
)
def test_a_malformed_traceparent_is_dropped_with_its_tracestate(traceparent: str) -> None:
    assert trace_context([("traceparent", traceparent), ("tracestate", "a=1")]) == (None, None)


def test_two_traceparents_are_malformed() -> None:
    assert trace_context([("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)]) == (None, None)


def test_no_trace_metadata_costs_nothing_and_gives_nothing() -> None:
    assert trace_context([("authorization", "Bearer k"), ("user-agent", "grpc-python")]) == (None, None)
    assert trace_context(None) == (None, None)


def test_tracestates_are_joined_into_one_list() -> None:
    metadata: list[tuple[str, Any]] = [
        ("traceparent", TRACEPARENT),
        ("tracestate", "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"),
        ("tracestate", "tenant@vendor=x"),
    ]
    assert trace_context(metadata) == (TRACEPARENT, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,tenant@vendor=x")


@pytest.mark.parametrize(
    "tracestate",
    [
        "Rojo=1",  # keys are lowercase
        "rojo",  # no value
        "rojo=a,b",  # a member without '='
        "rojo=1\r\nx-injected: 1",
        "rojo=a=b",  # '=' in a value
        "rojo=a\tb",  # a tab in a value
        "rojo=caf\u00e9",  # not ASCII
        ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
        "k=" + "v" * 600,  # longer than 512 characters
    ],
)
def test_a_malformed_tracestate_is_dropped_but_the_traceparent_kept(tracestate: str) -> None:
    assert valid_tracestate(tracestate) is None
    assert trace_context([("traceparent", TRACEPARENT), ("tracestate", tracestate)]) == (TRACEPARENT, None)
