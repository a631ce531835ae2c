"""When tracing is on, what a process says of itself, and what is refused at start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from rerank_service.config import ConfigError
from rerank_service.observability.metrics import Metrics
from rerank_service.observability.tracing import tracing_wanted
from rerank_service.observability.tracing_export import (
    _resource,
    call_span,
    check_tracing,
    peer_attributes,
    start_tracing,
)
from rerank_service.server import start_call_tracer
from tests.support.certs import CertificateAuthority


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
        # The SDK sampled every trace, with a warning, for a sampler it does not know or a
        # ratio that is no number from 0 to 1.
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidrato"},
            "OTEL_TRACES_SAMPLER must be one of always_on, .*, got 'parentbased_traceidrato'",
        ),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER must be one of"),
        ({"OTEL_TRACES_SAMPLER": "xray"}, "OTEL_TRACES_SAMPLER must be one of"),
        *(
            (
                {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio},
                f"OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1 .*, got '{ratio}'",
            )
            for ratio in ("1%", "0,01", "nan", "inf", "5", "-0.1")
        ),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5"}, "OTEL_TRACES_SAMPLER_ARG"),
        # The SDK read a CA file only as it exported: every export failed over http/protobuf,
        # and over gRPC it trusted the system's CAs instead.
        (
            {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
            r"OTEL_EXPORTER_OTLP_CERTIFICATE /nonexistent/ca\.pem: cannot read it "
            r"\(No such file or directory\)",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": "/nonexistent/client.pem"},
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE /nonexistent/client.pem: cannot read it",
        ),
        (
            {"OTEL_EXPORTER_OTLP_CLIENT_KEY": "/nonexistent/client-key.pem"},
            "OTEL_EXPORTER_OTLP_CLIENT_KEY /nonexistent/client-key.pem: cannot read it",
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


@pytest.mark.parametrize(
    ("sampler", "argument", "built"),
    [
        (None, None, DEFAULT_ON),
        ("always_off", "0.5", ALWAYS_OFF),  # an argument the sampler takes none of is not read
        ("ParentBased_TraceIdRatio", " 0.25 ", ParentBasedTraceIdRatio(0.25)),  # as the SDK reads it
        ("traceidratio", "0", TraceIdRatioBased(0.0)),
        ("traceidratio", None, TraceIdRatioBased(1.0)),  # OpenTelemetry's default ratio
    ],
)
def test_the_tracer_samples_with_the_sampler_the_variables_name(
    monkeypatch: pytest.MonkeyPatch, sampler: str | None, argument: str | None, built: Sampler
) -> None:
    for variable, value in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", argument)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    tracer = start_tracing("http://127.0.0.1:4317", Metrics())
    try:
        assert tracer.sampler == built.get_description()  # what the start's `tracing on` line says
    finally:
        tracer.shutdown(1.0)


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_ENDPOINT must be an http(s) URL such as http://otel-collector:4317, "
            "got 'collector:4318'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://collector:4318/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT must be an http(s) URL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_ENDPOINT must be an http(s) URL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:43l7"},
            "OTEL_EXPORTER_OTLP_ENDPOINT has an invalid port or host, got 'http://collector:43l7'",
        ),
        (  # the traces' own is the one exported to
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://collector:4317",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            },
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT must be an http(s) URL",
        ),
    ],
)
def test_an_endpoint_variable_that_is_no_http_url_is_refused_as_otlp_endpoint_is(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], problem: str
) -> None:
    """The SDK took them, and every export failed (--otlp-endpoint refused the same value)."""
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(problem)):
        check_tracing(None)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        start_call_tracer(None, Metrics(), None)


@pytest.mark.parametrize(
    "target", ["collector:4317", "127.0.0.1:4317", "dns:///collector:4317", "unix:/run/otel.sock"]
)
def test_a_grpc_target_without_a_scheme_is_taken_as_the_sdk_takes_it(
    monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """OTel's own rule: over gRPC an endpoint without http(s) is a target grpc dials, over
    TLS unless OTEL_EXPORTER_OTLP_INSECURE=true (a setup that worked must keep working)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", target)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    check_tracing(None)


def test_an_endpoint_variable_another_one_overrides_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector:4317")  # the other signals' business
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")
    check_tracing(None)
    check_tracing("http://127.0.0.1:4317")


PASSWORD = "S3cr3t-Pass"


@pytest.mark.parametrize(
    ("endpoint", "environ", "source"),
    [
        (f"http://tenant:{PASSWORD}@127.0.0.1:4317", {}, "otlp-endpoint"),
        (
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"https://tenant:{PASSWORD}@collector:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            None,
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://tenant:{PASSWORD}@127.0.0.1:4317"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
    ],
)
def test_a_user_and_password_in_an_otlp_grpc_endpoint_is_refused_pointing_to_the_headers(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, environ: dict[str, str], source: str
) -> None:
    """The gRPC exporter dialled `tenant:password@host:port`: every export failed."""
    for variable, value in environ.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match="OTLP/gRPC") as refused:
        check_tracing(endpoint)
    message = str(refused.value)
    assert message.startswith(f"{source} holds a user or password")
    assert "OTEL_EXPORTER_OTLP_HEADERS=authorization=Basic%20" in message
    assert PASSWORD not in message
    with pytest.raises(ConfigError, match="OTLP/gRPC") as refused_at_start:
        start_call_tracer(endpoint, Metrics(), None)
    assert PASSWORD not in str(refused_at_start.value)

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")  # sent as basic authentication
    check_tracing(endpoint)


def test_the_exporters_tls_files_are_read_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    authority = CertificateAuthority()
    ca = authority.write(tmp_path)
    certificate, key = authority.issue_client().write(tmp_path, "client")
    _, other_key = authority.issue_client().write(tmp_path, "other")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", str(certificate))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", str(key))
    check_tracing("https://127.0.0.1:4318")

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", str(other_key))  # the traces' own first
    with pytest.raises(
        ValueError, match=f"OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY {other_key}: holds no unencrypted"
    ):
        check_tracing("https://127.0.0.1:4318")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY")

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(key))  # a key is no certificate
    with pytest.raises(
        ValueError, match=f"OTEL_EXPORTER_OTLP_CERTIFICATE {key}: holds no valid PEM certificate"
    ):
        check_tracing("https://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca))

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")  # a key alone: no client certificate sent
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_CLIENT_KEY is set without"):
        check_tracing("https://127.0.0.1:4318")
