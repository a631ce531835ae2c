"""A certificate renewed on disk while the server runs (cert-manager renewing a Secret) is
what new connections get, on both ports, without a restart; a renewal that does not pass
the checks leaves the certificate served before in place."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

from rerank_service.api.http.server import keep_renewed, ssl_context
from rerank_service.config.server import TlsConfig
from tests.conftest import ServerFactory
from tests.support.certs import CertificateAuthority, Issued
from tests.support.logs import LogCapture
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread


def install(directory: Path, issued: Issued) -> tuple[Path, Path]:
    """The server's files, replaced whole as a Secret's are (each file swapped at once)."""
    paths = directory / "tls.crt", directory / "tls.key"
    for path, content in zip(paths, (issued.cert_pem, issued.key_pem), strict=True):
        fresh = path.with_suffix(".new")
        fresh.write_bytes(content)
        fresh.chmod(0o600)
        os.replace(fresh, path)
    return paths


def rerank_trusting(server: ServerThread, ca: CertificateAuthority) -> rerank_pb2.RerankResponse:
    """A call on a new connection that trusts `ca` only."""
    with grpc.secure_channel(
        server.target, grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    ) as channel:
        response: rerank_pb2.RerankResponse = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(
            request(), timeout=10
        )
        return response


def test_the_grpc_port_serves_a_renewed_certificate_to_new_connections(
    serve: ServerFactory, tmp_path: Path, logs: LogCapture
) -> None:
    first, second = CertificateAuthority("first CA"), CertificateAuthority("second CA")
    cert, key = install(tmp_path, first.issue_server())
    with serve(tls_cert=cert, tls_key=key) as server:
        before = rerank_trusting(server, first)
        install(tmp_path, second.issue_server())
        renewed = rerank_trusting(server, second)  # its handshake reads the files again
        stale = expect_error(lambda: rerank_trusting(server, first))

    assert len(before.output.results) == len(renewed.output.results) == len(request().documents)
    assert code_of(stale) == grpc.StatusCode.UNAVAILABLE  # the first CA's certificate is gone
    read = [e for e in logs.events() if e.get("event", "").startswith("tls files read again")]
    # Each port reads the files on its own: the line says which (here the gRPC port alone runs).
    assert [e.get("port") for e in read] == ["grpc"]


def test_a_renewal_whose_key_does_not_match_keeps_the_certificate_served_before(
    serve: ServerFactory, tmp_path: Path, logs: LogCapture
) -> None:
    first, second = CertificateAuthority("first CA"), CertificateAuthority("second CA")
    cert, key = install(tmp_path, first.issue_server())
    with serve(tls_cert=cert, tls_key=key) as server:
        mismatched = Issued(second.issue_server().cert_pem, first.issue_server().key_pem)
        install(tmp_path, mismatched)
        answers = [rerank_trusting(server, first) for _ in range(2)]

    assert all(len(answer.output.results) == len(request().documents) for answer in answers)
    refused = [e for e in logs.events() if e.get("event", "").startswith("tls files changed but not read")]
    assert len(refused) == 1  # once for the change, not once per connection
    assert "does not match" in refused[0]["error"]


def test_a_renewal_to_a_key_grpc_does_not_take_keeps_the_certificate_served_before(
    serve: ServerFactory, tmp_path: Path, logs: LogCapture
) -> None:
    """Python's OpenSSL takes an Ed25519 key, but gRPC's clients verify no Ed25519 signature:
    taken, it would have failed every new connection's handshake while the log said the
    renewed certificate was served."""
    first, second = CertificateAuthority("first CA"), CertificateAuthority("second CA")
    cert, key = install(tmp_path, first.issue_server())
    with serve(tls_cert=cert, tls_key=key) as server:
        install(tmp_path, second.issue_server(key=ed25519.Ed25519PrivateKey.generate()))
        answers = [rerank_trusting(server, first) for _ in range(2)]

    assert all(len(answer.output.results) == len(request().documents) for answer in answers)
    assert not [e for e in logs.events() if e.get("event", "").startswith("tls files read again")]
    refused = [e for e in logs.events() if e.get("event", "").startswith("tls files changed but not read")]
    assert [e.get("port") for e in refused] == ["grpc"]
    assert "gRPC's TLS does not take its Ed25519 key" in refused[0]["error"]


async def handshake_trusting(port: int, ca: CertificateAuthority) -> bool:
    """Whether a TLS handshake with the listener on `port` passes, trusting `ca` only."""
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
    except ssl.SSLError:
        return False
    writer.close()
    return True


async def test_the_http_port_loads_a_renewed_certificate_into_its_listener(
    tmp_path: Path, logs: LogCapture
) -> None:
    first, second = CertificateAuthority("first CA"), CertificateAuthority("second CA")
    cert, key = install(tmp_path, first.issue_server())
    tls = TlsConfig(cert=cert, key=key, client_ca=None)
    context = ssl_context(tls)
    assert context is not None
    listener = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    renewing = asyncio.create_task(keep_renewed(context, tls, every=0.01))
    try:
        assert await handshake_trusting(port, first)
        install(tmp_path, second.issue_server())
        deadline = time.monotonic() + 10  # guards a hang only: each look comes 10 ms after the last
        while not await handshake_trusting(port, second):
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            await asyncio.sleep(0.01)
        assert not await handshake_trusting(port, first)
    finally:
        renewing.cancel()
        listener.close()
        await listener.wait_closed()
    read = [e for e in logs.events() if e.get("event", "").startswith("tls files read again")]
    assert [e.get("port") for e in read] == ["http"]
