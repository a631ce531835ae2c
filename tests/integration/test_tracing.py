"""Traces end to end: real `rerank-service serve` processes export OTLP to a real Jaeger
(tests/support/jaeger_server.py), and each test reads the trace back from Jaeger's query API.

A caller's traceparent goes in; the trace that comes out holds the caller's parent, the
server span, the route's span, one client span per upstream attempt (a failing primary,
then its fallback), and the upstream was sent the attempt span as its parent. The same
over the HTTP front door and for the local model (queue, tokenization, forward pass). A
collector that is down costs calls nothing and the loss is counted; a draining process
sends its last spans; each worker of `--workers 2` exports as itself.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import FakeUpstream, Fault
from tests.conftest import UPSTREAM_KEY
from tests.support.jaeger_server import JaegerServer, JaegerSpan
from tests.support.process import ServiceProcess
from tests.support.rpc import request
from tests.support.scrape import scrape, value
from tests.support.waiting import wait_until

MODEL = "qwen3-rerank"
KEY_ENV = "TRACING_TEST_UPSTREAM_KEY"
RERANK = "rerank.v1.RerankService/Rerank"
OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture
def primary() -> Iterator[FakeUpstream]:
    """The route's first choice: answers every request with a 500 (a fallback reason)."""
    with FakeUpstream(api_key=UPSTREAM_KEY, models=(MODEL,)) as upstream:
        upstream.always(Fault(status=500, body={"code": "InternalError", "message": "down"}))
        yield upstream


@pytest.fixture
def fallback() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY, models=(MODEL,)) as upstream:
        yield upstream


