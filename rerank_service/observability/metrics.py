"""Prometheus metrics: one `Metrics` per server process, made at start-up (server.py) and
handed to what records.

Who records what:

- the call pipeline (pipeline/call.py), for every call whichever door it came in by:
  `rerank_calls`, `rerank_call_latency_seconds`, `rerank_calls_in_flight`,
  `rerank_documents_per_call`, `rerank_tokens_per_call`, through the `MethodMetrics` the
  front doors take from it (`for_method`: the gRPC edge, each method; `stream_items`: the
  servicer, each RerankStream item; `for_http_route`: the HTTP front door, each route);
- the upstream transport, once per HTTP attempt (backends/upstream/client/attempt.py):
  `rerank_upstream_requests`, `rerank_upstream_latency_seconds`;
- the upstream backend (backends/upstream/backend.py): `rerank_upstream_retries`,
  `rerank_upstream_retries_refused`;
- each deployment (routing/deployment.py, through `DeploymentMetrics`): its calls,
  latency, state and ejections; the router (routing/router.py): fallbacks and retry
  budgets spent;
- the micro-batcher (backends/local/batcher.py): model batches, queue and inference time.
- the call pipeline's usage meter (pipeline/usage.py), per caller: calls, documents,
  tokens, refusals for a limit, and the limits store's failures (caller_metrics.py);
- the span exporter (observability/tracing_export.py), with tracing on: spans exported
  and dropped;
- admission (pipeline/admission.py, through admission_metrics.py): its bounds and what is
  held against them, read when scraped, and its refusals by bound.

Each `Metrics` owns its registry (never prometheus-client's global one), so tests and
several servers in one process do not collide. With `serve --workers N` each worker's
`Metrics` keeps its values in files in the supervisor's directory (prometheus-client's
multiprocess mode, chosen by the argument: metrics_multiprocess.py) and the supervisor
serves their sum. Every gauge therefore names how workers' values combine
(`multiprocess_mode`).

The service is a hop on every search request, so recording stays cheap: label
children are bound once per method, code, status, route or reason and cached
(`.labels()` hashes and locks on every call), and nothing here awaits.
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from rerank_service.observability.admission_metrics import AdmissionMetrics
from rerank_service.observability.cache_metrics import CacheMetrics
from rerank_service.observability.caller_metrics import CallerMetrics
from rerank_service.observability.metrics_multiprocess import use_value_storage

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

# The `method` label of stream items: each item is a rerank of its own, counted as a call.
STREAM_ITEM_METHOD = "RerankStream/item"

# rerank_upstream_retries_total's reasons: the labels retry.judge gives a retryable failure
# (its RETRYABLE_HTTP_STATUSES and "unreachable"; a test checks they agree).
UPSTREAM_RETRY_REASONS = ("429", "502", "503", "504", "unreachable")
# rerank_deployment_ejections_total's states: those a deployment is ejected into
# (core.domain.DeploymentState's but healthy), and `rate_limited` (routing/deployment.py's
# name for an ejection for its 429s); a test keeps them so.
EJECTION_STATES = ("ejected", "down", "rate_limited")
# rerank_trace_spans_dropped_total's reasons (observability/tracing_export.py's).
TRACE_SPANS_DROPPED_REASONS = ("queue_full", "export_failed")


class Metrics:
    """Every metric family of one server process, in a registry of its own, and the
    recording each part of the service does into them.

    `multiprocess_directory`: a worker of `serve --workers N` keeps its values in files
    there, for the supervisor to sum; None keeps them in memory, served from `registry`.
    A process keeps them one way only (metrics_multiprocess.py says why).
    """

    def __init__(self, multiprocess_directory: str | None = None) -> None:
        use_value_storage(multiprocess_directory)
        self.multiprocess = multiprocess_directory is not None
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # The process's CPU, memory and file descriptors, the Python version and GC:
        # scraped, never recorded on the hot path.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        # --- calls (the call pipeline) ---
        self.calls = Counter(
            "rerank_calls",
            "RerankService calls answered, by method and gRPC status code "
            "(method RerankStream/item: one stream item).",
            ["method", "code"],
            registry=registry,
        )
        self.call_latency = Histogram(
            "rerank_call_latency_seconds",
            "Time from a call's arrival to its answer, by method (RerankStream: the whole stream).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.calls_in_flight = Gauge(
            "rerank_calls_in_flight",
            "RerankService calls being served now, by method (RerankStream: open streams).",
            ["method"],
            registry=registry,
            multiprocess_mode="livesum",  # workers: the sum over live workers; a dead one's calls ended
        )
        self.documents = Histogram(
            "rerank_documents_per_call",
            "Documents in one Rerank call or stream item.",
            buckets=DOCUMENT_BUCKETS,
            registry=registry,
        )
        self.tokens = Histogram(
            "rerank_tokens_per_call",
            "usage.total_tokens of one successful Rerank call or stream item.",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )

        # --- upstream backend (the transport, once per HTTP attempt; the backend's retries) ---
        self.upstream_requests = Counter(
            "rerank_upstream_requests",
            "HTTP requests to the upstream, by outcome: the HTTP status, or connect_error, timeout, "
            "pool_timeout, reset, protocol_error, transport_error, too_large, cancelled.",
            ["status"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "rerank_upstream_latency_seconds",
            "Time of one HTTP request to the upstream, whatever its outcome.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_retries = Counter(
            "rerank_upstream_retries",
            "Upstream attempts repeated after a retryable failure, by the failure's reason.",
            ["reason"],
            registry=registry,
        )
        self.upstream_retries_refused = Counter(
            "rerank_upstream_retries_refused",
            "Upstream retries not made because the route's retry budget was spent.",
            registry=registry,
        )

        # --- routes and deployments (routing/) ---
        self.deployment_calls = Counter(
            "rerank_deployment_calls",
            "Backend calls (one per chunk) a deployment answered, by route, deployment and outcome "
            "(OK or the gRPC code of the failure).",
            ["route", "deployment", "code"],
            registry=registry,
        )
        self.deployment_latency = Histogram(
            "rerank_deployment_latency_seconds",
            "Time a deployment took for one backend call, retries included, whatever its outcome.",
            ["route", "deployment"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.deployment_state = Gauge(
            "rerank_deployment_state",
            "A deployment's health: 0 healthy, 1 ejected (tried last), 2 down (refused but for probes); "
            "0 once a reload took it out of every route.",
            ["deployment"],
            registry=registry,
            # Workers: the state last written by a live worker. Each writes it when it changes,
            # and again after each call of the deployment (`DeploymentMetrics.finished`), so it
            # is the one whose calls found it last: a worker that took no call since an outage
            # keeps it down (a call would probe it), and must not hide that its siblings'
            # calls find it back (the worst of them, livemax, would). Its first word, healthy
            # before any call, is written as the oldest (`_set_as_oldest`): the series exists
            # from the start, and any worker's later word wins over it.
            multiprocess_mode="livemostrecent",
        )
        self.deployment_ejections = Counter(
            "rerank_deployment_ejections",
            "Times a deployment was ejected or went down.",
            ["deployment", "state"],
            registry=registry,
        )
        self.route_members = Gauge(
            "rerank_route_members",
            "1 for each deployment of each route served now, 0 once a reload took it out of the "
            "route: what joins a deployment's state to its routes.",
            ["route", "deployment"],
            registry=registry,
            multiprocess_mode="livemax",  # workers load the same routes
        )
        self.route_fallbacks = Counter(
            "rerank_route_fallbacks",
            "Calls moved to another deployment of their route after a failure.",
            ["route"],
            registry=registry,
        )
        self.route_budget_exhausted = Counter(
            "rerank_route_retry_budget_exhausted",
            "Fallbacks not made because the route's retry budget was spent.",
            ["route"],
            registry=registry,
        )

        # --- local backend (the micro-batcher) ---
        self.batch_size = Histogram(
            "rerank_local_batch_size",
            "Query-document pairs in one model batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "rerank_local_queue_seconds",
            "Time a request waited in the micro-batcher before its first batch started.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.inference_time = Histogram(
            "rerank_local_inference_seconds",
            "Time one model batch ran.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # --- tracing (observability/tracing_export.py) ---
        self.trace_spans_exported = Counter(
            "rerank_trace_spans_exported",
            "Spans the OTLP exporter delivered to the collector.",
            registry=registry,
        )
        self.trace_spans_dropped = Counter(
            "rerank_trace_spans_dropped",
            "Spans lost: the export queue was full (queue_full) or the collector did not take them "
            "(export_failed).",
            ["reason"],
            registry=registry,
        )

        # --- the score cache (routing/cached_scores.py) ---
        self.cache = CacheMetrics(registry)

        # --- admission: its bounds, what is held against them, its refusals (server.py) ---
        self.admission = AdmissionMetrics(registry, self.multiprocess)

        # --- callers: what each used and was refused (pipeline/usage.py) ---
        self.callers = CallerMetrics(registry)

        # Label children, bound on first use.
        self._methods: dict[str, MethodMetrics] = {}
        self._upstream_statuses: dict[int | str, Counter] = {}
        self._retries: dict[str, Counter] = {}
        # Each retry reason is 0 from the start: a series born at 1 on the first retry reads
        # as no increase, and the dashboard would miss that one (so for fallbacks and ejections).
        for reason in UPSTREAM_RETRY_REASONS:
            _child(self._retries, self.upstream_retries, reason)
        self._fallbacks: dict[str, Counter] = {}
        self._budgets_spent: dict[str, Counter] = {}
        self._members: set[tuple[str, str]] = set()  # (route, deployment) set to 1
        self._spans_dropped: dict[str, Counter] = {}
        self.stream_items = MethodMetrics(self, STREAM_ITEM_METHOD)

    # --- calls ---

    def for_method(self, method: str) -> MethodMetrics:
        """The metrics of a gRPC method path (`/rerank.v1.RerankService/Rerank` → label `Rerank`)."""
        found = self._methods.get(method)
        if found is None:
            found = self._methods[method] = MethodMetrics(self, method.rsplit("/", 1)[-1])
        return found

    def for_http_route(self, path: str) -> MethodMetrics:
        """The metrics of an HTTP front-door route (`/v1/rerank` → label `HTTP /v1/rerank`)."""
        label = f"HTTP {path}"
        found = self._methods.get(label)
        if found is None:
            found = self._methods[label] = MethodMetrics(self, label)
        return found

    # --- upstream ---

    def observe_upstream(self, status: int | str, seconds: float) -> None:
        """One HTTP attempt: its HTTP status (or transport failure kind) and its duration."""
        requests = self._upstream_statuses.get(status)
        if requests is None:
            requests = self._upstream_statuses[status] = self.upstream_requests.labels(str(status))
        requests.inc()
        self.upstream_latency.observe(seconds)

    def count_upstream_retry(self, reason: str) -> None:
        _child(self._retries, self.upstream_retries, reason).inc()

    def count_upstream_retry_refused(self) -> None:
        self.upstream_retries_refused.inc()

    # --- routes and deployments ---

    def for_deployment(self, name: str) -> DeploymentMetrics:
        return DeploymentMetrics(self, name)

    def set_route_members(self, members: set[tuple[str, str]]) -> None:
        """The (route, deployment) pairs served now: each is 1, and each served before and not
        now is 0 (kept, not removed: with workers a value lives on in the worker's file)."""
        for route, deployment in self._members - members:
            self.route_members.labels(route, deployment).set(0)
        for route, deployment in members:
            self.route_members.labels(route, deployment).set(1)
            # Each route's refused fallbacks are 0 from now: a series born at 1 on its first
            # refusal would read as no increase, and the alert on it would miss that one.
            _child(self._budgets_spent, self.route_budget_exhausted, route)
            _child(self._fallbacks, self.route_fallbacks, route)
        self._members = set(members)

    def count_fallback(self, route: str) -> None:
        _child(self._fallbacks, self.route_fallbacks, route).inc()

    def count_retry_budget_exhausted(self, route: str) -> None:
        _child(self._budgets_spent, self.route_budget_exhausted, route).inc()

    # --- tracing ---

    def tracing_started(self) -> None:
        """Each reason spans are dropped for is 0 from now: a series born at 1 on the first
        drop would read as no increase, and RerankTraceSpansDropped would miss it (nothing
        while tracing is off: no exporter, nothing to drop)."""
        for reason in TRACE_SPANS_DROPPED_REASONS:
            _child(self._spans_dropped, self.trace_spans_dropped, reason)

    def count_trace_spans(self, *, exported: int = 0, dropped: int = 0, reason: str = "") -> None:
        """Spans the exporter delivered, or lost for `reason` (called from its thread)."""
        if exported:
            self.trace_spans_exported.inc(exported)
        if dropped:
            _child(self._spans_dropped, self.trace_spans_dropped, reason).inc(dropped)

    # --- local backend ---

    def observe_batch(self, pairs: int, seconds: float) -> None:
        self.batch_size.observe(pairs)
        self.inference_time.observe(seconds)

    def observe_queue(self, seconds: float) -> None:
        self.queue_time.observe(seconds)


def _child(children: dict[str, Counter], family: Counter, label: str) -> Counter:
    """`family`'s child for the one label `label`, bound once into `children`."""
    found = children.get(label)
    if found is None:
        found = children[label] = family.labels(label)
    return found


# A `livemostrecent` gauge's value is the one written last: the supervisor compares the time
# each worker wrote its value with. A value written at this time (a second after the epoch: 0
# reads as never written) is older than any other, so it is read only while no worker has
# written another.
_OLDEST_WRITE = 1.0


def _set_as_oldest(gauge: Gauge, value: float) -> None:
    """Write a worker's `value` of a `livemostrecent` gauge as the oldest there is.
    prometheus-client's `Gauge.set` stamps the time now; its value object (files, in a
    worker) takes the time to stamp, which the public API does not expose."""
    gauge._value.set(float(value), timestamp=_OLDEST_WRITE)


class DeploymentMetrics:
    """One deployment's metric children, bound once per route and outcome."""

    __slots__ = (
        "_calls",
        "_ejections",
        "_latency",
        "_level",
        "_metrics",
        "_retired",
        "_rewrites",
        "_state",
        "_state_gauge",
        "name",
    )

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._metrics = metrics
        self._state: str | None = None
        self._level = 0  # the state's gauge value, as last written
        self._retired = False
        # A worker's (files): its state is written again after each of its calls, so that
        # it is the most recent of the workers' (a write to its file, as each count is).
        self._rewrites = metrics.multiprocess
        self._state_gauge: Gauge | None = None
        self._calls: dict[tuple[str, grpc.StatusCode | None], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self._ejections: dict[str, Counter] = {}

    def finished(self, route: str, code: grpc.StatusCode | None, seconds: float) -> None:
        """One backend call ended: `code` None for a success."""
        calls = self._calls.get((route, code))
        if calls is None:
            label = "OK" if code is None else code_name(code)
            calls = self._calls[(route, code)] = self._metrics.deployment_calls.labels(
                route, self.name, label
            )
        calls.inc()
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = self._metrics.deployment_latency.labels(route, self.name)
        latency.observe(seconds)
        # A worker's: what this call found is the latest word on the state. A failed call is
        # no word that the deployment is healthy (below the breaker's count it still reads
        # so here): it would write 0 over a sibling's `down` at each failure of an outage.
        if self._rewrites and self._state is not None and not self._retired and (code is None or self._level):
            self._state_gauge_child().set(self._level)

    def set_state(self, state: str, level: int) -> None:
        """The deployment is now in `state`, whose gauge value is `level` (0: healthy)."""
        if state == self._state or self._retired:
            return
        if not self._ejections:
            # Its first state, written once a router serves it: each ejection series is 0
            # from now, as a series born at 1 on the first ejection would read as no increase
            # (the dashboard's Ejections panel would miss the one an operator looks for).
            for ejected in EJECTION_STATES:
                self._ejections[ejected] = self._metrics.deployment_ejections.labels(self.name, ejected)
        if level:
            ejections = self._ejections.get(state)
            if ejections is None:
                ejections = self._ejections[state] = self._metrics.deployment_ejections.labels(
                    self.name, state
                )
            ejections.inc()
        first = self._state is None
        self._state, self._level = state, level
        if first and self._rewrites and not level:
            # A worker's first word, made before any call (a restarted worker's router
            # starting): healthy is no news, and as the most recent write it would hide that
            # its siblings' calls find the deployment down. It is written as the oldest word
            # there is: the deployment has its series from the start, as in one process (a
            # route's member without one would drop out of RerankRouteDown's join, which
            # would then fire on the route's other members alone), and any sibling's word is
            # newer. Its first call writes it as news.
            _set_as_oldest(self._state_gauge_child(), level)
            return
        self._state_gauge_child().set(level)

    def _state_gauge_child(self) -> Gauge:
        if self._state_gauge is None:
            self._state_gauge = self._metrics.deployment_state.labels(self.name)
        return self._state_gauge

    def retire(self, replaced: bool) -> None:
        """A reload took the deployment out: its state is no longer written (a deployment
        of the same name that `replaced` it writes it now), and without a replacement it
        reads 0, so an alert on a deployment that is down does not fire for one no route
        serves (kept at 0, not removed: with workers a value lives on in the worker's file)."""
        self._retired = True
        if not replaced:
            self._metrics.deployment_state.labels(self.name).set(0)


class MethodMetrics:
    """One method's metric children, bound once: recording a call is then a few locked adds.

    Calls in flight are a plain count. In memory it is read when /metrics is scraped
    (Gauge.set_function): two adds without a lock instead of two locked gauge updates per
    call; only the event loop's thread writes it, the scrape thread only reads. With
    workers the scrape happens in the supervisor, which reads only the workers' files
    (set_function cannot reach them): the gauge is then also updated per call (`_gauge`).
    """

    __slots__ = ("_calls", "_calls_family", "_documents", "_gauge", "_tokens", "in_flight", "latency", "name")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.latency = metrics.call_latency.labels(name)
        self._calls_family = metrics.calls
        self._documents = metrics.documents
        self._tokens = metrics.tokens
        self._calls: dict[grpc.StatusCode | int, Counter] = {}
        gauge = metrics.calls_in_flight.labels(name)
        self._gauge: Gauge | None = gauge if metrics.multiprocess else None
        if not metrics.multiprocess:
            gauge.set_function(lambda: self.in_flight)

    def started(self) -> None:
        self.in_flight += 1
        if self._gauge is not None:
            self._gauge.inc()

    def finished(
        self,
        code: grpc.StatusCode | int,
        seconds: float,
        documents: int | None,
        tokens: int | None,
        trace_id: str | None = None,
    ) -> None:
        """Count a call that ended (and was counted by `started`); `trace_id`: its trace's,
        the latency's exemplar (OpenMetrics: a slow bucket links to a trace)."""
        self.in_flight -= 1
        if self._gauge is not None:
            self._gauge.dec()
        calls = self._calls.get(code)
        if calls is None:
            calls = self._calls[code] = self._calls_family.labels(self.name, code_name(code))
        calls.inc()
        if trace_id is None:
            self.latency.observe(seconds)
        else:
            self.latency.observe(seconds, {"trace_id": trace_id})
        if documents is not None:
            self._documents.observe(documents)
        if tokens is not None:
            self._tokens.observe(tokens)


def code_name(code: grpc.StatusCode | int) -> str:
    """`OK`, `INVALID_ARGUMENT`…: context.code() may give the enum or its number."""
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)
