"""The spans of each call: what the call path asks of OpenTelemetry tracing.

The call pipeline opens one span per call (`CallTracer.open_call`) and makes it current for
the call's task; everything the call does below it (the route's choice, each upstream
attempt, a local model's queue and forward pass) asks `child()` for a span under the
current one. With tracing off, or a call not sampled, no span is current: `child()` is a
ContextVar read that returns None, and nothing of OpenTelemetry is imported
(tracing_export.py sets the SDK up, only when tracing is configured).

A span never carries the query, the documents or a key: names, counts, codes and reasons.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

Attributes = Mapping[str, str | bool | int | float | Sequence[str]]

# time.time_ns() - time.perf_counter_ns(): a span timed by perf_counter (the batcher's
# queue and forward pass, a call's start) is placed on the wall clock.
_WALL_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def wall_ns(perf_seconds: float) -> int:
    """A time.perf_counter() reading as nanoseconds since the epoch."""
    return int(perf_seconds * 1e9) + _WALL_OFFSET_NS


class SpanHandle(Protocol):
    """A recording span of the current call (tracing_export.py's), current in its task
    from when it is made until it ends."""

    @property
    def trace_id(self) -> str: ...

    @property
    def span_id(self) -> str: ...

    def traceparent(self) -> str:
        """This span as a W3C traceparent (an upstream's request carries it: its spans join
        the trace under this one)."""
        ...

    def set(self, key: str, value: str | bool | int | float | Sequence[str]) -> None: ...

    def set_many(self, attributes: Attributes) -> None: ...

    def event(self, name: str, attributes: Attributes | None = None) -> None: ...

    def fail(self, error_type: str) -> None:
        """Mark the span failed with `error_type` (a code or reason: never a message, which
        may repeat what the caller sent)."""
        ...

    def child(self, name: str, attributes: Attributes | None = None, *, client: bool = False) -> SpanHandle:
        """A span under this one, current from now until it ends."""
        ...

    def record_child(
        self, name: str, started: float, ended: float, attributes: Attributes | None = None
    ) -> None:
        """A span under this one that happened elsewhere (the batcher's task): `started`
        and `ended` are time.perf_counter() readings."""
        ...

    def end(self) -> None:
        """End the span, and make its parent current again where it was made current."""
        ...


class CallTracer(Protocol):
    """The process's tracer: a span per call (tracing_export.py's `OtelTracing`)."""

    sampler: str  # the sampler it samples with, described (its ratio included)

    def open_call(
        self,
        method: str,
        peer: str,
        traceparent: str | None,
        tracestate: str | None,
        started: float,
        *,
        item: bool = False,
        stream: SpanHandle | None = None,
    ) -> SpanHandle | None:
        """The call's span, under the caller's trace context when it sent one, made current;
        None when not sampled. `item`: a RerankStream item, recorded only with its stream
        (`stream`: the stream's span, None when the stream is not sampled): under the
        stream's span, or under the caller's context and linked to the stream's span."""
        ...

    def shutdown(self, timeout: float) -> None:
        """Export what is queued (within `timeout` seconds), then stop."""
        ...


_current: contextvars.ContextVar[SpanHandle | None] = contextvars.ContextVar("rerank_span", default=None)


def current() -> SpanHandle | None:
    """The current call's innermost recording span, or None (tracing off, not sampled,
    outside a call)."""
    return _current.get()


def child(name: str, attributes: Attributes | None = None, *, client: bool = False) -> SpanHandle | None:
    """A span under the current one (None when there is none): end it with `.end()`."""
    parent = _current.get()
    return None if parent is None else parent.child(name, attributes, client=client)


def upstream_traceparent(callers: str | None) -> str | None:
    """What an upstream request carries as its traceparent: the current span's (its spans
    join the trace under that attempt) or, with none recording, the caller's as it came."""
    active = _current.get()
    return callers if active is None else active.traceparent()


def make_current(span: SpanHandle | None) -> contextvars.Token[SpanHandle | None]:
    """Make `span` the current one (tracing_export.py, for a span it makes); None: none (a
    call not sampled, in a context where its stream's span is current)."""
    return _current.set(span)


def restore(token: contextvars.Token[SpanHandle | None]) -> None:
    """Make current again what was before `token`'s span, where that span was made current."""
    # Ended from another context (a stream's generator): nothing there to restore.
    with contextlib.suppress(ValueError):
        _current.reset(token)


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP protocol spans are exported with: grpc (the default) or http/protobuf, from
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL; ValueError for any
    other (http/json: the SDK has no such exporter). Read without importing OpenTelemetry,
    so that check-config refuses what serve would."""
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    chosen = (protocol or "grpc").strip().lower()
    if chosen not in ("grpc", "http/protobuf"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got {protocol!r}")
    return chosen


def tracing_wanted(otlp_endpoint: str | None, environ: Mapping[str, str]) -> bool:
    """Whether spans are exported: an endpoint is configured (--otlp-endpoint, or the
    standard variables) and the SDK is not switched off (OTEL_SDK_DISABLED,
    OTEL_TRACES_EXPORTER=none). Off, nothing of OpenTelemetry is even imported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        otlp_endpoint
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
