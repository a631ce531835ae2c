"""The spans of a call, read from OpenTelemetry's SDK in the server's own process.

A live server (gRPC on a loopback port, the fake upstream over HTTP) with a tracer whose
spans go to the SDK's in-memory exporter: what each span is, whom it hangs under, what it
says and never says, and the context the upstream is sent. tests/integration/test_tracing.py
proves the same end to end through a real collector (Jaeger) and real processes.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import grpc
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceState
from opentelemetry.util.types import Attributes
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing_export import (
    OtelTracing,
    _BoundedProcessor,
    _CountingExporter,
    start_tracing,
)
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY, upstream_settings
from tests.support.logs import LogCapture
from tests.support.redis_server import RedisServer
from tests.support.rpc import expect_error, request
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
RERANK = "rerank.v1.RerankService/Rerank"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter) -> Iterator[ServerThread]:
    """A live server whose spans go to `spans`, exported as each ends."""
    with ServerThread(upstream_settings(upstream), tracer=in_memory(spans)) as server:
        yield server


def in_memory(spans: InMemorySpanExporter) -> OtelTracing:
    """The service's tracer, exporting each span to `spans` as it ends, sampling every call."""
    return OtelTracing(SimpleSpanProcessor(spans), Resource.create(), ParentBased(ALWAYS_ON))


