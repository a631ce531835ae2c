"""Spans of a call's steps, recorded by the service's tracer into the SDK's in-memory exporter:
the route's choice says the state of the deployment it called (not of one picked before), and
a call that waits for an admission slot has a span for the wait (one let in at once, none)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from rerank_service.core.domain import CallContext, DeploymentState, ServiceError
from rerank_service.observability.tracing import SpanHandle
from rerank_service.observability.tracing_export import OtelTracing
from rerank_service.pipeline.admission import DEADLINE_MARGIN, Admission
from rerank_service.routing.route import Member
from rerank_service.routing.router import Router
from tests.unit.test_admission_slot_wait import _flooded, _slot_wait, _until
from tests.unit.test_routing import (
    COOLDOWN,
    ROUTE,
    Clock,
    FakeBackend,
    deployment,
    health_on,
    request,
    route_of,
    take_down,
)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def call(spans: InMemorySpanExporter) -> Iterator[SpanHandle]:
    """A call's span, current in the test's task (and the tasks it starts) until it ends."""
    tracer = OtelTracing(SimpleSpanProcessor(spans), Resource.create(), ParentBased(ALWAYS_ON))
    span = tracer.open_call("/rerank.v1.RerankService/Rerank", "ipv4:127.0.0.1:5000", None, None, 0.0)
    assert span is not None
    yield span
    span.end()


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


def _parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_the_route_span_says_the_state_of_the_deployment_that_answered(
    call: SpanHandle, spans: InMemorySpanExporter
) -> None:
    """A down primary probed, then the healthy backup: the span said backup, state down."""
    clock = Clock()
    health = health_on(clock)
    take_down(health)
    clock.now += COOLDOWN  # its probe is due: picked first, whatever its priority
    primary = FakeBackend("primary", reason="UPSTREAM_UNAVAILABLE")
    route = route_of(
        Member(deployment(primary, health), ROUTE, priority=0),
        Member(deployment(FakeBackend("backup")), ROUTE, priority=1),
    )

    result = await Router([route]).rerank(request(), CallContext())

    assert result.deployment == "backup"
    assert len(primary.calls) == 1  # the probe went first, and failed over
    (route_span,) = named(spans, "rerank.route")
    attributes = dict(route_span.attributes or {})
    assert attributes["rerank.deployment"] == "backup"
    assert attributes["rerank.deployment.state"] == DeploymentState.HEALTHY.value
    assert [event.name for event in route_span.events] == ["fallback"]


async def test_a_call_that_waits_for_a_slot_has_a_span_for_the_wait(
    call: SpanHandle, spans: InMemorySpanExporter
) -> None:
    admission, _ = _flooded()
    waiting = asyncio.create_task(admission.wait_for_slot(_slot_wait(admission, "polite"), within=30))
    await _until(lambda: admission.waiting == 1)
    assert named(spans, "rerank.admission.wait") == []  # open while it waits

    admission.release(0, "flood")  # handed to the waiter
    await waiting

    (wait,) = named(spans, "rerank.admission.wait")
    assert _parent_id(wait) == int(call.span_id, 16)
    assert dict(wait.attributes or {}) == {"rerank.caller": "polite"}


async def test_a_wait_that_runs_out_says_the_call_was_refused_overloaded(
    call: SpanHandle, spans: InMemorySpanExporter
) -> None:
    admission, _ = _flooded()

    with pytest.raises(ServiceError):
        await admission.wait_for_slot(_slot_wait(admission, "polite"), within=DEADLINE_MARGIN + 0.005)

    (wait,) = named(spans, "rerank.admission.wait")
    assert dict(wait.attributes or {}) == {"rerank.caller": "polite", "error.type": "OVERLOADED"}


async def test_a_call_let_in_at_once_or_refused_without_waiting_has_no_wait_span(
    call: SpanHandle, spans: InMemorySpanExporter
) -> None:
    Admission(4, None, caller_max_share=0.5).enter(0, "polite", may_wait=True)
    admission, _ = _flooded()
    with pytest.raises(ServiceError):  # its deadline leaves no time to wait
        await admission.wait_for_slot(_slot_wait(admission, "polite"), within=0)

    assert named(spans, "rerank.admission.wait") == []
