"""TLS and mTLS end to end: a real server on loopback with certificates the tests make.

Under mTLS a client without a certificate, or with one from another CA, is refused in the
handshake (the client sees UNAVAILABLE); a client with a certificate from the configured CA is served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.testing.fake_upstream import expected_ranking
from tests.conftest import ServerFactory
from tests.support.certs import CertificateAuthority, Issued
from tests.support.logs import LogCapture
from tests.support.process import run_cli
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread


@dataclasses.dataclass(frozen=True)
class Pki:
    """The test's CA and what it issued, as files (for the server and CLI) and PEM (for stubs)."""

    directory: Path
    ca: Path
    ca_pem: bytes
    server_cert: Path
    server_key: Path
    client: Issued  # signed by the CA
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue_server(dns_names=("localhost",), ips=("127.0.0.1",)).write(
        directory, "server"
    )
    client = ca.issue_client()
    client.write(directory, "client")
    stranger = CertificateAuthority("another CA").issue_client("stranger")
    return Pki(directory, ca.write(directory), ca.cert_pem, server_cert, server_key, client, stranger)


@pytest.fixture
def tls_server(serve: ServerFactory, pki: Pki) -> Iterator[ServerThread]:
    """TLS without client certificates."""
    with serve(tls_cert=pki.server_cert, tls_key=pki.server_key) as running:
        yield running


@pytest.fixture
def mtls_server(serve: ServerFactory, pki: Pki) -> Iterator[ServerThread]:
    """TLS that requires a client certificate signed by the test's CA."""
    with serve(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca) as running:
        yield running


def secure_channel(server: ServerThread, ca_pem: bytes, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(server.target, credentials)


def rerank_over(channel: grpc.Channel) -> rerank_pb2.RerankResponse:
    with channel:
        response: rerank_pb2.RerankResponse = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(
            request(), timeout=10
        )
        return response


def refused_code(channel: grpc.Channel) -> grpc.StatusCode:
    return code_of(expect_error(lambda: rerank_over(channel)))


def ranking(response: rerank_pb2.RerankResponse) -> list[tuple[int, float]]:
    return [(result.index, result.relevance_score) for result in response.output.results]


EXPECTED = expected_ranking(request().query, list(request().documents))


def test_a_client_trusting_the_ca_is_served_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    response = rerank_over(secure_channel(tls_server, pki.ca_pem))

    assert ranking(response) == EXPECTED


def test_a_plaintext_client_gets_no_answer_from_a_tls_server(tls_server: ServerThread) -> None:
    assert refused_code(grpc.insecure_channel(tls_server.target)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_refuses_the_server(tls_server: ServerThread) -> None:
    other_ca = CertificateAuthority("not the server's CA").cert_pem

    assert refused_code(secure_channel(tls_server, other_ca)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: ServerThread, pki: Pki) -> None:
    assert refused_code(secure_channel(mtls_server, pki.ca_pem)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_with_a_certificate_signed_by_the_client_ca(
    mtls_server: ServerThread, pki: Pki
) -> None:
    response = rerank_over(secure_channel(mtls_server, pki.ca_pem, pki.client))

    assert ranking(response) == EXPECTED


def test_mtls_refuses_a_client_certificate_signed_by_another_ca(mtls_server: ServerThread, pki: Pki) -> None:
    assert refused_code(secure_channel(mtls_server, pki.ca_pem, pki.stranger)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_health_needs_a_client_certificate_too(mtls_server: ServerThread, pki: Pki) -> None:
    with secure_channel(mtls_server, pki.ca_pem, pki.client) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    with secure_channel(mtls_server, pki.ca_pem) as channel:
        refused = expect_error(
            lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        )

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert code_of(refused) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("mode", ["off", "tls", "mtls"])
def test_the_listening_log_line_says_which_tls_mode(
    serve: ServerFactory, pki: Pki, logs: LogCapture, mode: str
) -> None:
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    settings = {"off": {}, "tls": tls, "mtls": {**tls, "tls_client_ca": pki.ca}}[mode]

    with serve(**settings):
        listening = [event for event in logs.events() if event.get("event") == "listening"]

    assert [event["tls"] for event in listening] == [mode]


def test_the_cli_health_command_speaks_mtls(mtls_server: ServerThread, pki: Pki) -> None:
    client_cert, client_key = pki.directory / "client.pem", pki.directory / "client-key.pem"
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]

    served = run_cli("health", "--target", mtls_server.target, *tls)
    refused = run_cli("health", "--target", mtls_server.target, "--tls-ca", str(pki.ca), "--timeout", "5")

    assert (served.returncode, served.stdout.strip()) == (0, "SERVING")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAVAILABLE")


def test_the_cli_rerank_command_trusts_the_ca_it_is_given(tls_server: ServerThread, pki: Pki) -> None:
    result = run_cli(
        "rerank", "--target", tls_server.target, "--tls-ca", str(pki.ca), "--model", "qwen3-rerank",
        "--query", request().query, *[f"-d{d}" for d in request().documents],
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    ranked = [int(line.split("[", 1)[1].split("]", 1)[0]) for line in lines[1:]]
    assert ranked == [index for index, _ in EXPECTED]
