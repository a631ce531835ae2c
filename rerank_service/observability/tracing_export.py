"""OpenTelemetry's SDK set up for the call path's spans (observability/tracing.py), and the
spans themselves; imported only when tracing is configured (the `otel` extra).

Configured the standard way: the endpoint from --otlp-endpoint or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT, the protocol from
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL (grpc unless
http/protobuf), the sampler from OTEL_TRACES_SAMPLER(_ARG) (parent-based, always on by
default), the resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. The SDK reads
most of them itself, once `_export` has refused what it would take with a warning, then
lose every span or sample every trace. Spans are exported in the background (a bounded
queue and a thread): a slow or absent collector costs a call nothing, and what cannot be
exported is counted.

A span is recorded here as plain values while it is open and handed to the SDK's batch
processor as its ReadableSpan when it ends: sampling, the resource, batching, the OTLP
encoding and export are the SDK's. The SDK's own Span (a lock, a validation and a
context per attribute) cost a call of three spans about 345 µs of CPU; this, 85 µs.
"""

from __future__ import annotations

import math
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

from opentelemetry.context import Context
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    OTELResourceDetector,
    Resource,
)
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from rerank_service import __version__
from rerank_service.config.pem import NO_CERTIFICATE, certificates_problem
from rerank_service.config.secret import Secret, maskable, url_named, url_secrets
from rerank_service.observability.logging import mask_also
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing import (
    Attributes,
    SpanHandle,
    make_current,
    otlp_protocol,
    restore,
    wall_ns,
)

if TYPE_CHECKING:
    import requests

DEFAULT_SERVICE_NAME = "rerank-service"
_SCOPE = "rerank_service"


class _Record:
    """A span while it is open: plain values. It becomes the SDK's ReadableSpan when it
    ends, for the batch processor and the OTLP exporter (the SDK's own Span would cost a
    call three times as much: a lock, validation and a context per attribute and span)."""

    __slots__ = (
        "attributes",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start",
        "status",
        "trace",
    )

    def __init__(
        self,
        name: str,
        trace: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start: int,
        links: Sequence[Link] = (),
    ) -> None:
        self.name = name
        self.trace = trace  # the span's own context (its trace id, span id, flags, state)
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.start = start
        self.links = links
        self.events: list[Event] = []
        self.status = _UNSET


