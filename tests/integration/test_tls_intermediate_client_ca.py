"""mTLS whose --tls-client-ca holds an intermediate CA (the one that signs the client
certificates, not a self-signed root; cert-manager's ca.crt of a CA issuer backed by an
intermediate): both ports accept its clients, as OPERATIONS.md promises, and refuse others."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rerank.v1 import rerank_pb2_grpc

from tests.conftest import ServerFactory
from tests.integration.test_http_abuse import GOOD, http_port
from tests.support.certs import CertificateAuthority, Issued
from tests.support.rpc import code_of, expect_error, request
from tests.support.server import ServerThread


class IntermediateAuthority(CertificateAuthority):
    """A CA whose own certificate `root` signs (an intermediate): it issues as any CA does.
    Only it goes into --tls-client-ca, so the root's certificate (and its path length) is
    never looked at by the server."""

    def __init__(self, root: CertificateAuthority, common_name: str = "intermediate CA") -> None:
        super().__init__(common_name)
        self._cert = (
            x509.CertificateBuilder(extensions=list(self._cert.extensions))  # a CA's, as the root's
            .subject_name(self._name)
            .issuer_name(root._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._cert.not_valid_before_utc)
            .not_valid_after(self._cert.not_valid_after_utc)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root._key.public_key()), False)
            .sign(root._key, hashes.SHA256())
        )


def grpc_call(server: ServerThread, ca_pem: bytes, client: Issued) -> int:
    """A Rerank over the gRPC port with `client`'s certificate: how many results came back."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
    )
    with grpc.secure_channel(server.target, credentials) as channel:
        response = rerank_pb2_grpc.RerankServiceStub(channel).Rerank(request(), timeout=10)
    return len(response.output.results)


def https_call(server: ServerThread, ca: Path, client: Issued, directory: Path) -> int | str:
    """A /v1/rerank over the HTTP port with `client`'s certificate: its status, or the name
    of the error that ended it (with TLS 1.3 a refused client certificate closes the
    connection after the client's handshake, so the refusal shows on the request)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(*client.write(directory, "https-client"))
    url = f"https://localhost:{http_port(server)}/v1/rerank"
    try:
        return httpx.post(url, json=GOOD, verify=context, timeout=10).status_code
    except (httpx.TransportError, ssl.SSLError) as exc:
        return type(exc).__name__


def test_an_intermediate_client_ca_is_trusted_on_both_ports(serve: ServerFactory, tmp_path: Path) -> None:
    root = CertificateAuthority("root CA")
    intermediate = IntermediateAuthority(root)
    cert, key = root.issue_server().write(tmp_path, "server")
    root_path, client_ca = root.write(tmp_path, "root"), intermediate.write(tmp_path, "client-ca")
    client = intermediate.issue_client(uris=["spiffe://mesh/ns/search/sa/indexer"])
    stranger = CertificateAuthority("another CA").issue_client("stranger")
    with serve(http_port=0, tls_cert=cert, tls_key=key, tls_client_ca=client_ca) as server:
        grpc_results = grpc_call(server, root.cert_pem, client)
        https_status = https_call(server, root_path, client, tmp_path)
        grpc_stranger = expect_error(lambda: grpc_call(server, root.cert_pem, stranger))
        https_stranger = https_call(server, root_path, stranger, tmp_path)

    assert grpc_results == len(request().documents)
    assert https_status == 200  # before: every handshake failed "unable to get issuer certificate"
    assert code_of(grpc_stranger) == grpc.StatusCode.UNAVAILABLE
    assert isinstance(https_stranger, str), https_stranger  # refused: no status
