"""The server's TLS files: read and checked at start, and read again when they change.

gRPC reports a bad certificate or key late and vaguely (a handshake that fails for every
client), so the files are read and checked here with Python's `ssl` (the same OpenSSL
parsing), each problem a one-line ConfigError naming the setting and file. gRPC's TLS is
BoringSSL, which takes fewer kinds of key than OpenSSL: the key's kind is checked too.
Messages never quote file contents: a key must not reach a log.

Certificates are renewed on disk while the server runs (a Kubernetes Secret that
cert-manager renews, a certbot hook): `TlsFiles` says when the files changed and hands
over what they hold then, once it passes the same checks, so both ports serve the renewed
certificate without a restart. A change that does not pass (a key written before its
certificate) keeps the files read before; it is logged once, and read again at the next
change.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from rerank_service.config.file_trust import warn_if_key_exposed
from rerank_service.config.pem import NO_CERTIFICATE, certificates_problem
from rerank_service.config.server import TlsConfig
from rerank_service.config.settings import ConfigError

# A file's identity on disk: a rewrite, a replacement or a Secret's symlink swap changes it.
_Stamp = tuple[int, int, int] | None

# The EC curves of a key gRPC serves. BoringSSL loads no other curve (brainpool, secp256k1:
# the port does not open), and its clients (grpc in Python, C++, Ruby..., the rerank-service
# CLI and the chart's health probe) verify no P-521 or Ed25519 signature: every handshake fails.
_SERVED_CURVES = frozenset({"secp256r1", "secp384r1"})


@dataclass(frozen=True)
class TlsMaterial:
    """What the TLS files hold, checked: PEM bytes."""

    cert: bytes
    key: bytes
    client_ca: bytes | None  # None: no client certificates asked for


def read_tls(tls: TlsConfig) -> TlsMaterial | None:
    """The TLS files' contents, checked, or None to serve plaintext; ConfigError on a bad file."""
    if tls.cert is None or tls.key is None:
        return None  # settings.py already refuses one without the other
    cert = _read("tls-cert", tls.cert)
    key = _read("tls-key", tls.key)
    _check_certificates("tls-cert", tls.cert)
    _check_key_pair(tls.cert, tls.key, key)
    ca = None
    if tls.client_ca is not None:
        ca = _read("tls-client-ca", tls.client_ca)
        _check_certificates("tls-client-ca", tls.client_ca)
    return TlsMaterial(cert, key, ca)


class TlsFiles:
    """The TLS files as read last: `renewed` says when they changed since, and what they hold."""

    def __init__(self, tls: TlsConfig, *, port: str) -> None:
        self._tls = tls
        self._port = port  # which port reads them (each keeps its own TlsFiles), for the log
        self._paths = [path for path in (tls.cert, tls.key, tls.client_ca) if path is not None]
        self._read_at = self._stamps()
        self._refused_at: list[_Stamp] | None = None
        # gRPC asks on each new connection, from its own threads.
        self._lock = threading.Lock()

    def first(self) -> TlsMaterial | None:
        """The files as they are now, checked (ConfigError on a bad one): start-up's read."""
        self._read_at = self._stamps()
        material = read_tls(self._tls)
        if material is not None:
            # OpenSSH refuses a key others may read; a container's mounted secret is often
            # 0644, so the service warns instead of refusing.
            assert self._tls.key is not None
            warn_if_key_exposed(self._tls.key, "tls key")
        return material

    def renewed(self) -> TlsMaterial | None:
        """What the files hold, when they changed since last read and pass the checks; None
        when unchanged, or changed into something that does not pass (kept: logged once)."""
        with self._lock:
            return self._renewed()

    def _renewed(self) -> TlsMaterial | None:
        stamps = self._stamps()
        if stamps == self._read_at:
            return None
        try:
            material = read_tls(self._tls)
        except ConfigError as problem:
            if stamps != self._refused_at:
                self._refused_at = stamps
                _log().warning(
                    "tls files changed but not read: still serving the ones read before",
                    port=self._port,
                    error=str(problem),
                )
            return None
        self._read_at = stamps
        if material is not None:
            _log().info("tls files read again: new connections get the renewed certificate", port=self._port)
        return material

    def _stamps(self) -> list[_Stamp]:
        return [_stamp(path) for path in self._paths]


def _stamp(path: Path) -> _Stamp:
    try:
        info = os.stat(path)  # through symlinks: a Secret's files are links into a swapped folder
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _log() -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(logger_name="rerank_service.tls")
    return logger


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read it ({exc.strerror or exc})") from None


def _check_certificates(name: str, path: Path) -> None:
    """At least one PEM certificate, and every one parses."""
    if certificates_problem(path) is not None:
        raise ConfigError(f"{name} {path}: {NO_CERTIFICATE}")


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
    kind = _unserved_kind(key_pem)
    if kind is not None:
        raise ConfigError(
            f"tls-key {key}: gRPC's TLS does not take its {kind} key (the port would not open, or every "
            "handshake would fail): give an RSA key, or an EC key on P-256 or P-384"
        )


def _unserved_kind(key_pem: bytes) -> str | None:
    """The kind of a key gRPC cannot serve (`Ed25519`, `EC brainpoolP256r1`), or None for
    one it can: RSA, or EC on a curve of `_SERVED_CURVES`. Python's OpenSSL took it already."""
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "unknown"  # OpenSSL reads it, cryptography does not: BoringSSL would not either
    if isinstance(key, rsa.RSAPrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return None if key.curve.name in _SERVED_CURVES else f"EC {key.curve.name}"
    return type(key).__name__.removesuffix("PrivateKey")  # Ed25519, Ed448, DSA