_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class OtelSpan:
    """A recording span, current in the task that made it until it ends (SpanHandle)."""

    __slots__ = ("_token", "_tracing", "record")

    def __init__(self, tracing: OtelTracing, record: _Record) -> None:
        self._tracing = tracing
        self.record = record
        self._token: Token[SpanHandle | None] | None = make_current(self)

    @property
    def trace_id(self) -> str:
        return format(self.record.trace.trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.record.trace.span_id, "016x")

    def traceparent(self) -> str:
        trace = self.record.trace
        return f"00-{trace.trace_id:032x}-{trace.span_id:016x}-01"

    def set(self, key: str, value: str | bool | int | float | Sequence[str]) -> None:
        self.record.attributes[key] = value

    def set_many(self, attributes: Attributes) -> None:
        self.record.attributes.update(attributes)

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        self.record.events.append(Event(name, attributes, time.time_ns()))

    def fail(self, error_type: str) -> None:
        self.record.attributes["error.type"] = error_type
        self.record.status = Status(StatusCode.ERROR, error_type)

    def child(self, name: str, attributes: Attributes | None = None, *, client: bool = False) -> SpanHandle:
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        record = self._tracing.record(name, self.record.trace, kind, attributes, time.time_ns())
        return OtelSpan(self._tracing, record)

    def record_child(
        self, name: str, started: float, ended: float, attributes: Attributes | None = None
    ) -> None:
        record = self._tracing.record(
            name, self.record.trace, SpanKind.INTERNAL, attributes, wall_ns(started)
        )
        self._tracing.finish(record, wall_ns(ended))

    def end(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            restore(token)
        self._tracing.finish(self.record, time.time_ns())


class OtelTracing:
    """The call spans (CallTracer): sampled by the SDK's sampler (OTEL_TRACES_SAMPLER),
    handed as ReadableSpans to `processor` (the batch processor and the OTLP exporter)."""

    def __init__(self, processor: SpanProcessor, resource: Resource, sampler: Sampler) -> None:
        self._processor = processor
        self._resource = resource
        self._sampler = sampler
        self._scope = InstrumentationScope(_SCOPE, __version__)
        self.sampler = sampler.get_description()  # as the start's log line says it
        # Span and trace ids, random as the SDK's RandomIdGenerator makes them.
        self._random = random.Random()  # noqa: S311 - unique ids, not secrets

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
        name, attributes, server = call_span(method, item)
        kind = SpanKind.SERVER if server else SpanKind.INTERNAL
        links: Sequence[Link] = ()
        parent: SpanContext | None = None
        if item:
            # Recorded with its stream or not at all: sampled apart (each a root, the caller
            # having sent no context), an item's spans were recorded under the stream's span,
            # or an item as a server span of its own.
            if not isinstance(stream, OtelSpan):
                return None
            if traceparent is None:  # under its stream's span: the sampler follows the stream's
                parent = stream.record.trace
            else:
                links = (Link(stream.record.trace),)
        if parent is None and traceparent is not None:
            parent = remote_parent(traceparent, tracestate)
        if parent is None:
            parent_context, trace_id = None, self._random.getrandbits(128) or 1
        else:
            parent_context = set_span_in_context(NonRecordingSpan(parent))
            trace_id = parent.trace_id
        decision = self._sampler.should_sample(parent_context, trace_id, name, kind, attributes, links)
        if decision.decision is not Decision.RECORD_AND_SAMPLE:  # nothing below it is recorded either
            return None
        span_id = self._random.getrandbits(64) or 1
        own = SpanContext(trace_id, span_id, False, _SAMPLED, decision.trace_state)
        recorded = {**attributes, **peer_attributes(peer), **(decision.attributes or {})}
        return OtelSpan(self, _Record(name, own, parent, kind, recorded, wall_ns(started), links))

    def record(
        self, name: str, parent: SpanContext, kind: SpanKind, attributes: Attributes | None, start: int
    ) -> _Record:
        """A span under `parent`, in its trace."""
        own = SpanContext(
            parent.trace_id, self._random.getrandbits(64) or 1, False, _SAMPLED, parent.trace_state
        )
        return _Record(name, own, parent, kind, dict(attributes) if attributes else {}, start)

    def finish(self, record: _Record, end: int) -> None:
        """The span ended: to the processor, as the SDK's ReadableSpan."""
        self._processor.on_end(
            ReadableSpan(
                record.name,
                record.trace,
                record.parent,
                self._resource,
                record.attributes,
                record.events,
                record.links,
                record.kind,
                status=record.status,
                start_time=record.start,
                end_time=end,
                instrumentation_scope=self._scope,
            )
        )

    def shutdown(self, timeout: float) -> None:
        """Export what is queued, then stop; gives up after `timeout` seconds (a collector
        that does not answer must not hold a draining process)."""
        flushing = threading.Thread(target=self._processor.shutdown, name="otel-shutdown", daemon=True)
        flushing.start()
        flushing.join(timeout)


def start_tracing(
    otlp_endpoint: str | None,
    metrics: Metrics,
    *,
    worker: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> OtelTracing:
    """The tracer provider, exporting to `otlp_endpoint` (None: the OTEL_* variables'); a
    ValueError naming the OTEL_* variable the exporter or its queue cannot start with."""
    made, batching, sampler = _export(otlp_endpoint, environ)
    metrics.tracing_started()
    exporter = _CountingExporter(made, metrics)
    batches = BatchSpanProcessor(
        exporter,
        max_queue_size=batching.queue,
        schedule_delay_millis=batching.delay_ms,
        max_export_batch_size=batching.batch,
    )
    processor = _BoundedProcessor(batches, exporter, batching.queue, metrics)
    return OtelTracing(processor, _resource(worker), sampler)


def check_tracing(otlp_endpoint: str | None, environ: Mapping[str, str] = os.environ) -> None:
    """What `start_tracing` refuses, for check-config: the exporter made as it makes it (no
    connection: it is shut down unused) and its queue's settings; a ValueError."""
    exporter, _, _ = _export(otlp_endpoint, environ)
    exporter.shutdown()


class _Batching(NamedTuple):
    """The batch processor's settings (OTEL_BSP_*)."""

    queue: int
    batch: int
    delay_ms: int


def _export(otlp_endpoint: str | None, environ: Mapping[str, str]) -> tuple[SpanExporter, _Batching, Sampler]:
    """The OTLP exporter, the batch processor's settings and the sampler, or a ValueError
    naming the variable they cannot start with (the SDK's own errors name none, or none of
    ours; for some values it logs a warning and goes on, exporting nothing or everything)."""
    # Before the exporter is made: it parses the headers, and the SDK's lines go to the log.
    mask_also(exporter_secrets(environ))
    queue = _whole(environ, "OTEL_BSP_MAX_QUEUE_SIZE") or 2048
    batch = _whole(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    if batch is None:
        batch = min(512, queue)  # the SDK's default, which it refuses above a smaller queue
    elif batch > queue:
        raise ValueError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) must not be above OTEL_BSP_MAX_QUEUE_SIZE ({queue})"
        )
    batching = _Batching(queue, batch, _whole(environ, "OTEL_BSP_SCHEDULE_DELAY") or 5000)
    # Read by the gRPC exporter with float(), whose error names no variable.
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        seconds = environ.get(variable)
        if seconds is not None and not _number(seconds):
            raise ValueError(f"{variable} must be a number of seconds, got {seconds!r}")
    protocol = otlp_protocol(environ)  # a ValueError naming one it does not speak
    _check_endpoint(otlp_endpoint, protocol, environ)
    sampler = _sampler(environ)
    files = _tls_files(environ)
    try:
        return _exporter(otlp_endpoint, protocol, files, environ), batching, sampler
    except Exception as exc:  # the SDK's own checks: a compression it does not know (named)
        raise ValueError(f"the OTLP exporter cannot start: {exc}") from None


def _whole(environ: Mapping[str, str], variable: str) -> int | None:
    """`variable`'s whole number of 1 or more (None: not set), or a ValueError."""
    written = environ.get(variable, "").strip()
    if not written:
        return None
    try:
        value = int(written)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{variable} must be a whole number of 1 or more, got {written!r}")
    return value


def _number(written: str) -> bool:
    try:
        float(written)
    except ValueError:
        return False
    return True


# Where the OTLP exporter reads its headers (a collector's credentials, as often as not).
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# The headers whose values are credentials, by a word of their name (authorization,
# x-api-key, x-honeycomb-team, signoz-access-token, uptrace-dsn, x-apikey...). Others
# (x-scope-orgid=rerank, x-api-version=2026) are none: masked, they garbled every line
# holding the word or number.
_CREDENTIAL_WORDS = frozenset(
    {
        "authorization", "auth", "key", "apikey", "token", "secret", "password", "passwd",
        "pass", "team", "signature", "credential", "credentials", "cookie", "dsn",
    }
)  # fmt: skip


def _credential_header(name: str) -> bool:
    return any(word in _CREDENTIAL_WORDS for word in re.split(r"[-_.\s]+", unquote(name).strip().lower()))


def exporter_secrets(environ: Mapping[str, str]) -> list[Secret]:
    """The exporter's credentials, for the log's masking (an export error may quote what the
    collector got): each header's value in HEADER_VARIABLES, as written and percent-decoded,
    and its token alone (`Bearer TOKEN`), an entry written `name: value` included; and the
    password of an endpoint's URL."""
    values: list[str] = []
    for variable in HEADER_VARIABLES:
        for entry in environ.get(variable, "").split(","):
            name, equals, value = entry.partition("=")
            if not equals:  # `authorization: Bearer ...`: malformed, and as secret
                name, _, value = name.partition(":")
            if not _credential_header(name):
                continue
            for each in (value.strip(), unquote(value).strip()):
                values += [each, each.split(maxsplit=1)[-1] if each else ""]
    found = [Secret(value) for value in dict.fromkeys(values) if maskable(value)]
    for variable in ENDPOINT_VARIABLES:
        found += url_secrets(environ.get(variable, "").strip())
    return found


# gRPC's own name resolvers, whose targets are no http(s) URL (the SDK dials them as written).
_GRPC_TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:")


def _check_endpoint(otlp_endpoint: str | None, protocol: str, environ: Mapping[str, str]) -> None:
    """The endpoint the exporter sends to, found as the SDK's exporters find it (the first
    set of --otlp-endpoint, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT),
    checked as otlp-endpoint is (config/settings.py): an http(s) URL with a host, the port a
    number, or over gRPC a target as grpc takes it (`collector:4317`). The SDK takes
    `ftp://...` and every export fails. Over gRPC a URL holds no user or password: the gRPC
    exporter would dial `user:password@host:port`."""
    found = ("otlp-endpoint", otlp_endpoint) if otlp_endpoint else _first(environ, ENDPOINT_VARIABLES[::-1])
    if found is None:
        return
    source, endpoint = found
    shown = url_named(endpoint)  # never the password
    if protocol == "grpc" and (
        "://" not in endpoint or endpoint.strip().lower().startswith(_GRPC_TARGET_SCHEMES)
    ):
        # A gRPC target as grpc dials it (collector:4317, dns:///..., unix:...), the SDK keeps
        # it as written: over TLS unless OTEL_EXPORTER_OTLP_INSECURE=true (OTel's own rule).
        return
    try:
        parts = urlsplit(endpoint.strip())
        _ = parts.port
    except ValueError:  # a port that is no number, an unbalanced [ of an IPv6 host
        raise ValueError(f"{source} has an invalid port or host, got {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{source} must be an http(s) URL such as http://otel-collector:4317, got {shown!r}")
    if protocol == "grpc" and "@" in parts.netloc:
        raise ValueError(
            f"{source} holds a user or password, which OTLP/gRPC cannot send: give it as a header, "
            f"OTEL_EXPORTER_OTLP_HEADERS=authorization=Basic%20<base64 of user:password>, got {shown!r}"
        )


# OTEL_TRACES_SAMPLER's values: the SDK's own samplers, named as it reads them (lower-cased).
# It takes any other name (a typo, jaeger_remote, xray), or a ratio that is no number from 0
# to 1, for sampling every trace, with a warning; here they are refused.
_SAMPLERS: dict[str, Sampler] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": DEFAULT_ON,
    "parentbased_always_off": DEFAULT_OFF,
}
_RATIO_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "traceidratio": TraceIdRatioBased,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}


