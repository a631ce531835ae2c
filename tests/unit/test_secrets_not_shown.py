"""Credentials an error or a library's log line could repeat: a URL's password, a key pasted
where its file goes, the trace exporter's headers, a key file with a comment line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO, cast

import pytest
from cryptography.hazmat.primitives import serialization

from rerank_service.cli import main
from rerank_service.config import ConfigError, load_settings
from rerank_service.config.secret import file_named, key_fault, maskable, url_named
from rerank_service.observability.logging import configure_logging, get_logger
from rerank_service.observability.metrics import Metrics
from tests.support.certs import CertificateAuthority
from tests.support.logs import LogCapture

SECRET = "hunter2-Secret"
OTLP_TOKEN = "OTLP-Token-XYZ-123456"


def refusal(**env: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"RERANK_BACKEND": "upstream", "RERANK_UPSTREAM_URL": "http://127.0.0.1:9", **env})
    return str(raised.value)


# --- a URL's user and password -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@redis:6379/0", "redis://***@redis:6379/0"),
        (f"http://user:{SECRET}/x#y?z@proxy:3128", "http://***@proxy:3128"),
        (f"http://user:{SECRET}@x@proxy:3128", "http://***@proxy:3128"),  # an unencoded @ too
        (f"user:{SECRET}@proxy:3128", "***@proxy:3128"),  # no scheme
        ("http://proxy.internal:3128", "http://proxy.internal:3128"),
    ],
)
def test_a_url_is_shown_with_its_user_and_password_masked_however_they_are_written(
    url: str, shown: str
) -> None:
    assert url_named(url) == shown


def test_usage_never_prints_the_password_of_the_metrics_url(capsys: pytest.CaptureFixture[str]) -> None:
    for url in (f"http://ops:{SECRET}@127.0.0.1:9/metrics", f"http://ops:{SECRET}/x@127.0.0.1:9/metrics"):
        assert main(["usage", "--metrics", url]) == 1

        printed = capsys.readouterr()
        assert "cannot read http://***@127.0.0.1:9/metrics" in printed.err
        assert SECRET not in printed.out + printed.err


# --- a key pasted where its file goes ------------------------------------------------------------


@pytest.mark.parametrize(
    "pasted",
    ["/q8SECRETXYZbase64keyAbc+9=", "/q8SECRET/XYZbase64keyAbc+9="],
    ids=["no other slash", "another slash"],
)
def test_a_base64_key_starting_with_a_slash_pasted_where_its_file_goes_is_not_repeated(pasted: str) -> None:
    message = refusal(RERANK_UPSTREAM_API_KEY_FILE=pasted)

    assert message.startswith("upstream-api-key-file (an absolute path that may be a key, not repeated): ")
    assert "SECRET" not in message


def test_a_missing_key_file_in_a_directory_that_exists_is_still_named(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")

    assert file_named(absent) == absent
    assert file_named("~/keys/upstream") == "~/keys/upstream"
    assert absent in refusal(RERANK_UPSTREAM_API_KEY_FILE=absent)


# --- a key that no HTTP client sends -------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "sk-SECRETKEY-XYZ-1234\n# rotated 2026-01\n",
        "sk-SECRETKEY-XYZ-1234 # rotated\n",
        "sk-SECRETKEY\x01XYZ\n",
    ],
    ids=["a comment line", "a comment after it", "a control character"],
)
def test_an_upstream_key_file_holding_more_than_the_key_is_refused_at_load_naming_the_file(
    tmp_path: Path, text: str
) -> None:
    """It was accepted, and every call then failed INTERNAL ("Forbidden control character
    detected in headers"), naming nothing."""
    key_file = tmp_path / "upstream.key"
    key_file.write_text(text, encoding="utf-8")
    key_file.chmod(0o600)

    message = refusal(RERANK_UPSTREAM_API_KEY_FILE=str(key_file))

    assert message.startswith(f"upstream-api-key-file {key_file}: the key holds ")
    assert message.endswith("(from RERANK_UPSTREAM_API_KEY_FILE)")
    assert "SECRETKEY" not in message


def test_an_upstream_key_variable_holding_a_space_is_refused_naming_the_variable() -> None:
    message = refusal(RERANK_UPSTREAM_API_KEY="sk-SECRETKEY-XYZ # rotated")

    assert message == "RERANK_UPSTREAM_API_KEY: the key holds a space: write the key alone, with no comment"


def test_a_plain_key_has_no_fault() -> None:
    assert key_fault("sk-0123456789abcdef+/=") is None
    assert key_fault("a\tb") is not None


# --- the trace exporter's headers ----------------------------------------------------------------


def test_a_malformed_otlp_header_is_never_repeated_by_opentelemetrys_warning() -> None:
    from opentelemetry.util.re import parse_env_headers

    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))

    parse_env_headers(f"authorization: Bearer {OTLP_TOKEN}", liberal=True)

    (event,) = capture.events()
    assert event["event"].startswith("Header format invalid!")
    assert "OTEL_EXPORTER_OTLP_HEADERS" in event["event"]
    assert OTLP_TOKEN not in capture.text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_HEADERS", f"x-tenant=3,authorization=Bearer%20{OTLP_TOKEN}"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"api-key={OTLP_TOKEN}"),
    ],
)
def test_the_exporters_headers_are_masked_in_the_log_once_tracing_starts(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A collector (or an auth proxy before it) that refuses an export may quote the
    credential it got, and the exporter logs its answer."""
    from rerank_service.observability.tracing_export import start_tracing

    monkeypatch.setenv(variable, value)
    capture = LogCapture()
    configure_logging("json", "info", stream=cast(TextIO, capture))
    tracing = start_tracing("http://127.0.0.1:9", Metrics())
    try:
        get_logger("opentelemetry.exporter.otlp.proto.grpc.exporter").error(
            f"Failed to export traces, error details: invalid credentials: authorization=Bearer {OTLP_TOKEN}"
        )
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").error(
            "error details: %s", f"got {OTLP_TOKEN}"
        )
    finally:
        tracing.shutdown(1.0)

    assert "Failed to export traces" in capture.text
    assert OTLP_TOKEN not in capture.text


def test_only_credential_headers_and_real_passwords_are_masked() -> None:
    """A tenant header (x-scope-orgid=rerank) masked every line's "rerank"; a 1-character
    Redis password made every `"documents":2` a mask, and the line no JSON."""
    from rerank_service.observability.tracing_export import exporter_secrets

    masked = {
        secret.reveal()
        for secret in exporter_secrets(
            {
                "OTEL_EXPORTER_OTLP_HEADERS": (
                    f"x-scope-orgid=rerank,x-api-key={OTLP_TOKEN},uptrace-dsn=dsn-0123,"
                    "x-api-version=2026,x-bypass-cache=true"  # no credentials, by their words
                ),
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20tok-0123456789",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:2@collector:4318",
            }
        )
    }

    assert masked == {
        OTLP_TOKEN,
        "dsn-0123",
        "Bearer%20tok-0123456789",
        "Bearer tok-0123456789",
        "tok-0123456789",
    }


def test_a_store_urls_tls_key_passphrase_is_masked_and_never_repeated(tmp_path: Path) -> None:
    """Its query's ssl_password was printed whole in a configuration error."""
    issued = CertificateAuthority().issue_client()
    cert, key = issued.write(tmp_path, "client")
    loaded = serialization.load_pem_private_key(issued.key_pem, password=None)
    key.write_bytes(  # the key encrypted with the URL's password, as ssl_password is for
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"KeyPass-0123"),
        )
    )
    url = (
        f"rediss://redis.internal:6380/0?ssl_certfile={cert}&ssl_keyfile={key}"
        "&ssl_password=KeyPass-0123&health_check_interval=x"
    )

    message = refusal(RERANK_CACHE_STORE=url)
    masked = {
        secret.reveal()
        for secret in load_settings(
            {},
            {
                "RERANK_BACKEND": "upstream",
                "RERANK_UPSTREAM_URL": "http://127.0.0.1:9",
                "RERANK_CACHE_STORE": url.replace("health_check_interval=x", "health_check_interval=5"),
            },
        ).secrets()
    }

    assert "KeyPass-0123" not in message
    assert "KeyPass-0123" in masked


@pytest.mark.parametrize("value", ["123456", "true", "abc"])
def test_a_short_password_that_reads_as_json_is_masked_nowhere(value: str) -> None:
    assert not maskable(value)
