"""The httpx transport that carries the upstream calls: direct on the lean pool, or via a proxy.

Direct calls, the usual case and the performance path, go through httpx's transport on
LeanConnectionPool (pool.py says why). Calls through a proxy go through httpx's own
proxy transport, on httpcore's pool: the lean pool only opens connections straight to
its origin, and carrying a proxy would mean re-implementing httpcore's forwarding
(absolute-form requests, proxy authentication) and tunnelling (CONNECT, then TLS to the
upstream inside the tunnel) on more of its private API. A proxied deployment pays a hop
through the proxy on every call anyway; the direct path does no per-call work for this.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from rerank_service.backends.upstream.client.network import AsyncioBackend
from rerank_service.backends.upstream.client.pool import LeanConnectionPool
from rerank_service.backends.upstream.client.proxies import proxy_for
from rerank_service.backends.upstream.client.tls import upstream_ssl_context

# Seconds an idle connection is kept for reuse.
KEEPALIVE_EXPIRY = 30.0


def open_transport(
    url: httpx.URL, max_connections: int, *, proxy: str | None = None, ca_file: Path | None = None
) -> httpx.AsyncHTTPTransport:
    """The transport for calls to `url`; ConfigError for a bad CA file or proxy URL."""
    ssl_context = upstream_ssl_context(ca_file)
    route = proxy_for(url, proxy)
    if route is None:
        return pooled_transport(max_connections, ssl_context)
    return proxied_transport(route, max_connections, ssl_context)


def check_connection_settings(base_url: str, proxy: str | None, ca_file: Path | None) -> None:
    """ConfigError, naming the setting, if `ca_file` or the proxy that applies is unusable."""
    upstream_ssl_context(ca_file)
    proxy_for(httpx.URL(base_url), proxy)


def pooled_transport(
    max_connections: int, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncHTTPTransport:
    """httpx's transport on a pool that costs O(1) a call, with a cheap liveness probe."""
    if ssl_context is None:
        ssl_context = upstream_ssl_context(None)
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False)
    # httpx takes no pool or network backend, so the pool it built is swapped for ours
    # (pool.py says why); tests/unit/test_httpcore_private_api.py fails if httpx renames it.
    # httpx annotates the attribute as httpcore's pool; it only calls the interface both speak.
    transport._pool = LeanConnectionPool(  # type: ignore[assignment]
        max_connections=max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
        ssl_context=ssl_context,
        network_backend=AsyncioBackend(),
    )
    return transport


def proxied_transport(
    proxy: httpx.Proxy, max_connections: int, ssl_context: ssl.SSLContext
) -> httpx.AsyncHTTPTransport:
    """httpx's proxy transport: plain http upstreams in absolute form, https through CONNECT."""
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    return httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False, proxy=proxy, limits=limits)
