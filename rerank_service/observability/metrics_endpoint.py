"""The /metrics endpoint: a registry served over HTTP on a daemon thread."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, int]:
    """Serve `registry` at http://host:port/metrics on a daemon thread; port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


def stop_metrics_server(server: WSGIServer) -> None:
    """Stop serving and close the port (blocks up to half a second: the serve loop's poll)."""
    server.shutdown()
    server.server_close()