def _sampler(environ: Mapping[str, str]) -> Sampler:
    """The sampler OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG name (parent-based, always
    on when unset; a ratio of 1 when its argument is unset), or a ValueError naming them."""
    written = environ.get("OTEL_TRACES_SAMPLER", "")
    name = written.strip().lower() or "parentbased_always_on"
    fixed = _SAMPLERS.get(name)
    if fixed is not None:
        return fixed
    ratio = _RATIO_SAMPLERS.get(name)
    if ratio is None:
        known = ", ".join([*_SAMPLERS, *_RATIO_SAMPLERS])
        raise ValueError(f"OTEL_TRACES_SAMPLER must be one of {known}, got {written!r}")
    argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not argument:
        return ratio(1.0)  # OpenTelemetry's default for a ratio sampler
    try:
        rate = float(argument)
    except ValueError:
        rate = math.nan
    if not 0 <= rate <= 1:  # nan and inf too
        raise ValueError(
            f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1 for {name} (0.01: 1% of traces), "
            f"got {argument!r}"
        )
    return ratio(rate)


class _TlsFiles(NamedTuple):
    """The exporter's TLS files, as the HTTP exporter reads them (the traces' variable first)."""

    ca: str | None
    certificate: str | None
    key: str | None


_CA_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
_CERTIFICATE_VARIABLES = (
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
)
_KEY_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY")


