"""The `jaeger` fixture end to end: spans sent by the real OpenTelemetry SDK over OTLP gRPC and
OTLP HTTP come back from Jaeger's query API as `JaegerSpan`s, with their parent, kind,
status, events, attributes, resource and links, and trace ids in OTLP's 32 digits."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tests.support.jaeger_server import JaegerServer, JaegerSpan


class LowTraceIds(RandomIdGenerator):
    """Trace ids whose high 64 bits are zero: Jaeger prints those in 16 digits."""

    def generate_trace_id(self) -> int:
        return secrets.randbits(63) | 1


def _exporter(jaeger: JaegerServer, protocol: str) -> SpanExporter:
    if protocol == "grpc":
        return GrpcSpanExporter(endpoint=jaeger.otlp_grpc_endpoint, insecure=True)
    return HttpSpanExporter(endpoint=f"{jaeger.otlp_http_endpoint}/v1/traces")


def _provider(jaeger: JaegerServer, protocol: str, service: str, **options: object) -> TracerProvider:
    resource = Resource.create({"service.name": service, "service.instance.id": "worker-1"})
    provider = TracerProvider(resource=resource, **options)  # type: ignore[arg-type]
    # Synchronous export: each span is in Jaeger's store (or an error raised) once it ends.
    provider.add_span_processor(SimpleSpanProcessor(_exporter(jaeger, protocol)))
    return provider


@pytest.fixture(params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def service() -> str:
    return f"jaeger-support-{secrets.token_hex(4)}"


@pytest.fixture
def provider(jaeger: JaegerServer, protocol: str, service: str) -> Iterator[TracerProvider]:
    provider = _provider(jaeger, protocol, service)
    yield provider
    provider.shutdown()


def _by_name(spans: list[JaegerSpan]) -> dict[str, JaegerSpan]:
    return {span.name: span for span in spans}


def test_a_caller_parent_a_server_span_and_its_children_come_back(
    jaeger: JaegerServer, provider: TracerProvider, service: str
) -> None:
    tracer = provider.get_tracer("tests.jaeger_support")
    # The caller's span is remote (a traceparent): only its id is known, Jaeger never stores it.
    caller = SpanContext(
        trace_id=secrets.randbits(128) | (1 << 127),
        span_id=secrets.randbits(64) | 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with tracer.start_as_current_span("stream", kind=SpanKind.SERVER) as stream:
        stream_context = stream.get_span_context()
    remote = trace.set_span_in_context(trace.NonRecordingSpan(caller))
    with tracer.start_as_current_span(
        "rerank.v1.RerankService/Rerank",
        context=remote,
        kind=SpanKind.SERVER,
        links=[Link(stream_context)],
        attributes={"rpc.system": "grpc", "gen_ai.request.model": "qwen3-rerank", "documents": 3},
    ) as server:
        with tracer.start_as_current_span("attempt", kind=SpanKind.CLIENT) as attempt:
            attempt.set_attribute("http.response.status_code", 503)
            attempt.add_event("retry", {"retry": 1})
            attempt.set_status(Status(StatusCode.ERROR, "upstream unavailable"))
        with tracer.start_as_current_span("route") as route:
            route.set_status(Status(StatusCode.OK))
        server_context = server.get_span_context()

    trace_id = f"{caller.trace_id:032x}"
    spans = _by_name(jaeger.trace(trace_id, until=lambda spans: len(spans) >= 3))

    assert set(spans) == {"rerank.v1.RerankService/Rerank", "attempt", "route"}
    call, attempt_span, route_span = spans["rerank.v1.RerankService/Rerank"], spans["attempt"], spans["route"]
    assert {span.trace_id for span in spans.values()} == {trace_id}
    assert call.span_id == f"{server_context.span_id:016x}"
    assert call.parent_span_id == f"{caller.span_id:016x}"
    assert call.links == ((f"{stream_context.trace_id:032x}", f"{stream_context.span_id:016x}"),)
    assert call.kind == "server"
    assert call.status is None
    assert call.attributes["gen_ai.request.model"] == "qwen3-rerank"
    assert call.attributes["documents"] == 3
    assert call.service == service
    assert call.resource["service.instance.id"] == "worker-1"
    assert call.duration_us >= attempt_span.duration_us
    assert attempt_span.parent_span_id == call.span_id
    assert attempt_span.kind == "client"
    assert attempt_span.status == "ERROR"
    assert attempt_span.events == ("retry",)
    assert attempt_span.attributes["http.response.status_code"] == 503
    assert attempt_span.links == ()
    assert route_span.parent_span_id == call.span_id
    assert route_span.kind == "internal"
    assert route_span.status == "OK"
    assert attempt_span.start_us <= route_span.start_us

    # The linked stream span is its own trace, and the service's traces list both.
    traces = jaeger.traces(service, until=lambda traces: len(traces) >= 2)
    assert sorted(trace[0].trace_id for trace in traces) == sorted(
        [trace_id, f"{stream_context.trace_id:032x}"]
    )


def test_a_trace_id_with_leading_zeros_is_read_in_32_digits(jaeger: JaegerServer, protocol: str) -> None:
    provider = _provider(jaeger, protocol, f"jaeger-low-{secrets.token_hex(4)}", id_generator=LowTraceIds())
    try:
        with provider.get_tracer("tests.jaeger_support").start_as_current_span("low") as span:
            context = span.get_span_context()
    finally:
        provider.shutdown()
    assert context.trace_id < 1 << 64

    trace_id = f"{context.trace_id:032x}"
    (read,) = jaeger.trace(trace_id)

    assert read.trace_id == trace_id
    assert read.span_id == f"{context.span_id:016x}"
    assert read.parent_span_id is None


def test_a_link_to_the_parent_itself_reads_as_that_link_and_no_parent(
    jaeger: JaegerServer, provider: TracerProvider
) -> None:
    """Jaeger keeps one reference per span it points to: the link's FOLLOWS_FROM replaces the
    parent's CHILD_OF (a stream item's span should be a child of the stream's, or linked to
    it, not both, for the parent to read as one)."""
    tracer = provider.get_tracer("tests.jaeger_support")
    with tracer.start_as_current_span("stream", kind=SpanKind.SERVER) as stream:
        with tracer.start_as_current_span("child"):
            pass
        with tracer.start_as_current_span("linked child", links=[Link(stream.get_span_context())]):
            pass
    context = stream.get_span_context()
    trace_id, stream_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"

    spans = _by_name(jaeger.trace(trace_id, until=lambda spans: len(spans) >= 3))

    assert spans["child"].parent_span_id == stream_id
    assert spans["child"].links == ()
    assert spans["linked child"].parent_span_id is None
    assert spans["linked child"].links == ((trace_id, stream_id),)


def test_waiting_for_what_never_comes_names_what_jaeger_had(jaeger: JaegerServer) -> None:
    absent = secrets.token_hex(16)
    with pytest.raises(AssertionError, match=rf"(?s)trace {absent} in jaeger.*\(nothing\)"):
        jaeger.trace(absent, timeout=0.2)