def finished(spans: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The spans ended so far, once there are `count` (the server span ends last, after the
    answer is sent, so a test waits for it)."""
    wait_until(lambda: len(spans.get_finished_spans()) >= count, timeout=10, what=f"{count} spans")
    return list(spans.get_finished_spans())


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in found if span.name == name]


def hex_id(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


def test_a_call_is_a_server_span_under_the_callers_with_its_attempt_below(
    traced: ServerThread, upstream: FakeUpstream, spans: InMemorySpanExporter
) -> None:
    traced.stub.Rerank(request(), metadata=(("traceparent", SAMPLED),), timeout=10)

    found = finished(spans, 2)
    (server,) = named(found, RERANK)
    (attempt,) = named(found, "POST")
    # A route of one deployment has no choice to make: no route span (the call's names it).
    assert named(found, "rerank.route") == []
    assert server.kind is SpanKind.SERVER
    assert hex_id(server.context.trace_id, 32) == CALLER_TRACE
    assert server.parent is not None
    assert hex_id(server.parent.span_id, 16) == CALLER_SPAN
    assert attempt.parent is not None
    assert attempt.parent.span_id == server.context.span_id
    assert attempt.kind is SpanKind.CLIENT
    attributes = dict(server.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.method"] == "Rerank"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["gen_ai.request.model"] == "qwen3-rerank"
    assert attributes["rerank.documents"] == len(request().documents)
    assert isinstance(attributes["gen_ai.usage.input_tokens"], int)
    assert attributes["rerank.deployments"] == [urlsplit(upstream.url).netloc]  # the one that answered
    attempt_attributes = dict(attempt.attributes or {})
    assert attempt_attributes["http.response.status_code"] == 200
    (received,) = upstream.requests
    assert attempt_attributes["url.full"] == upstream.url.rstrip("/") + received.path
    # The upstream was sent the attempt's own context: its spans hang under the attempt.
    assert received.headers["traceparent"] == (f"00-{CALLER_TRACE}-{hex_id(attempt.context.span_id, 16)}-01")


def test_a_model_name_the_caller_sent_is_cut_in_the_span_as_in_the_log(
    traced: ServerThread, spans: InMemorySpanExporter, logs: LogCapture
) -> None:
    long_name = "m" * 200_000  # no such model: NOT_FOUND, but the span still names what was asked
    expect_error(
        lambda: traced.stub.Rerank(request(model=long_name), metadata=(("traceparent", SAMPLED),), timeout=10)
    )

    (server,) = named(finished(spans, 1), RERANK)
    shown = dict(server.attributes or {})["gen_ai.request.model"]
    assert isinstance(shown, str)
    assert len(shown) < 100
    assert shown.startswith("mmmm")
    wait_until(lambda: any(e.get("event") == "call" for e in logs.events()), what="the call's log line")
    assert [e["model"] for e in logs.events() if e.get("event") == "call"] == [shown]


def test_a_retried_attempt_is_a_second_client_span_and_the_failed_one_says_why(
    traced: ServerThread, upstream: FakeUpstream, spans: InMemorySpanExporter
) -> None:
    upstream.inject(Fault(status=503, body={"code": "ServiceUnavailable", "message": "busy"}))
    traced.stub.Rerank(request(), metadata=(("traceparent", SAMPLED),), timeout=10)

    attempts = sorted(named(finished(spans, 3), "POST"), key=lambda span: span.start_time or 0)
    assert len(attempts) == 2
    failed, succeeded = attempts
    assert failed.status.status_code is StatusCode.ERROR
    assert dict(failed.attributes or {})["http.response.status_code"] == 503
    assert "error.type" in dict(failed.attributes or {})
    assert dict(succeeded.attributes or {})["http.request.resend_count"] == 1
    assert succeeded.status.status_code is StatusCode.UNSET
    # Each attempt sent its own span's context.
    sent = [recorded.headers["traceparent"] for recorded in upstream.requests]
    assert sent == [f"00-{CALLER_TRACE}-{hex_id(span.context.span_id, 16)}-01" for span in attempts]


def test_a_failed_call_marks_its_span_with_the_reason_and_never_the_text_or_keys(
    traced: ServerThread, upstream: FakeUpstream, spans: InMemorySpanExporter
) -> None:
    upstream.always(Fault(status=500, body={"code": "InternalError", "message": "boom"}))
    secret_query = "the-secret-query-text"
    expect_error(lambda: traced.stub.Rerank(request(query=secret_query), timeout=10))

    found = finished(spans, 2)  # the server span and the attempt (a 500 is not retried)
    (server,) = named(found, RERANK)
    assert server.status.status_code is StatusCode.ERROR
    assert dict(server.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    dumped = "".join(span.to_json() for span in found)
    assert secret_query not in dumped
    assert "red apple" not in dumped  # nor a document
    assert UPSTREAM_KEY not in dumped


def test_a_caller_mistake_is_named_on_the_span_without_marking_it_failed(
    traced: ServerThread, spans: InMemorySpanExporter
) -> None:
    expect_error(lambda: traced.stub.Rerank(request(query=""), timeout=10))

    (server,) = named(finished(spans, 1), RERANK)
    assert server.status.status_code is StatusCode.UNSET
    assert dict(server.attributes or {})["error.type"]


def test_a_trace_the_caller_did_not_sample_records_nothing_and_passes_its_context_on(
    traced: ServerThread, upstream: FakeUpstream, spans: InMemorySpanExporter
) -> None:
    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    traced.stub.Rerank(request(), metadata=(("traceparent", unsampled),), timeout=10)

    wait_until(lambda: len(upstream.requests) == 1, timeout=10, what="the upstream call")
    assert upstream.requests[0].headers["traceparent"] == unsampled
    # A sampled call after it is recorded alone: the unsampled one left nothing behind.
    traced.stub.Rerank(request(), metadata=(("traceparent", SAMPLED),), timeout=10)
    assert len(named(finished(spans, 2), RERANK)) == 1


def test_stream_items_are_spans_of_their_own_linked_to_the_stream(
    traced: ServerThread, spans: InMemorySpanExporter
) -> None:
    from rerank.v1 import rerank_pb2

    items = [rerank_pb2.RerankStreamRequest(id=f"item-{n}", request=request()) for n in range(2)]
    answers = list(traced.stub.RerankStream(iter(items), metadata=(("traceparent", SAMPLED),), timeout=10))
    assert len(answers) == 2

    found = finished(spans, 5)  # the stream, two items and their attempts
    (stream,) = named(found, "rerank.v1.RerankService/RerankStream")
    item_spans = named(found, "rerank.v1.RerankService/RerankStream item")
    assert len(item_spans) == 2
    for item in item_spans:
        assert [link.context.span_id for link in item.links] == [stream.context.span_id]
        assert hex_id(item.context.trace_id, 32) == CALLER_TRACE
    assert dict(stream.attributes or {})["rerank.stream.items"] == 2


STREAM = "rerank.v1.RerankService/RerankStream"


def stream_of(server: ServerThread, count: int) -> None:
    """A RerankStream of `count` items from a caller that sends no trace context."""
    from rerank.v1 import rerank_pb2

    items = [rerank_pb2.RerankStreamRequest(id=f"item-{n}", request=request()) for n in range(count)]
    assert len(list(server.stub.RerankStream(iter(items), timeout=10))) == count


class _FirstApart(Sampler):
    """Decides the first span it is asked about (a stream's) one way and every later one (its
    items') the other: a stream and its items sampled apart, as a ratio sampler may roots."""

    def __init__(self, first: bool) -> None:
        self._first = first
        self._asked = 0

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        self._asked += 1
        keep = self._first if self._asked == 1 else not self._first
        return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP)

    def get_description(self) -> str:
        return "FirstApart"


def test_a_streams_items_without_the_callers_context_hang_under_its_span(
    traced: ServerThread, upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter
) -> None:
    stream_of(traced, 2)

    found = finished(spans, 5)  # the stream, two items and their attempts
    (stream,) = named(found, STREAM)
    items = named(found, f"{STREAM} item")
    assert [item.kind for item in items] == [SpanKind.INTERNAL] * 2
    for item in items:  # in the stream's trace, under its span: sampled as the stream was
        assert item.context.trace_id == stream.context.trace_id
        assert item.parent is not None
        assert item.parent.span_id == stream.context.span_id
        assert list(item.links) == []
    attempts = {attempt.parent.span_id for attempt in named(found, "POST") if attempt.parent}
    assert attempts == {item.context.span_id for item in items}
    # Each item's access line names its own span, not its stream's.
    lines = logs.wait_for_calls(2)
    assert sorted(line["span_id"] for line in lines) == sorted(hex_id(i.context.span_id, 16) for i in items)


def test_the_items_of_a_stream_not_sampled_record_nothing_and_send_no_context(
    upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter
) -> None:
    tracer = OtelTracing(SimpleSpanProcessor(spans), Resource.create(), _FirstApart(first=False))
    with ServerThread(upstream_settings(upstream), tracer=tracer) as server:
        stream_of(server, 3)
        wait_until(
            lambda: any(e.get("event") == "stream" for e in logs.events()), timeout=10, what="the stream"
        )

    # A sampler that would keep the items alone: recorded with their stream or not at all.
    assert spans.get_finished_spans() == ()
    assert [received.headers.get("traceparent") for received in upstream.requests] == [None] * 3


def test_an_item_not_sampled_in_a_sampled_stream_records_nothing_under_the_streams_span(
    upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter
) -> None:
    tracer = OtelTracing(SimpleSpanProcessor(spans), Resource.create(), _FirstApart(first=True))
    with ServerThread(upstream_settings(upstream), tracer=tracer) as server:
        stream_of(server, 3)
        # It ends after its items.
        wait_until(
            lambda: bool(named(list(spans.get_finished_spans()), STREAM)), timeout=10, what="the stream"
        )

    assert [span.name for span in spans.get_finished_spans()] == [STREAM]
    # Its upstream is sent the caller's context as it came (none), its lines name no trace.
    assert [received.headers.get("traceparent") for received in upstream.requests] == [None] * 3
    items = logs.wait_for_calls(3)
    assert [(line.get("trace_id"), line.get("span_id")) for line in items] == [(None, None)] * 3


def test_log_lines_and_latency_exemplars_carry_the_trace(
    upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter
) -> None:
    metrics = Metrics()
    with ServerThread(upstream_settings(upstream), metrics=metrics, tracer=in_memory(spans)) as server:
        server.stub.Rerank(request(), metadata=(("traceparent", SAMPLED),), timeout=10)
        (server_span,) = named(finished(spans, 2), RERANK)

    access = logs.wait_for_calls(1)
    assert access, logs.text
    assert access[-1]["trace_id"] == CALLER_TRACE
    assert access[-1]["span_id"] == hex_id(server_span.context.span_id, 16)
    exposition = openmetrics(metrics.registry).decode()  # type: ignore[no-untyped-call]
    assert re.search(
        r'rerank_call_latency_seconds_bucket\{le="[^"]+",method="Rerank"\} \d+(\.\d+)? # \{trace_id="'
        + CALLER_TRACE,
        exposition,
    ), exposition


class _Refusing(SpanExporter):
    """A collector that never takes a span."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.FAILURE


def test_spans_a_collector_refuses_and_spans_past_the_queue_are_counted_as_dropped() -> None:
    metrics = Metrics()
    exporter = _CountingExporter(_Refusing(), metrics)
    provider = TracerProvider()
    inner = SimpleSpanProcessor(exporter)
    provider.add_span_processor(_BoundedProcessor(inner, exporter, 1, metrics))
    tracer = provider.get_tracer("test")
    for _ in range(3):
        tracer.start_span("one").end()
    dropped = metrics.trace_spans_dropped
    assert dropped.labels("export_failed")._value.get() == 3
    # The simple processor exports at once, so the queue never holds one: none dropped there.
    assert dropped.labels("queue_full")._value.get() == 0


def test_a_full_queue_drops_and_counts_instead_of_holding_a_call() -> None:
    metrics = Metrics()
    exporter = _CountingExporter(InMemorySpanExporter(), metrics)

    class _Holding(SimpleSpanProcessor):
        """A processor that keeps every span (a collector that never answers)."""

        def on_end(self, span: ReadableSpan) -> None:
            pass

    provider = TracerProvider()
    provider.add_span_processor(_BoundedProcessor(_Holding(exporter), exporter, 2, metrics))
    tracer = provider.get_tracer("test")
    for _ in range(5):
        tracer.start_span("one").end()
    assert metrics.trace_spans_dropped.labels("queue_full")._value.get() == 3


def test_each_reason_spans_are_dropped_for_is_exported_at_0_once_tracing_starts() -> None:
    """A series born at 1 on the first drop reads as no increase: RerankTraceSpansDropped
    (an increase) and the dashboard would miss the first spans lost."""
    metrics = Metrics()

    def dropped() -> dict[str, float | None]:
        return {
            reason: metrics.registry.get_sample_value("rerank_trace_spans_dropped_total", {"reason": reason})
            for reason in ("queue_full", "export_failed")
        }

    assert dropped() == {"queue_full": None, "export_failed": None}  # tracing off: nothing to drop
    tracing = start_tracing("http://127.0.0.1:9", metrics)
    try:
        assert dropped() == {"queue_full": 0, "export_failed": 0}
    finally:
        tracing.shutdown(1.0)


def test_the_score_caches_round_trips_to_redis_are_spans_of_the_call(
    upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter, redis_empty: RedisServer
) -> None:
    settings = upstream_settings(upstream, cache_memory_mb=0, cache_store=redis_empty.url)
    with ServerThread(settings, tracer=in_memory(spans)) as server:
        server.stub.Rerank(request(), metadata=(("traceparent", SAMPLED),), timeout=10)
        first = finished(spans, 4)  # the call, its read, its attempt, its write
        spans.clear()
        server.stub.Rerank(request(), metadata=(("traceparent", SAMPLED),), timeout=10)
        second = finished(spans, 2)  # the call and its read: every pair found

    documents = len(request().documents)
    (call,) = named(first, RERANK)
    (read,) = named(first, "rerank.cache.read")
    (write,) = named(first, "rerank.cache.write")
    assert [span.parent.span_id if span.parent else None for span in (read, write)] == [
        call.context.span_id
    ] * 2
    assert dict(read.attributes or {}) == {"rerank.pairs": documents, "rerank.cache.found": 0}
    assert dict(write.attributes or {}) == {"rerank.pairs": documents}
    assert len(named(first, "POST")) == 1
    assert named(second, "POST") == []
    (read,) = named(second, "rerank.cache.read")
    assert dict(read.attributes or {})["rerank.cache.found"] == documents
    assert dict(named(second, RERANK)[0].attributes or {})["rerank.cache"] == "hit"


def test_an_http_body_that_came_too_slowly_is_a_408_named_on_the_span_without_marking_it_failed(
    upstream: FakeUpstream, logs: LogCapture, spans: InMemorySpanExporter
) -> None:
    """A 408 is DEADLINE_EXCEEDED, a server error by gRPC's conventions; OpenTelemetry's HTTP
    conventions leave a 4xx server span unset, as for any other mistake of the caller's."""
    settings = upstream_settings(upstream, http_port=0, http_body_timeout=0.2)
    with ServerThread(settings, tracer=in_memory(spans)) as server:
        assert server.server is not None
        assert server.server.http is not None
        port = server.server.http.port
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            answer = b""
            while b"\r\n" not in answer:  # the 408, once the body timeout ran out
                answer += sock.recv(65536) or b"\r\n"
        (server_span,) = finished(spans, 1)

    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    attributes = dict(server_span.attributes or {})
    assert attributes["http.response.status_code"] == 408
    assert attributes["error.type"] == "DEADLINE_EXCEEDED"
    assert server_span.status.status_code is StatusCode.UNSET
