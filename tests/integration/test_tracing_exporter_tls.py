"""The OTLP/HTTP exporter's CA file, against a collector on HTTPS (loopback, a CA of the test's
own): the one configured is the one trusted, whatever the environment says of requests' own."""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from rerank_service.observability.tracing_export import _export
from tests.support.certs import CertificateAuthority


class _Collector(BaseHTTPRequestHandler):
    """Takes every export (an empty ExportTraceServiceResponse is zero bytes)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def authority() -> CertificateAuthority:
    return CertificateAuthority("collector CA")


@pytest.fixture
def collector(authority: CertificateAuthority, tmp_path: Path) -> Iterator[str]:
    """An OTLP/HTTP collector on HTTPS, its certificate signed by `authority`: its base URL."""
    certificate, key = authority.issue_server().write(tmp_path, "collector")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        serving.join()


def _span() -> ReadableSpan:
    context = SpanContext(0x1, 0x2, False, TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan("one", context, resource=Resource.create(), start_time=1, end_time=2)


def test_the_configured_ca_file_is_trusted_over_requests_own_variables(
    monkeypatch: pytest.MonkeyPatch, authority: CertificateAuthority, collector: str, tmp_path: Path
) -> None:
    """requests took REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE) over the exporter's CA file: every
    export failed its TLS handshake."""
    elsewhere = CertificateAuthority("some other CA").write(tmp_path, "other-ca")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(authority.write(tmp_path)))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")  # a failed export gives up within it
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(elsewhere))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(elsewhere))
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)

    assert _exported()

    # With no CA file configured, requests' own variables still say whom to trust.
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_CERTIFICATE")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(authority.write(tmp_path)))
    assert _exported()


def _exported() -> bool:
    """Whether the exporter made as the service makes it exports a span to the collector."""
    exporter, _, _ = _export(None, os.environ)
    try:
        return exporter.export([_span()]) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