def traceparent() -> tuple[str, str, str]:
    """A sampled caller context: (traceparent, trace id, the caller's span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def routed_config(tmp_path: Path, primary: FakeUpstream, fallback: FakeUpstream) -> Path:
    """One route, `search`: `primary` first, `fallback` at the next priority."""

    def deployment(upstream: FakeUpstream, name: str, priority: int) -> dict[str, Any]:
        return {
            "format": "dashscope", "url": upstream.url, "name": name, "model": MODEL,
            "api_key_env": KEY_ENV, "priority": priority,
        }  # fmt: skip

    route = {
        "name": "search",
        "deployments": [deployment(primary, "primary", 0), deployment(fallback, "backup", 1)],
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"models": [route]}, sort_keys=False), encoding="utf-8")
    return path


def exporting_to(jaeger: JaegerServer, service_name: str, **extra: str) -> dict[str, str]:
    """The environment of a server that exports every span to `jaeger` over OTLP/gRPC as
    `service_name` (a name of its own: the test's traces are told apart by it too)."""
    return {
        KEY_ENV: UPSTREAM_KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_grpc_endpoint,
        "OTEL_SERVICE_NAME": service_name,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds: the test waits less for its spans
        **extra,
    }


def in_front_of(upstream: FakeUpstream, flags: list[str], env: dict[str, str]) -> ServiceProcess:
    """A server of `upstream` alone (no routes file), holding its key, with `flags` and `env`."""
    args = ["--backend", "upstream", "--upstream-url", upstream.url, "--upstream-models", MODEL, *flags]
    return ServiceProcess(args, env={**env, "RERANK_UPSTREAM_API_KEY": UPSTREAM_KEY})


def serving_line(service: ServiceProcess) -> dict[str, Any]:
    return next(event for event in service.events() if event.get("event") == "serving")


def one(spans: list[JaegerSpan], name: str) -> JaegerSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"expected one {name!r} span among:\n" + "\n".join(map(str, spans))
    return found[0]


def assert_failover_trace(
    spans: list[JaegerSpan], server_name: str, trace_id: str, caller_span: str, fallback: FakeUpstream
) -> None:
    """One trace: the caller's parent, the server span, the route, two attempts (the
    primary's failed, the fallback's answered), and the fallback sent the second attempt."""
    assert {span.trace_id for span in spans} == {trace_id}
    server = one(spans, server_name)
    assert server.kind == "server"
    assert server.parent_span_id == caller_span
    route = one(spans, "rerank.route")
    assert route.parent_span_id == server.span_id
    assert route.attributes["rerank.route"] == "search"
    assert "fallback" in route.events
    attempts = sorted((span for span in spans if span.name == "POST"), key=lambda span: span.start_us)
    assert [span.parent_span_id for span in attempts] == [route.span_id, route.span_id]
    assert [span.kind for span in attempts] == ["client", "client"]
    failed, answered = attempts
    assert failed.status == "ERROR"
    assert failed.attributes["http.response.status_code"] == 500
    assert answered.status is None
    assert answered.attributes["http.response.status_code"] == 200
    assert answered.attributes["url.full"] == fallback.url.rstrip("/") + fallback.requests[0].path
    # The fallback's spans would hang under the attempt that called it.
    (received,) = fallback.requests
    assert received.headers["traceparent"] == f"00-{trace_id}-{answered.span_id}-01"


def test_a_grpc_call_that_falls_over_is_one_trace_under_the_callers_span(
    jaeger: JaegerServer, tmp_path: Path, primary: FakeUpstream, fallback: FakeUpstream
) -> None:
    parent, trace_id, caller_span = traceparent()
    config = routed_config(tmp_path, primary, fallback)
    with ServiceProcess(["--config", str(config)], env=exporting_to(jaeger, "tracing-grpc")) as service:
        stub = rerank_pb2_grpc.RerankServiceStub(grpc.insecure_channel(service.target))
        stub.Rerank(request(model="search"), metadata=(("traceparent", parent),), timeout=10)

        spans = jaeger.trace(trace_id, until=lambda found: len(found) >= 4)
    assert_failover_trace(spans, RERANK, trace_id, caller_span, fallback)
    server = one(spans, RERANK)
    assert server.service == "tracing-grpc"
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["gen_ai.request.model"] == "search"
    assert server.attributes["rerank.deployments"]  # which deployment answered


def test_an_http_call_that_falls_over_is_one_trace_under_the_callers_span(
    jaeger: JaegerServer, tmp_path: Path, primary: FakeUpstream, fallback: FakeUpstream
) -> None:
    parent, trace_id, caller_span = traceparent()
    config = routed_config(tmp_path, primary, fallback)
    with ServiceProcess(
        ["--config", str(config), "--http-port", "0"], env=exporting_to(jaeger, "tracing-http")
    ) as service:
        serving = serving_line(service)
        body = {"model": "search", "query": "red apple", "documents": ["a red apple", "a green pear"]}
        answer = httpx.post(
            f"http://127.0.0.1:{serving['http_port']}/v1/rerank", json=body, headers={"traceparent": parent}
        )
        assert answer.status_code == 200, answer.text

        spans = jaeger.trace(trace_id, until=lambda found: len(found) >= 4)
    assert_failover_trace(spans, "POST /v1/rerank", trace_id, caller_span, fallback)
    server = one(spans, "POST /v1/rerank")
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/rerank"


def test_a_local_model_call_shows_its_tokenization_queue_and_forward_pass(jaeger: JaegerServer) -> None:
    parent, trace_id, caller_span = traceparent()
    with ServiceProcess([], env={**OFFLINE, **exporting_to(jaeger, "tracing-local")}) as service:
        stub = rerank_pb2_grpc.RerankServiceStub(grpc.insecure_channel(service.target))
        models = stub.ListModels(rerank_pb2.ListModelsRequest(), timeout=10)
        stub.Rerank(request(model=models.models[0].name), metadata=(("traceparent", parent),), timeout=60)

        wanted = {RERANK, "rerank.tokenize", "rerank.queue", "rerank.forward"}
        spans = jaeger.trace(trace_id, until=lambda found: wanted <= {span.name for span in found})
    server = one(spans, RERANK)
    assert server.parent_span_id == caller_span
    for name in ("rerank.tokenize", "rerank.queue", "rerank.forward"):  # one deployment: no route span
        assert one(spans, name).parent_span_id == server.span_id, name
    forward = one(spans, "rerank.forward")
    assert forward.attributes["rerank.batch.pairs"] == len(request().documents)


def test_a_collector_that_is_down_costs_calls_nothing_and_the_lost_spans_are_counted(
    fallback: FakeUpstream,
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nobody listens there
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",  # seconds before an export gives up
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with in_front_of(fallback, ["--metrics-port", "0"], env) as service:
        stub = rerank_pb2_grpc.RerankServiceStub(grpc.insecure_channel(service.target))
        for _ in range(20):
            response = stub.Rerank(request(), timeout=10)
            assert len(response.output.results) == len(request().documents)
        port = serving_line(service)["metrics_port"]
        wait_until(
            lambda: value(scrape(port), "rerank_trace_spans_dropped_total", reason="export_failed") >= 1,
            timeout=60,
            what="the spans the collector never took, counted",
        )
        assert value(scrape(port), "rerank_trace_spans_exported_total") == 0


def test_a_draining_process_sends_its_last_spans_before_it_exits(
    jaeger: JaegerServer, fallback: FakeUpstream
) -> None:
    parent, trace_id, _ = traceparent()
    # Spans would wait ten minutes for their batch: only the drain sends them.
    env = {**exporting_to(jaeger, "tracing-drain"), "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    with in_front_of(fallback, [], env) as service:
        stub = rerank_pb2_grpc.RerankServiceStub(grpc.insecure_channel(service.target))
        stub.Rerank(request(), metadata=(("traceparent", parent),), timeout=10)
        assert service.terminate(signal.SIGTERM) == 0

    spans = jaeger.trace(trace_id, until=lambda found: len(found) >= 2)
    assert {span.name for span in spans} >= {RERANK, "POST"}


def test_each_worker_exports_as_itself(jaeger: JaegerServer, fallback: FakeUpstream) -> None:
    service_name = f"tracing-workers-{os.getpid()}"
    with in_front_of(fallback, ["--workers", "2"], exporting_to(jaeger, service_name)) as service:
        seen: set[object] = set()

        def both_workers_traced() -> bool:
            # A new connection each time: the kernel spreads them over the workers' listeners.
            with grpc.insecure_channel(service.target) as channel:
                rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=10)
            traces = jaeger.traces(service_name, until=lambda found: bool(found))
            seen.update(
                span.resource.get("rerank.worker")
                for trace in traces
                for span in trace
                if span.name == RERANK
            )
            return seen >= {0, 1}

        wait_until(both_workers_traced, timeout=120, what="spans from both workers")
        assert service.terminate() == 0


def free_port() -> int:
    """A loopback port that was just free: nothing listens there, a connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
