"""Prometheus metrics.

Metrics are declared once here and recorded where things happen: the gRPC edge
(calls, from the outcome each call returns), the upstream transport (HTTP attempts),
the micro-batcher (model batches). Every metric lives in the module-level REGISTRY (not prometheus-client's
global one), so tests and several servers in one process do not collide.

With `serve --workers N` each worker process records into files under
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, chosen when this module
is first imported) and the supervisor serves their sum (`multiprocess_registry`).
Every gauge therefore names how workers' values combine (`multiprocess_mode`).

The service is a hop on every search request, so recording stays cheap: label
children are bound once per method, code or status and cached (`.labels()` hashes
and locks on every call), and nothing here awaits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from rerank_service.observability.process_tree import ProcessTreeCollector, WorkerProcess

# prometheus-client reads the same variable once, when it is imported: values go to files.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REGISTRY = CollectorRegistry(auto_describe=True)
# The process's CPU, memory and file descriptors, the Python version and GC: scraped,
# never recorded on the hot path.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Seconds: from a 1 ms cached answer to a stream that runs for minutes.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# The hosted API takes up to 500 documents a call; the service splits up to --max-documents.
DOCUMENT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)
TOKEN_BUCKETS = (
    100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 120_000, 250_000, 500_000, 1_000_000,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Waiting in the micro-batcher is usually about --batch-wait-ms (2 ms); seconds mean overload.
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- calls (recorded by the call pipeline: pipeline/call.py) ---
CALLS = Counter(
    "rerank_calls",
    "RerankService calls answered, by method and gRPC status code "
    "(method RerankStream/item: one stream item).",
    ["method", "code"],
    registry=REGISTRY,
)
CALL_LATENCY = Histogram(
    "rerank_call_latency_seconds",
    "Time from a call's arrival to its answer, by method (RerankStream: the whole stream).",
    ["method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
CALLS_IN_FLIGHT = Gauge(
    "rerank_calls_in_flight",
    "RerankService calls being served now, by method (RerankStream: open streams).",
    ["method"],
    registry=REGISTRY,
    multiprocess_mode="livesum",  # workers: the sum over live workers; a dead one's calls ended
)
DOCUMENTS = Histogram(
    "rerank_documents_per_call",
    "Documents in one Rerank call or stream item.",
    buckets=DOCUMENT_BUCKETS,
    registry=REGISTRY,
)
TOKENS = Histogram(
    "rerank_tokens_per_call",
    "usage.total_tokens of one successful Rerank call or stream item.",
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)

# --- upstream backend (recorded by UpstreamTransport.post_json, once per HTTP attempt) ---
UPSTREAM_REQUESTS = Counter(
    "rerank_upstream_requests",
    "HTTP requests to the upstream, by outcome: the HTTP status, or connect_error, timeout, "
    "pool_timeout, reset, protocol_error, transport_error, too_large, cancelled.",
    ["status"],
    registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "rerank_upstream_latency_seconds",
    "Time of one HTTP request to the upstream, whatever its outcome.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "rerank_upstream_retries",
    "Upstream attempts repeated after a retryable failure, by the failure's reason.",
    ["reason"],
    registry=REGISTRY,
)
UPSTREAM_RETRIES_REFUSED = Counter(
    "rerank_upstream_retries_refused",
    "Upstream retries not made because the route's retry budget was spent.",
    registry=REGISTRY,
)

# --- routes and deployments (recorded by routing/) ---
DEPLOYMENT_CALLS = Counter(
    "rerank_deployment_calls",
    "Backend calls (one per chunk) a deployment answered, by route, deployment and outcome "
    "(OK or the gRPC code of the failure).",
    ["route", "deployment", "code"],
    registry=REGISTRY,
)
DEPLOYMENT_LATENCY = Histogram(
    "rerank_deployment_latency_seconds",
    "Time a deployment took for one backend call, retries included, whatever its outcome.",
    ["route", "deployment"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
DEPLOYMENT_STATE = Gauge(
    "rerank_deployment_state",
    "A deployment's health: 0 healthy, 1 ejected (tried last), 2 down (refused but for probes).",
    ["deployment"],
    registry=REGISTRY,
    multiprocess_mode="livemax",  # workers: the worst state any live worker sees
)
DEPLOYMENT_EJECTIONS = Counter(
    "rerank_deployment_ejections",
    "Times a deployment was ejected or went down.",
    ["deployment", "state"],
    registry=REGISTRY,
)
ROUTE_FALLBACKS = Counter(
    "rerank_route_fallbacks",
    "Calls moved to another deployment of their route after a failure.",
    ["route"],
    registry=REGISTRY,
)
ROUTE_BUDGET_EXHAUSTED = Counter(
    "rerank_route_retry_budget_exhausted",
    "Fallbacks not made because the route's retry budget was spent.",
    ["route"],
    registry=REGISTRY,
)

# --- local backend (recorded by the micro-batcher) ---
BATCH_SIZE = Histogram(
    "rerank_local_batch_size",
    "Query-document pairs in one model batch.",
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "rerank_local_queue_seconds",
    "Time a request waited in the micro-batcher before its first batch started.",
    buckets=QUEUE_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_TIME = Histogram(
    "rerank_local_inference_seconds",
    "Time one model batch ran.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)

# The `method` label of stream items: each item is a rerank of its own, counted as a call.
STREAM_ITEM_METHOD = "RerankStream/item"


def count_upstream_retry(reason: str) -> None:
    UPSTREAM_RETRIES.labels(reason=reason).inc()


def count_upstream_retry_refused() -> None:
    UPSTREAM_RETRIES_REFUSED.inc()


def count_fallback(route: str) -> None:
    ROUTE_FALLBACKS.labels(route=route).inc()


def count_retry_budget_exhausted(route: str) -> None:
    ROUTE_BUDGET_EXHAUSTED.labels(route=route).inc()


class DeploymentMetrics:
    """One deployment's metric children, bound once per route and outcome."""

    __slots__ = ("_calls", "_latency", "_state", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._state: str | None = None
        self._calls: dict[tuple[str, grpc.StatusCode | None], Counter] = {}
        self._latency: dict[str, Histogram] = {}

    def finished(self, route: str, code: grpc.StatusCode | None, seconds: float) -> None:
        """One backend call ended: `code` None for a success."""
        calls = self._calls.get((route, code))
        if calls is None:
            label = "OK" if code is None else code_name(code)
            calls = self._calls[(route, code)] = DEPLOYMENT_CALLS.labels(route, self.name, label)
        calls.inc()
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = DEPLOYMENT_LATENCY.labels(route, self.name)
        latency.observe(seconds)

    def set_state(self, state: str, level: int) -> None:
        """The deployment is now in `state`, whose gauge value is `level` (0: healthy)."""
        if state == self._state:
            return
        if level:
            DEPLOYMENT_EJECTIONS.labels(self.name, state).inc()
        self._state = state
        DEPLOYMENT_STATE.labels(self.name).set(level)


class MethodMetrics:
    """One method's metric children, bound once: recording a call is then a few locked adds.

    Calls in flight are a plain count. In one process it is read when /metrics is scraped
    (Gauge.set_function): two adds without a lock instead of two locked gauge updates per
    call; only the event loop's thread writes it, the scrape thread only reads. With
    workers the scrape happens in the supervisor, which reads only the workers' files
    (set_function cannot reach them): the gauge is then also updated per call (`_gauge`).
    """

    __slots__ = ("_calls", "_gauge", "in_flight", "latency", "name")

    def __init__(self, name: str, multiprocess_mode: bool = MULTIPROCESS) -> None:
        self.name = name
        self.in_flight = 0
        self.latency = CALL_LATENCY.labels(name)
        self._calls: dict[grpc.StatusCode | int, Counter] = {}
        gauge = CALLS_IN_FLIGHT.labels(name)
        self._gauge: Gauge | None = gauge if multiprocess_mode else None
        if not multiprocess_mode:
            gauge.set_function(lambda: self.in_flight)

    def started(self) -> None:
        self.in_flight += 1
        if self._gauge is not None:
            self._gauge.inc()

    def finished(
        self, code: grpc.StatusCode | int, seconds: float, documents: int | None, tokens: int | None
    ) -> None:
        """Count a call that ended (and was counted by `started`)."""
        self.in_flight -= 1
        if self._gauge is not None:
            self._gauge.dec()
        calls = self._calls.get(code)
        if calls is None:
            calls = self._calls[code] = CALLS.labels(self.name, code_name(code))
        calls.inc()
        self.latency.observe(seconds)
        if documents is not None:
            DOCUMENTS.observe(documents)
        if tokens is not None:
            TOKENS.observe(tokens)


_methods: dict[str, MethodMetrics] = {}


def for_method(method: str) -> MethodMetrics:
    """The metrics of a gRPC method path (`/rerank.v1.RerankService/Rerank` → label `Rerank`)."""
    found = _methods.get(method)
    if found is None:
        found = _methods[method] = MethodMetrics(method.rsplit("/", 1)[-1])
    return found


def for_http_route(path: str) -> MethodMetrics:
    """The metrics of an HTTP front-door route (`/v1/rerank` → label `HTTP /v1/rerank`)."""
    label = f"HTTP {path}"
    found = _methods.get(label)
    if found is None:
        found = _methods[label] = MethodMetrics(label)
    return found


STREAM_ITEMS = MethodMetrics(STREAM_ITEM_METHOD)


def code_name(code: grpc.StatusCode | int) -> str:
    """`OK`, `INVALID_ARGUMENT`…: context.code() may give the enum or its number."""
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)


