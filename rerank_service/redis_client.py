"""The one way the service opens a Redis client (the score cache's shared tier, the
callers' limits): redis-py's asyncio client, bounded by a short timeout and never retrying
on its own, so a Redis that is down or slow costs a call that timeout at most; the one way
its users take it for down after a failure and try it again (`RedisOutage`); and the one
way they find the new primary after a failover (`reconnect_if_read_only`)."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_TIMEOUT = 0.05  # seconds a round trip may take


def redis_client(url: str, *, timeout: float = DEFAULT_TIMEOUT, ca_file: str | None = None) -> Redis:
    """An asyncio client for `url` (redis://, rediss:// for TLS, unix://), with `timeout` on
    connecting and on each reply, and no retries of its own (a retry would outlast the
    timeout its user promises). `ca_file`: the CAs that sign a rediss:// server's certificate
    (default: the system's).

    A new connection sends nothing before its first command but what the URL asks for
    (TLS, AUTH, SELECT): with redis-py's defaults it also sent HELLO 3, CLIENT SETNAME and
    CLIENT SETINFO twice, a round trip each within the same `timeout`, so a Redis a few
    milliseconds away never got a connection open in time. For rediss://, the TLS context
    is built here, when the client is made (`_TlsConnection`)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,  # no HELLO (and so no maintenance notifications, RESP3's alone)
        "driver_info": None,  # no CLIENT SETINFO
    }
    if ca_file is not None:
        if not url.startswith("rediss://"):
            raise ValueError("a CA file applies to a rediss:// (TLS) URL only")
        options["ssl_ca_certs"] = ca_file
    tls = urlsplit(url).scheme == "rediss"  # as redis-py reads it (urlsplit lowers the scheme)
    if tls:
        options["connection_class"] = _TlsConnection
    client = Redis.from_url(url, **options)
    if tls:
        pool = client.connection_pool
        # Built as redis-py builds it, from the URL's TLS options too (ssl_check_hostname=...).
        # settings.py checked the files; one changed since is said as a bad URL is.
        try:
            built = _TlsConnection(**pool.connection_kwargs).ssl_context.get()
        except (OSError, RedisError) as exc:  # ssl.SSLError is an OSError
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ValueError(f"its TLS context cannot be built ({why})") from None
        pool.connection_kwargs["tls_context"] = built
    return client


class _TlsConnection(SSLConnection):
    """A rediss:// connection whose client built its TLS context when it was made
    (`redis_client`). redis-py gets one at a connection's first connect, inside the
    connect's timeout, from its process-wide cache of contexts (keyed on the TLS files'
    signatures) or by building one: loading the CAs (the system's store and the CA file)
    takes 25-50 ms, most of a 50 ms timeout, so the first round trip after each start
    failed. Built up front and held here (`tls_context`, in every connection's keyword
    arguments: the cache holds a context only while something does), a connect finds it in
    the cache; a CA file or client certificate rotated on disk has a new signature, so the
    next connect builds a context from the new files (once, within its timeout). Asked at
    every connect, not once per connection object as redis-py does: the pool keeps its
    connection objects for good, reconnecting them, and they would never see a rotation."""

    def __init__(self, *, tls_context: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._built_with_client = tls_context  # held, not used: redis-py's cache finds it

    def _connection_arguments(self) -> Mapping[str, Any]:
        self.ssl_context.context = None  # looked up again (a stat of each file when unchanged)
        return super()._connection_arguments()


def timed_out(error: BaseException) -> bool:
    """Whether a failed round trip failed for want of an answer in time (ours or redis-py's)."""
    return isinstance(error, TimeoutError | RedisTimeoutError)


async def reconnect_if_read_only(client: Redis, *answers: object) -> bool:
    """Whether one of `answers` (errors raised, or a pipeline's answers) is Redis's READONLY:
    the primary was demoted to a replica by a failover (REPLICAOF, FAILOVER, Sentinel's).
    Then the client's idle connections are dropped, as redis-py's Sentinel client does, so
    its next command connects afresh through the URL's address (a VIP or a Kubernetes
    Service, which now leads to the new primary): Redis keeps a demoted primary's
    connections open, and redis-py keeps a connection answered with an error in its pool,
    so every later write would be refused on it for good. A connection another call holds
    now is left to that call (cutting it would fail it): answered READONLY in its turn, it
    is dropped then."""
    if not any(isinstance(answer, ReadOnlyError) for answer in answers):
        return False
    # A socket that will not close cleanly is dropped all the same (redis-py forgets it first).
    with contextlib.suppress(Exception):
        await client.connection_pool.disconnect(inuse_connections=False)
    return True


class RedisOutage:
    """Whether a Redis is taken for down, and when it is tried again: after a failure it is
    skipped for `retry_after` seconds, then the next caller tries it (and pushes the next try
    on, so callers meanwhile skip it). `failed` and `answered` say when the state changes,
    so that its user logs each outage once and its end once."""

    def __init__(self, retry_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._retry_after = retry_after
        self._clock = clock
        self._retry_at: float | None = None  # set while Redis is taken for down

    @property
    def up(self) -> bool:
        return self._retry_at is None

    @property
    def retry_after(self) -> float:
        """Seconds Redis is skipped after a failure."""
        return self._retry_after

    def may_try(self) -> bool:
        """Whether to try Redis now: it is up, or down and due for another try."""
        if self._retry_at is None:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._retry_after
        return True

    def failed(self) -> bool:
        """A round trip failed: Redis is down for `retry_after`. True when it was up until now."""
        was_up = self._retry_at is None
        self._retry_at = self._clock() + self._retry_after
        return was_up

    def answered(self) -> bool:
        """A round trip succeeded: Redis is up. True when it was down until now."""
        was_down = self._retry_at is not None
        self._retry_at = None
        return was_down
