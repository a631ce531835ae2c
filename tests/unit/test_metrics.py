"""Metrics record calls, upstream attempts and model batches under the names and labels
the docs promise; log lines carry the request id of the call being served."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO, cast

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from rerank_service.backends.local.batcher import MicroBatcher
from rerank_service.backends.upstream import errors
from rerank_service.backends.upstream.client.transport import UpstreamTransport, transport_failure
from rerank_service.backends.upstream.retry import RETRYABLE_HTTP_STATUSES, judge
from rerank_service.core.domain import ServiceError
from rerank_service.observability.logging import configure_logging, get_logger
from rerank_service.observability.metrics import UPSTREAM_RETRY_REASONS, Metrics, code_name
from rerank_service.observability.metrics_endpoint import start_metrics_server, stop_metrics_server
from rerank_service.observability.metrics_multiprocess import multiprocess_registry, worker_exited
from rerank_service.observability.request_id import bind_request_id, new_request_id, unbind_request_id
from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.support.logs import LogCapture
from tests.unit.test_batcher import RecordingScorer, pair

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def metrics() -> Metrics:
    """What a server makes at start-up and hands to what records: each test its own."""
    return Metrics()


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's current value (0 when the series does not exist yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --- calls, upstream attempts, retries ---


def test_a_finished_call_is_counted_by_short_method_name_and_code_name(metrics: Metrics) -> None:
    measured = metrics.for_method("/rerank.v1.RerankService/Rerank")

    measured.started()
    assert value(metrics, "rerank_calls_in_flight", method="Rerank") == 1
    measured.finished(grpc.StatusCode.OK, 0.012, documents=3, tokens=42)
    measured.started()
    measured.finished(3, 0.001, documents=0, tokens=None)  # context.code() may be a bare number

    assert value(metrics, "rerank_calls_total", method="Rerank", code="OK") == 1
    assert value(metrics, "rerank_calls_total", method="Rerank", code="INVALID_ARGUMENT") == 1
    assert value(metrics, "rerank_call_latency_seconds_count", method="Rerank") == 2
    assert value(metrics, "rerank_calls_in_flight", method="Rerank") == 0
    assert value(metrics, "rerank_documents_per_call_sum") == 3
    assert value(metrics, "rerank_tokens_per_call_sum") == 42


def test_label_children_are_bound_once_per_method(metrics: Metrics) -> None:
    first = metrics.for_method("/rerank.v1.RerankService/ListModels")
    assert metrics.for_method("/rerank.v1.RerankService/ListModels") is first
    assert first.name == "ListModels"
    assert metrics.for_http_route("/v1/rerank") is metrics.for_http_route("/v1/rerank")
    assert metrics.for_http_route("/v1/rerank").name == "HTTP /v1/rerank"
    assert metrics.stream_items.name == "RerankStream/item"


def test_each_metrics_object_keeps_its_own_counts(metrics: Metrics) -> None:
    other = Metrics()  # another server in the same process
    metrics.observe_upstream(200, 0.01)
    assert value(metrics, "rerank_upstream_requests_total", status="200") == 1
    assert value(other, "rerank_upstream_requests_total", status="200") == 0


def test_code_names_cover_enums_numbers_and_unknown_numbers() -> None:
    assert code_name(grpc.StatusCode.DEADLINE_EXCEEDED) == "DEADLINE_EXCEEDED"
    assert code_name(14) == "UNAVAILABLE"
    assert code_name(99) == "99"


def test_upstream_attempts_are_counted_by_status_and_timed(metrics: Metrics) -> None:
    metrics.observe_upstream(200, 0.05)
    metrics.observe_upstream("reset", 0.001)

    assert value(metrics, "rerank_upstream_requests_total", status="200") == 1
    assert value(metrics, "rerank_upstream_requests_total", status="reset") == 1
    assert value(metrics, "rerank_upstream_latency_seconds_count") == 2


def test_retries_are_counted_by_reason_and_a_deployment_s_state_is_a_number(metrics: Metrics) -> None:
    metrics.count_upstream_retry("503")
    metrics.count_upstream_retry("503")
    metrics.count_upstream_retry_refused()
    assert value(metrics, "rerank_upstream_retries_total", reason="503") == 2
    assert value(metrics, "rerank_upstream_retries_refused_total") == 1
    deployment = metrics.for_deployment("state-test")
    for state, number in (("down", 2), ("ejected", 1), ("healthy", 0)):
        deployment.set_state(state, number)
        assert value(metrics, "rerank_deployment_state", deployment="state-test") == number
    assert value(metrics, "rerank_deployment_ejections_total", deployment="state-test", state="down") == 1


def test_a_deployment_s_calls_are_counted_by_route_and_outcome(metrics: Metrics) -> None:
    deployment = metrics.for_deployment("calls-test")
    deployment.finished("route-a", None, 0.01)
    deployment.finished("route-a", grpc.StatusCode.UNAVAILABLE, 0.02)
    deployment.finished("route-a", grpc.StatusCode.UNAVAILABLE, 0.02)

    labels = {"route": "route-a", "deployment": "calls-test"}
    assert value(metrics, "rerank_deployment_calls_total", **labels, code="OK") == 1
    assert value(metrics, "rerank_deployment_calls_total", **labels, code="UNAVAILABLE") == 2
    assert value(metrics, "rerank_deployment_latency_seconds_count", **labels) == 3


def test_fallbacks_and_spent_budgets_are_counted_by_route(metrics: Metrics) -> None:
    metrics.count_fallback("route-a")
    metrics.count_fallback("route-a")
    metrics.count_retry_budget_exhausted("route-a")
    assert value(metrics, "rerank_route_fallbacks_total", route="route-a") == 2
    assert value(metrics, "rerank_route_retry_budget_exhausted_total", route="route-a") == 1


def exposition(registry: CollectorRegistry) -> list[str]:
    """The /metrics lines of `registry`, as a scrape reads them."""
    return generate_latest(registry).decode().splitlines()


def test_a_served_deployment_s_ejections_and_its_route_s_fallbacks_start_at_0(metrics: Metrics) -> None:
    # A counter series born at 1 reads as no increase: the dashboard's Ejections panel and
    # the fallbacks and retries graph would miss the first event, the one looked for.
    metrics.set_route_members({("route-a", "dep-a")})
    metrics.for_deployment("dep-a").set_state("healthy", 0)  # a router serves it (adopt)

    lines = exposition(metrics.registry)
    assert 'rerank_deployment_ejections_total{deployment="dep-a",state="ejected"} 0.0' in lines
    assert 'rerank_deployment_ejections_total{deployment="dep-a",state="down"} 0.0' in lines
    assert 'rerank_route_fallbacks_total{route="route-a"} 0.0' in lines
    for reason in ("429", "502", "503", "504", "unreachable"):
        assert f'rerank_upstream_retries_total{{reason="{reason}"}} 0.0' in lines


def test_the_retry_reasons_at_0_are_those_a_retryable_failure_is_counted_under() -> None:
    assert set(UPSTREAM_RETRY_REASONS) == {str(status) for status in RETRYABLE_HTTP_STATUSES} | {
        judge(ServiceError(grpc.StatusCode.UNAVAILABLE, "refused", reason=errors.UNAVAILABLE), False).label
    }


def test_a_deployment_s_first_ejection_counts_from_0_and_a_replacement_keeps_the_count(
    metrics: Metrics,
) -> None:
    first = metrics.for_deployment("dep-a")
    first.set_state("healthy", 0)
    assert (
        metrics.registry.get_sample_value(
            "rerank_deployment_ejections_total", {"deployment": "dep-a", "state": "down"}
        )
        == 0
    )
    first.set_state("down", 2)
    first.retire(replaced=True)
    metrics.for_deployment("dep-a").set_state("healthy", 0)  # a reload's successor of its name
    assert value(metrics, "rerank_deployment_ejections_total", deployment="dep-a", state="down") == 1
    assert value(metrics, "rerank_deployment_ejections_total", deployment="dep-a", state="ejected") == 0


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


def test_request_ids_are_32_hex_digits_and_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)


# --- hooks: the upstream transport and the micro-batcher ---


async def test_the_transport_counts_each_attempt_and_sends_the_trace_headers(
    metrics: Metrics, upstream: FakeUpstream
) -> None:
    upstream.api_key = None
    # The upstream's latency, to be timed: not synchronisation.
    upstream.inject(Fault(status=503, body={}, delay=0.02))
    upstream.inject(Fault(body={}, delay=0.02))
    transport = UpstreamTransport(upstream.url, 5.0, 4, metrics=metrics)

    first = await transport.post_json("/rerank", {}, None, None, traceparent=TRACEPARENT, tracestate="a=1")
    second = await transport.post_json("/rerank", {}, None, None)
    await transport.close()

    assert (first.status, second.status) == (503, 200)
    seen = [request.headers for request in upstream.requests]
    assert seen[0]["traceparent"] == TRACEPARENT
    assert seen[0]["tracestate"] == "a=1"
    assert "traceparent" not in seen[1]
    assert value(metrics, "rerank_upstream_requests_total", status="503") == 1
    assert value(metrics, "rerank_upstream_requests_total", status="200") == 1
    assert value(metrics, "rerank_upstream_latency_seconds_sum") >= 0.04


async def test_a_transport_failure_is_counted_by_its_kind(metrics: Metrics) -> None:
    with socket.socket() as probe:  # a port where nothing listens: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = UpstreamTransport(f"http://127.0.0.1:{port}", 5.0, 4, metrics=metrics)

    with pytest.raises(Exception, match="unreachable"):
        await transport.post_json("/rerank", {}, None, None)
    await transport.close()

    assert value(metrics, "rerank_upstream_requests_total", status="connect_error") == 1


async def test_the_batcher_records_batch_size_queue_and_inference_time(metrics: Metrics) -> None:
    batcher = MicroBatcher(RecordingScorer(delay=0.03), metrics=metrics)
    batcher.start()
    try:
        timed = await batcher.score_timed([pair(3), pair(4), pair(5)])
    finally:
        await batcher.close()

    assert value(metrics, "rerank_local_batch_size_count") == 1
    assert value(metrics, "rerank_local_batch_size_sum") == 3
    assert value(metrics, "rerank_local_queue_seconds_count") == 1
    assert value(metrics, "rerank_local_inference_seconds_count") == 1
    # The request that waited gets the time back, although the batch ran in the worker's task.
    assert timed.inference_seconds >= 0.03
    assert timed.queue_seconds > 0


# --- logs: the request id of the call on every line ---


def test_a_line_logged_inside_a_call_carries_its_request_id() -> None:
    request_id = new_request_id()
    token = bind_request_id(request_id)
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    try:
        get_logger("test").warning("upstream retry")
        get_logger("test").info("explicit", request_id="named-by-the-line")
    finally:
        configure_logging("json", "warning")
        unbind_request_id(token)

    lines = [json.loads(line) for line in capture.text.splitlines()]
    assert lines[0]["request_id"] == request_id
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


def test_the_endpoint_serves_the_registry_on_a_free_port_and_stops(metrics: Metrics) -> None:
    server, port = start_metrics_server("127.0.0.1", 0, metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        stop_metrics_server(server)

    assert port > 0
    assert "# TYPE rerank_calls_total counter" in text
    assert "# TYPE rerank_deployment_state gauge" in text
    assert "process_resident_memory_bytes" in text
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


# --- workers: prometheus-client's multiprocess mode (serve --workers N) ---

# One worker's life: two calls start, one ends, the process exits with the other in flight.
# Its Metrics is told the directory (as serve is by the supervisor); nothing in its
# environment says multiprocess before that.
_WORKER = """
import os, sys
assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
from rerank_service.observability.metrics import Metrics
metrics = Metrics(multiprocess_directory=sys.argv[1])
assert metrics.multiprocess
calls = metrics.for_method("/rerank.v1.RerankService/Rerank")
calls.started()
calls.started()
calls.finished(0, 0.01, documents=2, tokens=9)
assert calls.in_flight == 1
metrics.for_deployment("d").set_state("ejected", 1)
print(os.getpid())
"""


def _run_worker(directory: Path, program: str = _WORKER) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if name != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run(
        [sys.executable, "-c", program, str(directory)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _worker_pid(directory: Path) -> int:
    done = _run_worker(directory)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def _summed(directory: Path, name: str, **labels: str) -> float:
    return multiprocess_registry(str(directory)).get_sample_value(name, labels) or 0.0


def test_workers_metrics_are_summed_and_a_dead_workers_counts_stay(tmp_path: Path) -> None:
    first = _worker_pid(tmp_path)
    assert _summed(tmp_path, "rerank_calls_total", method="Rerank", code="OK") == 1
    # In files the gauge is updated per call: the supervisor cannot call set_function.
    assert _summed(tmp_path, "rerank_calls_in_flight", method="Rerank") == 1
    assert _summed(tmp_path, "rerank_deployment_state", deployment="d") == 1

    worker_exited(first, str(tmp_path))  # the supervisor saw it exit
    assert _summed(tmp_path, "rerank_calls_total", method="Rerank", code="OK") == 1  # kept
    assert _summed(tmp_path, "rerank_calls_in_flight", method="Rerank") == 0  # its calls ended
    assert _summed(tmp_path, "rerank_deployment_state", deployment="d") == 0

    second = _worker_pid(tmp_path)  # the restarted worker: a new process, its own files
    assert second != first
    assert _summed(tmp_path, "rerank_calls_total", method="Rerank", code="OK") == 2  # none twice
    assert _summed(tmp_path, "rerank_call_latency_seconds_count", method="Rerank") == 2
    assert _summed(tmp_path, "rerank_calls_in_flight", method="Rerank") == 1


# A worker's deployment state, written as a worker writes it (argv: directory, then steps).
_STATE_WRITER = """
import sys
import grpc
from rerank_service.observability.metrics import Metrics
deployment = Metrics(multiprocess_directory=sys.argv[1]).for_deployment("d")
for step in sys.argv[2:]:
    if step == "ok":
        deployment.finished("r", None, 0.01)
    elif step == "failed":
        deployment.finished("r", grpc.StatusCode.UNAVAILABLE, 0.01)
    else:
        state, level = step.split("=")
        deployment.set_state(state, int(level))
