"""A real trace backend for the tests: Jaeger v2 (all-in-one, in-memory) on free loopback ports.

The `jaeger` binary is built from its Go module, pinned in tests/support/jaeger/go.mod, by
`make jaeger` (.ci/tools/install-go-tools.sh) into .ci/tools/go/bin. It takes OTLP over gRPC
and HTTP and answers its query API (`/api/traces`, Jaeger's v1 JSON), which `trace` and
`traces` poll until the spans a test waits for are there, read as `JaegerSpan` values.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
JAEGER_BINARY = ROOT / ".ci" / "tools" / "go" / "bin" / "jaeger"
CONFIG = Path(__file__).parent / "jaeger" / "config.yaml"
MISSING = f"{JAEGER_BINARY.relative_to(ROOT)} is missing: run `make jaeger` (.ci/tools/install-go-tools.sh)"
POLL_INTERVAL = 0.05


def jaeger_binary() -> Path | None:
    return JAEGER_BINARY if JAEGER_BINARY.is_file() and os.access(JAEGER_BINARY, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on loopback `port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class JaegerSpan:
    """One span as Jaeger's query API gives it back, with OTLP's names where it renamed them."""

    trace_id: str  # 32 lowercase hex (Jaeger prints 16 when the high half is zero)
    span_id: str  # 16 lowercase hex
    # From the CHILD_OF reference in the same trace. Jaeger writes a span's parent and its
    # links as one list of references, and a link to the parent itself replaces the parent's
    # CHILD_OF with a FOLLOWS_FROM: such a span reads as no parent and that one link.
    parent_span_id: str | None
    links: tuple[tuple[str, str], ...]  # (trace_id, span_id) of every other reference
    name: str
    kind: str | None  # the span.kind tag: "server", "client", "internal", ...
    attributes: dict[str, object]  # the tags
    status: str | None  # otel.status_code: "ERROR", "OK", or None (unset)
    events: tuple[str, ...]  # the logs' event names
    service: str  # the process's serviceName
    resource: dict[str, object]  # the process's tags
    start_us: int
    duration_us: int

    def __str__(self) -> str:
        parent = self.parent_span_id or "-"
        return (
            f"{self.service}:{self.name} span={self.span_id} parent={parent} kind={self.kind} "
            f"status={self.status} links={list(self.links)} attributes={self.attributes}"
        )


def _trace_id(raw: str) -> str:
    """Jaeger prints a trace id whose high 64 bits are zero in 16 digits: OTLP's 32, lowercase."""
    return raw.lower().zfill(32)


def _span_id(raw: str) -> str:
    return raw.lower().zfill(16)


def _tags(tags: list[dict[str, Any]] | None) -> dict[str, object]:
    return {tag["key"]: tag.get("value") for tag in tags or ()}


def _span(raw: Mapping[str, Any], processes: Mapping[str, Any]) -> JaegerSpan:
    trace_id = _trace_id(raw["traceID"])
    parent: str | None = None
    links: list[tuple[str, str]] = []
    for reference in raw.get("references") or ():
        target = (_trace_id(reference["traceID"]), _span_id(reference["spanID"]))
        if parent is None and reference.get("refType") == "CHILD_OF" and target[0] == trace_id:
            parent = target[1]
        else:
            links.append(target)
    tags = _tags(raw.get("tags"))
    kind = tags.get("span.kind")
    status = tags.get("otel.status_code")
    events = tuple(
        str(fields["event"])
        for fields in (_tags(log.get("fields")) for log in raw.get("logs") or ())
        if "event" in fields
    )
    process = processes.get(raw.get("processID", ""), {})
    return JaegerSpan(
        trace_id=trace_id,
        span_id=_span_id(raw["spanID"]),
        parent_span_id=parent,
        links=tuple(links),
        name=raw["operationName"],
        kind=str(kind) if kind is not None else None,
        attributes=tags,
        status=str(status) if status is not None else None,
        events=events,
        service=process.get("serviceName", ""),
        resource=_tags(process.get("tags")),
        start_us=int(raw["startTime"]),
        duration_us=int(raw["duration"]),
    )


def parse_traces(document: Mapping[str, Any]) -> list[list[JaegerSpan]]:
    """The traces of one query answer (`{"data": [{"spans": [...], "processes": {...}}]}`),
    each as its spans ordered by start time."""
    traces = []
    for trace in document.get("data") or ():
        processes = trace.get("processes") or {}
        spans = [_span(span, processes) for span in trace.get("spans") or ()]
        traces.append(sorted(spans, key=lambda span: (span.start_us, span.span_id)))
    return traces


def _flat(traces: list[list[JaegerSpan]]) -> list[JaegerSpan]:
    return [span for trace in traces for span in trace]


