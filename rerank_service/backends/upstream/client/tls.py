"""The SSL context that verifies the upstream's certificate.

With `upstream-ca-file`: that PEM bundle, only. Without: what httpx trusts, in its
order: the SSL_CERT_FILE bundle, else the SSL_CERT_DIR directory, else certifi's
bundle. A file that cannot be read or holds no certificate stops start-up with one
line naming the setting, rather than failing every call later.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import httpx

from rerank_service.config import ConfigError, SettingError


def upstream_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    if ca_file is not None:
        return _trusting(ca_file)
    try:
        return httpx.create_ssl_context(trust_env=True)
    except (OSError, ssl.SSLError):  # only the environment's files can be wrong here
        name = "SSL_CERT_FILE" if os.environ.get("SSL_CERT_FILE") else "SSL_CERT_DIR"
        raise ConfigError(
            f"{name} {os.environ.get(name)}: no valid PEM certificates there "
            "(it says what to trust for the upstream; fix or unset it, or set upstream-ca-file)"
        ) from None


def _trusting(path: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=os.fspath(path))
    except ssl.SSLError:  # before OSError: SSLError is one
        raise SettingError("upstream_ca_file", "holds no valid PEM certificate", path) from None
    except OSError as exc:
        raise SettingError("upstream_ca_file", f"cannot read it ({exc.strerror or exc})", path) from None
