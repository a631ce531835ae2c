"""Whether a file holds PEM certificates, read as OpenSSL reads a CA bundle: the one check
behind every CA setting (the upstream's and a Redis store's CA file, the OTLP exporter's
certificate, the TLS client CA), each of which words its own error around it."""

from __future__ import annotations

import ssl
from pathlib import Path

NO_CERTIFICATE = "holds no valid PEM certificate"


def certificates_problem(path: str | Path) -> str | None:
    """None when `path` holds at least one PEM certificate and each one parses; else what is
    wrong, in words: NO_CERTIFICATE, or why it cannot be read (its OS error)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:  # before OSError: SSLError is one
        return NO_CERTIFICATE
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
