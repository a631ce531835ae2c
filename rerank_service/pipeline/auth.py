"""Bearer tokens in gRPC metadata or HTTP headers: reading them (callers.py says whose they are)."""

from __future__ import annotations

from collections.abc import Iterable

from rerank_service.config.secret import Secret

Metadata = Iterable[tuple[str, str | bytes]]


def bearer_token(metadata: Metadata | None) -> Secret | None:
    """The token of an `authorization: Bearer <token>` entry, if there is one."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        parts = value.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
            return Secret(parts[1].strip())
    return None