"""


def test_workers_deployment_state_is_what_the_latest_calls_found_not_a_start_or_a_failure(
    tmp_path: Path,
) -> None:
    """A worker's first word (healthy, before any call: a restarted worker) and a failed call
    below the breaker's count are no news: written last, either read as healthy while a
    sibling's calls found the deployment down (RerankRouteDown reset at each failure)."""

    def worker(*steps: str) -> None:
        done = _run_worker(tmp_path, _STATE_WRITER.replace("sys.argv[2:]", repr(list(steps))))
        assert done.returncode == 0, done.stderr

    worker("healthy=0", "ok", "failed", "down=2")  # its calls found it down
    assert _summed(tmp_path, "rerank_deployment_state", deployment="d") == 2
    worker("healthy=0")  # a sibling (re)started: no call yet
    worker("healthy=0", "failed")  # a sibling's failed call, below its breaker's count
    assert _summed(tmp_path, "rerank_deployment_state", deployment="d") == 2
    worker("healthy=0", "ok")  # a sibling's call answered: the latest word
    assert _summed(tmp_path, "rerank_deployment_state", deployment="d") == 0


def test_workers_deployment_state_is_exported_before_any_call(tmp_path: Path) -> None:
    """Every deployment a worker serves has its state from the start, as in one process: a
    route's healthy member never called had no series, so RerankRouteDown's join dropped it
    and fired on the route's down members alone. That first word is the oldest of all."""

    def worker(*steps: str) -> None:
        done = _run_worker(tmp_path, _STATE_WRITER.replace("sys.argv[2:]", repr(list(steps))))
        assert done.returncode == 0, done.stderr

    def state() -> float | None:
        return multiprocess_registry(str(tmp_path)).get_sample_value(
            "rerank_deployment_state", {"deployment": "d"}
        )

    worker("healthy=0")  # started, no call yet
    assert state() == 0
    worker("healthy=0", "failed", "down=2")  # a sibling's calls found it down
    worker("healthy=0")  # another started after: its first word is older than the sibling's
    assert state() == 2


