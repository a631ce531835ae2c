"""When tracing is on, what a process says of itself, and what is refused at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rerank_service.config import ConfigError
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing import tracing_wanted
from rerank_service.observability.tracing_export import _resource, call_span, check_tracing, peer_attributes
from rerank_service.server import start_call_tracer


@pytest.mark.parametrize(
    ("endpoint", "environ", "wanted"),
    [
        (None, {}, False),
        ("http://collector:4317", {}, True),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ("http://collector:4317", {"OTEL_SDK_DISABLED": "true"}, False),
        ("http://collector:4317", {"OTEL_TRACES_EXPORTER": "none"}, False),
        ("http://collector:4317", {"OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_only_with_an_endpoint_and_not_switched_off(
    endpoint: str | None, environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(endpoint, environ) is wanted


def test_with_tracing_off_opentelemetrys_tracing_is_never_loaded() -> None:
    # (redis-py imports OpenTelemetry's metrics API when it is installed: not ours to avoid.)
    script = (
        "import sys\n"
        "from rerank_service.server import start_call_tracer\n"
        "from rerank_service.observability.metrics import Metrics\n"
        "assert start_call_tracer(None, Metrics(), None) is None\n"
        "tracing = {'rerank_service.observability.tracing_export', 'opentelemetry.sdk.trace'}\n"
        "loaded = tracing & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    environ = {"PATH": "/usr/bin:/bin"}  # none of the OTEL_* variables of the test's own run
    finished = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr


def test_tracing_configured_without_the_extra_is_refused_naming_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "rerank_service.observability.tracing_export", None)
    with pytest.raises(ConfigError, match=r"install the otel extra \(pip install '\.\[otel\]'"):
        start_call_tracer("http://127.0.0.1:4317", Metrics(), None)


def test_a_protocol_otlp_does_not_speak_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="grpc or http/protobuf"):
        start_call_tracer("http://127.0.0.1:4317", Metrics(), None)


def test_a_queue_smaller_than_the_sdks_default_batch_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's default batch (512) above the queue: serve refused to start."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")
    check_tracing("http://127.0.0.1:4317")
    tracer = start_call_tracer("http://127.0.0.1:4317", Metrics(), None)
    assert tracer is not None
    tracer.shutdown(1.0)


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "0"},
            "OTEL_BSP_MAX_QUEUE_SIZE must be a whole number of 1 or more, got '0'",
        ),
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY must be a whole number of 1 or more"),
        (
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4000"},
            r"OTEL_BSP_MAX_EXPORT_BATCH_SIZE \(4000\) must not be above OTEL_BSP_MAX_QUEUE_SIZE \(2048\)",
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "x"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT must be a number"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"},
            "the OTLP exporter cannot start: .*TRACES_COMPRESSION",
        ),
    ],
)
def test_an_otel_value_the_exporter_cannot_start_with_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], problem: str
) -> None:
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=problem):  # check-config makes it a ConfigError (cli.py)
        check_tracing("http://127.0.0.1:4317")
    with pytest.raises(ConfigError, match=problem):
        start_call_tracer("http://127.0.0.1:4317", Metrics(), None)


def test_the_resource_names_the_service_its_instance_and_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    attributes = _resource(1).attributes
    assert attributes["service.name"] == "rerank-service"
    assert attributes["rerank.worker"] == 1
    assert attributes["deployment.environment"] == "staging"
    assert str(attributes["service.instance.id"]).endswith(f"/{os.getpid()}")

    monkeypatch.setenv("OTEL_SERVICE_NAME", "search-rerank")
    assert _resource(None).attributes["service.name"] == "search-rerank"
    assert "rerank.worker" not in _resource(None).attributes


def test_call_spans_are_named_by_the_rpc_and_http_conventions() -> None:
    assert call_span("/rerank.v1.RerankService/Rerank", False) == (
        "rerank.v1.RerankService/Rerank",
        {"rpc.system": "grpc", "rpc.service": "rerank.v1.RerankService", "rpc.method": "Rerank"},
        True,
    )
    name, _, server = call_span("/rerank.v1.RerankService/RerankStream", True)
    assert (name, server) == ("rerank.v1.RerankService/RerankStream item", False)
    assert call_span("HTTP POST /v1/rerank", False) == (
        "POST /v1/rerank",
        {"http.request.method": "POST", "http.route": "/v1/rerank"},
        True,
    )


@pytest.mark.parametrize(
    ("peer", "attributes"),
    [
        ("ipv4:127.0.0.1:5000", {"network.peer.address": "127.0.0.1"}),
        ("ipv6:[::1]:5000", {"network.peer.address": "::1"}),
        # What grpc says of an IPv6 caller: a URI, its brackets percent-encoded.
        ("ipv6:%5B::1%5D:5000", {"network.peer.address": "::1"}),
        ("ipv6:%5B2001:db8::7%5D:41234", {"network.peer.address": "2001:db8::7"}),
        ("10.0.0.7", {"network.peer.address": "10.0.0.7"}),
        ("", {}),
    ],
)
def test_the_peer_is_read_from_grpc_and_aiohttp_forms(peer: str, attributes: dict[str, object]) -> None:
    assert peer_attributes(peer) == attributes