_upstream_statuses: dict[int | str, Counter] = {}


def observe_upstream(status: int | str, seconds: float) -> None:
    """One HTTP attempt: its HTTP status (or transport failure kind) and its duration."""
    requests = _upstream_statuses.get(status)
    if requests is None:
        requests = _upstream_statuses[status] = UPSTREAM_REQUESTS.labels(str(status))
    requests.inc()
    UPSTREAM_LATENCY.observe(seconds)


def observe_batch(pairs: int, seconds: float) -> None:
    BATCH_SIZE.observe(pairs)
    INFERENCE_TIME.observe(seconds)


def observe_queue(seconds: float) -> None:
    QUEUE_TIME.observe(seconds)


# --- the /metrics endpoint ---


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry = REGISTRY
) -> tuple[WSGIServer, int]:
    """Serve `registry` at http://host:port/metrics on a daemon thread; port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


def multiprocess_registry(
    directory: str, workers: Callable[[], Sequence[WorkerProcess]] = tuple
) -> CollectorRegistry:
    """The workers' metrics summed from their files in `directory` (the supervisor's /metrics),
    with the `process_*` of the supervisor and its `workers` together and `python_info`.

    Counters and histograms keep a dead worker's counts (its files stay); gauges count
    only live workers once `worker_exited` has been told."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(ProcessTreeCollector(workers))
    PlatformCollector(registry=registry)
    return registry


def worker_exited(pid: int, directory: str) -> None:
    """A worker process is gone: drop its live gauges (calls in flight, deployment state)."""
    multiprocess.mark_process_dead(pid, path=directory)  # type: ignore[no-untyped-call]


def stop_metrics_server(server: WSGIServer) -> None:
    """Stop serving and close the port (blocks up to half a second: the serve loop's poll)."""
    server.shutdown()
    server.server_close()