def test_in_memory_the_in_flight_gauge_is_read_at_scrape(metrics: Metrics) -> None:
    assert metrics.multiprocess is False  # tests run as one process
    measured = metrics.for_method("/rerank.v1.RerankService/Rerank")
    measured.started()
    measured.started()
    assert value(metrics, "rerank_calls_in_flight", method="Rerank") == 2
    measured.finished(grpc.StatusCode.OK, 0.001, documents=None, tokens=None)
    assert value(metrics, "rerank_calls_in_flight", method="Rerank") == 1
    assert measured.in_flight == 1


def test_a_process_keeps_its_values_one_way_only(tmp_path: Path) -> None:
    # A second Metrics that says otherwise would lose its values or write the other's files.
    in_files_then_in_memory = (
        "import sys\n"
        "from rerank_service.observability.metrics import Metrics\n"
        "Metrics(multiprocess_directory=sys.argv[1])\n"
        "Metrics(multiprocess_directory=sys.argv[1])  # the same again: fine\n"
        "Metrics()\n"
    )
    done = _run_worker(tmp_path, in_files_then_in_memory)
    assert done.returncode == 1
    assert f"keeps its metric values in files in {tmp_path} already" in done.stderr

    Metrics()  # this test process keeps its values in memory (whichever test ran first)
    with pytest.raises(RuntimeError, match="keeps its metric values in memory already"):
        Metrics(multiprocess_directory=str(tmp_path))


def test_the_endpoint_serves_another_registry(tmp_path: Path) -> None:
    _worker_pid(tmp_path)
    server, port = start_metrics_server("127.0.0.1", 0, multiprocess_registry(str(tmp_path)))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        stop_metrics_server(server)
    assert 'rerank_calls_total{code="OK",method="Rerank"} 1.0' in text


def test_the_ejection_states_are_the_deployment_states_but_healthy_and_rate_limited() -> None:
    # observability may not import core (docs/ARCHITECTURE.md): the names are written twice.
    from rerank_service.core.domain import DeploymentState
    from rerank_service.observability.metrics import EJECTION_STATES
    from rerank_service.routing.deployment import RATE_LIMITED

    unhealthy = {state.value for state in DeploymentState} - {DeploymentState.HEALTHY.value}
    assert set(EJECTION_STATES) == unhealthy | {RATE_LIMITED}
