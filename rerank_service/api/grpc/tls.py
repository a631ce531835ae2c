"""TLS and mTLS for the gRPC port: credentials over the server's TLS files, checked before
anything starts (config/tls_files.py), and read again on the first new connection after
they change on disk, so a renewed certificate is served without a restart; and the names
a client certificate holds, read from the certificate itself."""

from __future__ import annotations

import functools

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from rerank_service.config.server import TlsConfig
from rerank_service.config.tls_files import TlsFiles, TlsMaterial

# Client certificates whose names are kept parsed: every call of a connection brings the
# same one, and parsing it costs tens of microseconds.
_CERTIFICATES_KEPT = 1024


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None to serve plaintext; ConfigError on a bad file."""
    files = TlsFiles(tls, port="grpc")
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


@functools.lru_cache(maxsize=_CERTIFICATES_KEPT)
def certificate_names(pem: bytes) -> tuple[tuple[str, ...], str | None] | None:
    """A client certificate's URI SANs and its subject's first CN (the HTTP port's), whole;
    None when it cannot be parsed. Not grpc's auth context's `peer_uri` and
    `x509_common_name`: C strings there, cut at a NUL byte, so that a certificate for
    `spiffe://…/indexer\\0.evil` or CN `batch\\0evil` would read as another's identity."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        try:
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = tuple(names.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            uris = ()
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return None  # grpc verified it, yet it does not parse here: it names nobody
    common_name = common_names[0].value if common_names else None
    return uris, common_name if isinstance(common_name, str) else None