def _has_spans(spans: list[JaegerSpan]) -> bool:
    return bool(spans)


def _describe(traces: list[list[JaegerSpan]]) -> str:
    if not traces:
        return "  (nothing)"
    return "\n".join(
        f"  trace {spans[0].trace_id if spans else '?'}:\n" + "\n".join(f"    {span}" for span in spans)
        for spans in traces
    )


class JaegerServer:
    """`with JaegerServer() as jaeger:` a started Jaeger; exporters send to `otlp_*_endpoint`."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        binary = jaeger_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self._binary = binary
        self.start_timeout = start_timeout
        self.otlp_grpc_port = _free_port()
        self.otlp_http_port = _free_port()
        self.query_port = _free_port()
        self._directory = Path(tempfile.mkdtemp(prefix="jaeger-test-"))
        self._log_path = self._directory / "jaeger.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.query_url, timeout=5.0)

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.otlp_grpc_port}"

    @property
    def otlp_http_endpoint(self) -> str:
        """The base URL: an exporter given it as OTEL_EXPORTER_OTLP_ENDPOINT adds /v1/traces."""
        return f"http://127.0.0.1:{self.otlp_http_port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    @property
    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def start(self) -> None:
        """Start it and wait until the query API answers and both OTLP receivers listen."""
        assert self.process is None, "already started"
        environment = {
            **os.environ,
            "JAEGER_TEST_OTLP_GRPC": f"127.0.0.1:{self.otlp_grpc_port}",
            "JAEGER_TEST_OTLP_HTTP": f"127.0.0.1:{self.otlp_http_port}",
            "JAEGER_TEST_QUERY_HTTP": f"127.0.0.1:{self.query_port}",
            "JAEGER_TEST_QUERY_GRPC": "127.0.0.1:0",  # unused: any free port
        }
        with self._log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self._binary), "--config", f"file:{CONFIG}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self._directory,
            )
        wait_until(self._ready, timeout=self.start_timeout, interval=POLL_INTERVAL, what=self._what())

    def _what(self) -> str:
        return (
            f"jaeger (OTLP gRPC :{self.otlp_grpc_port}, OTLP HTTP :{self.otlp_http_port}, "
            f"query :{self.query_port}) ready; its log:\n{self.log}"
        )

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"jaeger exited with code {self.process.returncode}:\n{self.log}")
        # The receivers start after the extensions (the query API): both listening means all up.
        if not (listening(self.otlp_grpc_port) and listening(self.otlp_http_port)):
            return False
        try:
            return self._client.get("/api/services").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> list[list[JaegerSpan]]:
        answer = self._client.get(path, params=params)
        if answer.status_code == 404:  # a trace not (yet) stored
            return []
        answer.raise_for_status()
        return parse_traces(answer.json())

    def trace(
        self,
        trace_id: str,
        *,
        until: Callable[[list[JaegerSpan]], bool] = _has_spans,
        timeout: float = 30.0,
    ) -> list[JaegerSpan]:
        """The spans of one trace (32 hex digits), polled until `until(spans)` holds.

        Export is asynchronous, so a test names what it waits for (e.g. five spans); the
        timeout bounds a broken exporter, and its error shows what Jaeger had."""
        found = self._poll(
            lambda: self._get(f"/api/traces/{trace_id.lower()}"),
            lambda seen: until(_flat(seen)),
            timeout,
            f"trace {trace_id}",
        )
        return _flat(found)

    def traces(
        self,
        service: str,
        *,
        until: Callable[[list[list[JaegerSpan]]], bool],
        timeout: float = 30.0,
    ) -> list[list[JaegerSpan]]:
        """Every stored trace with a span of `service` (the query API's default lookback: two
        days), polled until `until` holds."""
        return self._poll(
            lambda: self._get("/api/traces", {"service": service, "limit": "10000"}),
            until,
            timeout,
            f"traces of service {service!r}",
        )

    @staticmethod
    def _poll(
        fetch: Callable[[], list[list[JaegerSpan]]],
        until: Callable[[list[list[JaegerSpan]]], bool],
        timeout: float,
        what: str,
    ) -> list[list[JaegerSpan]]:
        """`fetch()` again and again until `until` holds of what it gave; on the timeout, an
        AssertionError showing what Jaeger had last."""
        seen: list[list[JaegerSpan]] = []

        def holds() -> bool:
            nonlocal seen
            seen = fetch()
            return until(seen)

        if not wait_until(holds, timeout, POLL_INTERVAL):
            held = _describe(seen)
            raise AssertionError(
                f"{what} in jaeger: the condition did not hold within {timeout:g} s; it had:\n{held}"
            )
        return seen

    def __enter__(self) -> JaegerServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.stop()
        self._client.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