def _tls_files(environ: Mapping[str, str]) -> _TlsFiles:
    """The exporter's CA, client certificate and key files, each one set checked now: a file
    it cannot read, that holds no PEM certificate, or a key that does not go with its
    certificate is a ValueError naming its variable. The SDK reads them as it exports: over
    http/protobuf every export then fails; over gRPC it trusts the system's CAs instead."""
    for variable in (*_CA_VARIABLES, *_CERTIFICATE_VARIABLES, *_KEY_VARIABLES):
        path = environ.get(variable)
        if path:
            _check_file(variable, path, certificates=variable not in _KEY_VARIABLES)
    ca, certificate, key = (
        _first(environ, each) for each in (_CA_VARIABLES, _CERTIFICATE_VARIABLES, _KEY_VARIABLES)
    )
    if key is not None and certificate is None:
        raise ValueError(f"{key[0]} is set without OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
    if certificate is not None:
        try:
            # The password callback keeps OpenSSL from ever prompting on the terminal.
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                certificate[1], None if key is None else key[1], password=lambda: b""
            )
        except (ssl.SSLError, OSError):
            variable, path = key or certificate
            raise ValueError(
                f"{variable} {path}: holds no unencrypted PEM private key of the client certificate "
                f"({certificate[0]})"
            ) from None
    return _TlsFiles(*(None if found is None else found[1] for found in (ca, certificate, key)))


