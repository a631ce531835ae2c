"""TLS and mTLS for the gRPC port: credentials over the server's TLS files, checked before
anything starts (config/tls_files.py), and read again on the first new connection after
they change on disk, so a renewed certificate is served without a restart."""

from __future__ import annotations

import grpc

from rerank_service.config.server import TlsConfig
from rerank_service.config.tls_files import TlsFiles, TlsMaterial


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None to serve plaintext; ConfigError on a bad file."""
    files = TlsFiles(tls)
    material = files.first()
    if material is None:
        return None

    def renewed() -> grpc.ServerCertificateConfiguration | None:
        # Asked by grpc before each new connection's handshake: None keeps the configuration.
        changed = files.renewed()
        return None if changed is None else _configuration(changed)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(material),
        renewed,  # type: ignore[arg-type]  # grpc documents None as "no change"; its stubs omit it
        require_client_authentication=material.client_ca is not None,
    )


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )
