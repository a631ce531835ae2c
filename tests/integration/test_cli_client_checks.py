"""Client commands (`rerank`, `health`, `models`) check their TLS files as serve checks its
own: a file that is no PEM is a one-line configuration error and exit 2 before dialling,
not grpc's log lines and an UNAVAILABLE that, from `health` as a probe, reads as a server
down. And `health --service` with a name the server does not know says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from rerank_service.cli import main
from tests.support.certs import CertificateAuthority
from tests.support.process import run_cli
from tests.support.server import ServerThread

# Nothing listens here: a command that got as far as calling would fail with exit 1.
NOWHERE = ("--target", "127.0.0.1:1", "--timeout", "3")
KEY_ENV = {"RERANK_API_KEY": ""}  # the machine's own key never decides these tests


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    ca = CertificateAuthority()
    cert, key = ca.issue_client().write(tmp_path, "client")
    _, other_key = ca.issue_client("another").write(tmp_path, "another")
    not_pem = tmp_path / "notpem.txt"
    not_pem.write_text("not a pem\n", encoding="utf-8")
    return {
        "ca": str(ca.write(tmp_path)),
        "cert": str(cert),
        "key": str(key),
        "other_key": str(other_key),
        "not_pem": str(not_pem),
    }


@pytest.mark.parametrize(
    ("command", "tls", "message"),
    [
        (
            ("rerank", "--query", "q", "-d", "a"),
            ("--tls-ca", "{not_pem}"),
            "tls-ca {not_pem}: holds no valid PEM certificate",
        ),
        (
            ("health",),
            ("--tls-ca", "{ca}", "--tls-cert", "{not_pem}", "--tls-key", "{key}"),
            "tls-cert {not_pem}: holds no valid PEM certificate",
        ),
        (
            ("health",),
            ("--tls-cert", "{cert}", "--tls-key", "{not_pem}"),
            "tls-key {not_pem}: holds no valid PEM private key",
        ),
        (
            ("models",),
            ("--tls-ca", "{ca}", "--tls-cert", "{cert}", "--tls-key", "{other_key}"),
            "tls-key {other_key} does not match the certificate in tls-cert {cert}",
        ),
    ],
    ids=["ca", "cert", "key", "key-of-another-cert"],
)
def test_a_client_tls_file_that_is_not_usable_pem_is_one_configuration_error_and_exit_2(
    files: dict[str, str], command: tuple[str, ...], tls: tuple[str, ...], message: str
) -> None:
    result = run_cli(*command, *NOWHERE, *(arg.format(**files) for arg in tls), env=KEY_ENV)

    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.strip().splitlines() == [
        f"rerank-service: configuration error: {message.format(**files)}"
    ]


def test_good_client_tls_files_pass_the_check_and_the_command_dials(files: dict[str, str]) -> None:
    result = run_cli(
        "health", *NOWHERE, "--tls-ca", files["ca"], "--tls-cert", files["cert"], "--tls-key", files["key"]
    )

    assert result.returncode == 1, result.stderr  # nothing listens
    assert "configuration error" not in result.stderr


def test_health_of_a_service_the_server_does_not_know_says_so(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--target", server.target, "--service", "nope", "--timeout", "10"]) == 1

    assert capsys.readouterr().err.strip() == "error: NOT_FOUND: no health service named 'nope'"