def _check_file(variable: str, path: str, *, certificates: bool) -> None:
    """`path` can be read and, for `certificates`, holds a PEM certificate; a ValueError."""
    if certificates:
        problem = certificates_problem(path)
        if problem == NO_CERTIFICATE:
            raise ValueError(f"{variable} {path}: {NO_CERTIFICATE}")
        if problem is not None:
            raise ValueError(f"{variable} {path}: cannot read it ({problem})")
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{variable} {path}: cannot read it ({exc.strerror or exc})") from None


def _first(environ: Mapping[str, str], variables: Sequence[str]) -> tuple[str, str] | None:
    """The first of `variables` set, and its value (as the SDK reads them: an empty one is unset)."""
    return next(((variable, environ[variable]) for variable in variables if environ.get(variable)), None)


def _exporter(
    otlp_endpoint: str | None, protocol: str, files: _TlsFiles, environ: Mapping[str, str]
) -> SpanExporter:
    if protocol == "http/protobuf":  # else grpc
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # As OTEL_EXPORTER_OTLP_ENDPOINT is read: the base URL, the signal's path added.
        endpoint = None if otlp_endpoint is None else otlp_endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(
            endpoint=endpoint,
            certificate_file=files.ca,
            client_key_file=files.key,
            client_certificate_file=files.certificate,
            session=_http_session(environ),
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=otlp_endpoint)


# Where the SDK finds a requests.Session of a package's own (an entry point's name).
_SESSION_PROVIDERS = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
)


def _http_session(environ: Mapping[str, str]) -> requests.Session | None:
    """The HTTP exporter's session, whose CA file (OTEL_EXPORTER_OTLP_CERTIFICATE) the
    environment cannot replace; None where a credential provider gives the SDK one."""
    if any(environ.get(variable) for variable in _SESSION_PROVIDERS):
        return None
    import requests  # the HTTP exporter's own client: loaded with it only

    class _OwnCaSession(requests.Session):
        """requests takes REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE over a session's own CA file:
        the configured one is kept. The environment's proxies still apply (HTTPS_PROXY,
        NO_PROXY), as they do over gRPC."""

        def merge_environment_settings(
            self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
        ) -> Any:  # requests' types name its own TypedDict, which exists for checkers only
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if isinstance(self.verify, str):  # a CA file was configured (else True: the defaults)
                merged["verify"] = self.verify
            return merged

    return _OwnCaSession()


def _resource(worker: int | None) -> Resource:
    """This process: the service's name (OTEL_SERVICE_NAME, else rerank-service), version,
    instance (host and pid) and worker; OTEL_RESOURCE_ATTRIBUTES adds to it or overrides."""
    own: dict[str, str | int] = {
        SERVICE_NAME: DEFAULT_SERVICE_NAME,
        SERVICE_VERSION: __version__,
        SERVICE_INSTANCE_ID: f"{socket.gethostname()}/{os.getpid()}",
    }
    if worker is not None:
        own["rerank.worker"] = worker
    # The SDK's own (telemetry.sdk.*), then ours, then the operator's variables over both.
    return _ProcessResource(Resource.create().merge(Resource(own)).merge(OTELResourceDetector().detect()))


