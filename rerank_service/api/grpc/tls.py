"""TLS and mTLS for the server: the credentials, checked before anything starts.

gRPC reports a bad certificate or key late and vaguely (a handshake that fails for every
client), so the files are read and checked here, at start-up, with Python's `ssl` (the same
OpenSSL parsing), and each problem becomes a one-line ConfigError naming the setting and file.
Messages never quote file contents: a key must not reach a log.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from rerank_service.config import ConfigError
from rerank_service.config.file_trust import warn_if_key_exposed
from rerank_service.config.server import TlsConfig


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None to serve plaintext; ConfigError on a bad file."""
    if tls.cert is None or tls.key is None:
        return None  # settings.py already refuses one without the other
    cert = _read("tls-cert", tls.cert)
    key = _read("tls-key", tls.key)
    # OpenSSH refuses a key others may read; a container's mounted secret is often 0644,
    # so the service warns instead of refusing.
    warn_if_key_exposed(tls.key, "tls key")
    _check_certificates("tls-cert", tls.cert)
    _check_key_pair(tls.cert, tls.key, key)
    ca = None
    if tls.client_ca is not None:
        ca = _read("tls-client-ca", tls.client_ca)
        _check_certificates("tls-client-ca", tls.client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read it ({exc.strerror or exc})") from None


def _check_certificates(name: str, path: Path) -> None:
    """At least one PEM certificate, and every one parses."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        raise ConfigError(f"{name} {path}: holds no valid PEM certificate") from None


def _check_key_pair(cert: Path, key: Path, key_pem: bytes) -> None:
    if b"ENCRYPTED" in key_pem:  # PKCS#8 "ENCRYPTED PRIVATE KEY" or the older "Proc-Type: 4,ENCRYPTED"
        raise ConfigError(
            f"tls-key {key}: the key is encrypted; give it unencrypted (gRPC takes no passphrase)"
        )
    try:
        # The password callback keeps OpenSSL from ever prompting on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"tls-key {key} does not match the certificate in tls-cert {cert}") from None
        raise ConfigError(f"tls-key {key}: holds no valid PEM private key") from None
    except OSError as exc:
        raise ConfigError(f"tls-key {key}: cannot read it ({exc.strerror or exc})") from None
