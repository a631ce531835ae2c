"""OTEL_* values OpenTelemetry's SDK takes with a warning, then loses every span or samples every
trace: `serve` and `check-config` each refuse them at start, naming the variable (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli import UPSTREAM_FILE, _serve_and_check_config_refuse

WITH_ENDPOINT = UPSTREAM_FILE + "otlp_endpoint: http://127.0.0.1:4317\n"


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        (  # check-config said ok, and serve sampled every trace
            WITH_ENDPOINT,
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidrato", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
            "OTEL_TRACES_SAMPLER must be one of always_on, always_off, parentbased_always_on, "
            "parentbased_always_off, traceidratio, parentbased_traceidratio, got 'parentbased_traceidrato'",
        ),
        (
            WITH_ENDPOINT,
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1%"},
            "OTEL_TRACES_SAMPLER_ARG must be a ratio from 0 to 1 for parentbased_traceidratio "
            "(0.01: 1% of traces), got '1%'",
        ),
        (  # the same value in otlp_endpoint was refused; over http/protobuf no exporter takes it
            UPSTREAM_FILE,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_ENDPOINT must be an http(s) URL such as http://otel-collector:4317, "
            "got 'collector:4318'",
        ),
        (
            UPSTREAM_FILE + "otlp_endpoint: http://tenant:S3cr3t-Pass@127.0.0.1:4317\n",
            {},
            "otlp-endpoint holds a user or password, which OTLP/gRPC cannot send: give it as a header, "
            "OTEL_EXPORTER_OTLP_HEADERS=authorization=Basic%20<base64 of user:password>, "
            "got 'http://***@127.0.0.1:4317'",
        ),
        (
            WITH_ENDPOINT,
            {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"},
            "OTEL_EXPORTER_OTLP_CERTIFICATE /nonexistent/ca.pem: cannot read it (No such file or directory)",
        ),
    ],
)
def test_serve_and_check_config_refuse_what_the_sdk_would_take_and_lose_spans_with(
    tmp_path: Path, text: str, env: dict[str, str], problem: str
) -> None:
    config = tmp_path / "rerank.yaml"
    config.write_text(text, encoding="utf-8")

    _serve_and_check_config_refuse(config, problem, env=env)
