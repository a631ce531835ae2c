"""TLS start-up checks: every bad certificate, key or CA file is one clear ConfigError naming it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from rerank_service.api.grpc.tls import server_credentials
from rerank_service.config import ConfigError, Settings
from rerank_service.config.server import ServerConfig, TlsConfig
from tests.support.certs import CertificateAuthority
from tests.support.logs import LogCapture
from tests.support.process import run_cli


@dataclasses.dataclass(frozen=True)
class Files:
    ca: Path
    cert: Path
    key: Path
    other_key: Path  # a valid key that belongs to another certificate
    garbage: Path
    encrypted_key: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority()
    cert, key = ca.issue_server().write(directory, "server")
    _, other_key = ca.issue_client().write(directory, "other")
    garbage = directory / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    encrypted_key = directory / "encrypted-key.pem"
    encrypted_key.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG\n"
        "-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    return Files(ca.write(directory), cert, key, other_key, garbage, encrypted_key)


def tls_settings(cert: Path, key: Path, client_ca: Path | None = None) -> TlsConfig:
    return ServerConfig.from_settings(Settings(tls_cert=cert, tls_key=key, tls_client_ca=client_ca)).tls


def test_no_tls_settings_means_plaintext() -> None:
    assert server_credentials(TlsConfig(None, None, None)) is None
    assert TlsConfig(None, None, None).mode == "off"


def test_a_good_certificate_and_key_give_server_credentials_for_tls_and_mtls(files: Files) -> None:
    tls = tls_settings(files.cert, files.key)
    mtls = tls_settings(files.cert, files.key, files.ca)

    assert isinstance(server_credentials(tls), grpc.ServerCredentials)
    assert isinstance(server_credentials(mtls), grpc.ServerCredentials)
    assert (tls.mode, mtls.mode) == ("tls", "mtls")


@pytest.mark.parametrize(
    ("which", "flag", "problem"),
    [
        ("missing cert", "tls-cert", "cannot read it (No such file or directory)"),
        ("missing key", "tls-key", "cannot read it (No such file or directory)"),
        ("missing ca", "tls-client-ca", "cannot read it (No such file or directory)"),
        ("directory as cert", "tls-cert", "cannot read it (Is a directory)"),
        ("garbage cert", "tls-cert", "holds no valid PEM certificate"),
        ("key as cert", "tls-cert", "holds no valid PEM certificate"),
        ("garbage key", "tls-key", "holds no valid PEM private key"),
        ("cert as key", "tls-key", "holds no valid PEM private key"),
        ("encrypted key", "tls-key", "the key is encrypted"),
        ("mismatched key", "tls-key", "does not match the certificate in tls-cert"),
        ("garbage ca", "tls-client-ca", "holds no valid PEM certificate"),
        ("key as ca", "tls-client-ca", "holds no valid PEM certificate"),
    ],
)
def test_a_bad_tls_file_is_a_config_error_naming_the_setting_and_file(
    files: Files, which: str, flag: str, problem: str
) -> None:
    missing = files.ca.parent / "missing.pem"
    cert, key, ca = {
        "missing cert": (missing, files.key, None),
        "missing key": (files.cert, missing, None),
        "missing ca": (files.cert, files.key, missing),
        "directory as cert": (files.ca.parent, files.key, None),
        "garbage cert": (files.garbage, files.key, None),
        "key as cert": (files.key, files.key, None),
        "garbage key": (files.cert, files.garbage, None),
        "cert as key": (files.cert, files.cert, None),
        "encrypted key": (files.cert, files.encrypted_key, None),
        "mismatched key": (files.cert, files.other_key, None),
        "garbage ca": (files.cert, files.key, files.garbage),
        "key as ca": (files.cert, files.key, files.key),
    }[which]
    named = {"tls-cert": cert, "tls-key": key, "tls-client-ca": ca}[flag]

    with pytest.raises(ConfigError) as raised:
        server_credentials(tls_settings(cert, key, ca))

    message = str(raised.value)
    assert message.startswith(f"{flag} {named}")
    assert problem in message
    assert "\n" not in message
    assert "BEGIN" not in message  # never file contents, keys least of all


def test_serve_with_a_mismatched_key_exits_2_with_one_clear_line(files: Files) -> None:
    result = run_cli(
        "serve", "--backend", "upstream", "--port", "0",
        "--tls-cert", str(files.cert), "--tls-key", str(files.other_key),
    )  # fmt: skip

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"rerank-service: configuration error: tls-key {files.other_key} "
        f"does not match the certificate in tls-cert {files.cert}"
    ]


KeyMaker = Callable[[], CertificateIssuerPrivateKeyTypes]


@pytest.mark.parametrize(
    ("kind", "make_key"),
    [
        ("Ed25519", ed25519.Ed25519PrivateKey.generate),
        ("Ed448", ed448.Ed448PrivateKey.generate),
        ("EC brainpoolP256r1", lambda: ec.generate_private_key(ec.BrainpoolP256R1())),
        ("EC secp256k1", lambda: ec.generate_private_key(ec.SECP256K1())),
        ("EC secp521r1", lambda: ec.generate_private_key(ec.SECP521R1())),
    ],
    ids=["Ed25519", "Ed448", "brainpool", "secp256k1", "P-521"],
)
def test_a_key_grpc_does_not_take_is_a_config_error_naming_the_file_and_its_kind(
    tmp_path: Path, kind: str, make_key: KeyMaker
) -> None:
    """Python's OpenSSL takes each of these; gRPC's BoringSSL either loads none of them (the
    port then "cannot listen") or its clients verify no signature of theirs (Ed25519,
    P-521: every handshake fails, the service's own `health` probe's too)."""
    cert, key = CertificateAuthority().issue_server(key=make_key()).write(tmp_path, "server")

    with pytest.raises(ConfigError) as raised:
        server_credentials(tls_settings(cert, key))

    assert str(raised.value) == (
        f"tls-key {key}: gRPC's TLS does not take its {kind} key (the port would not open, or every "
        "handshake would fail): give an RSA key, or an EC key on P-256 or P-384"
    )


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["RSA", "P-256", "P-384"],
)
def test_a_key_grpc_takes_passes_and_a_grpc_client_completes_its_handshake(
    tmp_path: Path, make_key: KeyMaker
) -> None:
    ca = CertificateAuthority()
    cert, key = ca.issue_server(key=make_key()).write(tmp_path, "server")
    credentials = server_credentials(tls_settings(cert, key))
    assert credentials is not None
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca.cert_pem)) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)  # READY: the handshake passed
    finally:
        server.stop(None)


def test_serve_with_a_key_grpc_does_not_take_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    brainpool = ec.generate_private_key(ec.BrainpoolP256R1())
    cert, key = CertificateAuthority().issue_server(key=brainpool).write(tmp_path, "server")

    result = run_cli(
        "serve", "--backend", "upstream", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
    )  # fmt: skip

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"rerank-service: configuration error: tls-key {key}: gRPC's TLS does not take")
    assert "EC brainpoolP256r1 key" in line


def test_a_client_command_with_an_unreadable_ca_file_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"

    result = run_cli("health", "--target", "127.0.0.1:1", "--tls-ca", str(missing), "--timeout", "1")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"rerank-service: configuration error: tls-ca {missing}: cannot read it (No such file or directory)"
    ]


def test_a_client_certificate_without_its_key_exits_2(files: Files) -> None:
    result = run_cli("health", "--target", "127.0.0.1:1", "--tls-cert", str(files.cert), "--timeout", "1")

    assert result.returncode == 2
    assert "tls-cert and tls-key go together" in result.stderr


def test_a_private_key_others_can_read_is_warned_about_at_start(tmp_path: Path, logs: LogCapture) -> None:
    cert, key = CertificateAuthority().issue_server().write(tmp_path, "server")
    key.chmod(0o644)

    server_credentials(tls_settings(cert, key))

    [warning] = [event for event in logs.events() if event.get("event") == "tls key readable by others"]
    assert warning["level"] == "warning"
    assert warning["mode"] == "0o644"
    assert warning["fix"] == f"chmod 600 {key}"


def test_a_private_key_only_its_owner_reads_starts_without_a_word(tmp_path: Path, logs: LogCapture) -> None:
    cert, key = CertificateAuthority().issue_server().write(tmp_path, "server")
    key.chmod(0o600)

    server_credentials(tls_settings(cert, key))

    assert not [event for event in logs.events() if event.get("event") == "tls key readable by others"]