class _ProcessResource(Resource):
    """The process's resource, hashed once: the OTLP encoder hashes the resource of every
    span it encodes, and Resource's hash is a JSON dump of every attribute (9 µs a span,
    a sixth of its encoding)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class _CountingExporter(SpanExporter):
    """The exporter, with what it exported and failed to export counted (a collector
    that is down loses spans, never calls: the loss shows on /metrics)."""

    def __init__(self, exporter: SpanExporter, metrics: Metrics) -> None:
        self._exporter = exporter
        self._metrics = metrics
        self._lock = threading.Lock()
        self.in_flight = 0  # ended, not yet exported or dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._exporter.export(spans)
        except Exception:  # an exporter bug loses a batch, not the processor's thread
            result = SpanExportResult.FAILURE
        self.settled(len(spans))
        if result is SpanExportResult.SUCCESS:
            self._metrics.count_trace_spans(exported=len(spans))
        else:
            self._metrics.count_trace_spans(dropped=len(spans), reason="export_failed")
        return result

    def queued(self) -> int:
        with self._lock:
            self.in_flight += 1
            return self.in_flight

    def settled(self, count: int) -> None:
        with self._lock:
            self.in_flight -= count

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """The batch processor, behind a count of the spans it holds: past its queue's size a
    span is dropped here, and counted, instead of silently inside the SDK."""

    def __init__(
        self, processor: SpanProcessor, exporter: _CountingExporter, capacity: int, metrics: Metrics
    ) -> None:
        self._processor = processor
        self._exporter = exporter
        self._capacity = capacity
        self._metrics = metrics

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        pass  # the batch processor does nothing on start either

    def on_end(self, span: ReadableSpan) -> None:
        if self._exporter.queued() > self._capacity:
            self._exporter.settled(1)
            self._metrics.count_trace_spans(dropped=1, reason="queue_full")
            return
        self._processor.on_end(span)

    def shutdown(self) -> None:
        self._processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)


def remote_parent(traceparent: str, tracestate: str | None) -> SpanContext:
    """The caller's span, from its traceparent (validated: observability/trace_context.py)."""
    return SpanContext(
        trace_id=int(traceparent[3:35], 16),
        span_id=int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(traceparent[53:55], 16)),
        trace_state=TraceState.from_header([tracestate]) if tracestate else None,
    )


_CALL_SPANS: dict[tuple[str, bool], tuple[str, dict[str, str], bool]] = {}


def call_span(method: str, item: bool) -> tuple[str, dict[str, str], bool]:
    """A call's span name, attributes and whether it is a server span, from the pipeline's
    method name: `/rerank.v1.RerankService/Rerank` (gRPC: the OpenTelemetry RPC
    conventions) or `HTTP POST /v1/rerank` (the HTTP conventions). A RerankStream item
    (`item`) is an internal span of its own, under its stream's or linked to it."""
    known = _CALL_SPANS.get((method, item))
    if known is not None:
        return known
    if method.startswith("HTTP "):
        verb, _, route = method[5:].partition(" ")
        made = f"{verb} {route}", {"http.request.method": verb, "http.route": route}, True
    else:
        service, _, rpc = method.strip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        made = (
            (f"{service}/{rpc} item", attributes, False) if item else (f"{service}/{rpc}", attributes, True)
        )
    if len(_CALL_SPANS) < 256:  # the methods are few; a bound all the same
        _CALL_SPANS[method, item] = made
    return made


_PEERS: dict[str, dict[str, Any]] = {}


def peer_attributes(peer: str) -> dict[str, Any]:
    """`ipv4:127.0.0.1:5000`, `ipv6:%5B::1%5D:5000` (grpc: a URI, its brackets
    percent-encoded) or `127.0.0.1` (aiohttp) as the network.peer.* attributes."""
    known = _PEERS.get(peer)
    if known is not None:
        return known
    address = unquote(peer.partition(":")[2]) if peer.startswith(("ipv4:", "ipv6:")) else ""
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit():  # the port: a client's ephemeral one, not worth its export
        made: dict[str, Any] = {"network.peer.address": host.strip("[]")}
    else:
        made = {"network.peer.address": peer} if peer else {}
    if len(_PEERS) > 4096:  # callers' ports change with every connection
        _PEERS.clear()
    _PEERS[peer] = made
    return made
