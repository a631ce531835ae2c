"""The one way the service opens a Redis client (the score cache's shared tier, the
callers' limits): redis-py's asyncio client, bounded by a short timeout and never retrying
on its own, so a Redis that is down or slow costs a call that timeout at most."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

DEFAULT_TIMEOUT = 0.05  # seconds a round trip may take


def redis_client(url: str, *, timeout: float = DEFAULT_TIMEOUT, ca_file: str | None = None) -> Redis:
    """An asyncio client for `url` (redis://, rediss:// for TLS, unix://), with `timeout` on
    connecting and on each reply, and no retries of its own (a retry would outlast the
    timeout its user promises). `ca_file`: the CAs that sign a rediss:// server's certificate
    (default: the system's)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "rerank-service",
    }
    if ca_file is not None:
        if not url.startswith("rediss://"):
            raise ValueError("a CA file applies to a rediss:// (TLS) URL only")
        options["ssl_ca_certs"] = ca_file
    return Redis.from_url(url, **options)
