"""The gRPC port: RerankService through the call pipeline (edge.py), health and
reflection bounded apart (side_calls.py), TLS, the cap on connections per address
(peer_guard.py) and grpc's channel options. The process that owns it is assembled above
both front doors, in rerank_service/server.py."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from rerank.v1 import rerank_pb2

from rerank_service.api.grpc.edge import RerankServiceEdge
from rerank_service.api.grpc.peer_guard import PeerGuard
from rerank_service.api.grpc.reflection import add_reflection
from rerank_service.api.grpc.servicer import RerankServicer
from rerank_service.api.grpc.side_calls import SideCallLimits, SideCalls
from rerank_service.config.server import GrpcConfig
from rerank_service.pipeline.call import Pipeline

RERANK_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class GrpcServer:
    """RerankService, health and reflection on one port."""

    # Connections per peer address, once started (peer_guard.py).
    _peer_guard: PeerGuard | None = None

    def __init__(
        self,
        config: GrpcConfig,
        pipeline: Pipeline,
        health: health_aio.HealthServicer,
        credentials: grpc.ServerCredentials | None,
        backend_time_key: str,
        *,
        reuse_port: bool,
    ) -> None:
        self.config = config
        self._credentials = credentials
        self.port: int | None = None
        self._edge = edge = RerankServiceEdge(
            pipeline,
            backend_time_key,
            stream_idle_timeout=config.stream_idle_timeout,
            max_answer_bytes=config.max_message_bytes,
        )
        options: list[tuple[str, int]] = channel_options(config)
        # A worker shares the port with its siblings (SO_REUSEPORT); one process alone must
        # not, or a second service started on its port by mistake would silently take half
        # its connections (grpc sets SO_REUSEPORT on Linux by default).
        options.append(("grpc.so_reuseport", 1 if reuse_port else 0))
        # Health and reflection have bounds of their own (side_calls.py), added to grpc's
        # limit on open calls: a flood of them never takes a slot a rerank call needs.
        self.side_calls = SideCalls(SideCallLimits.from_config(config.side_calls))
        self.side_calls.add_health(health)
        self.side_calls.add_registered(
            lambda target: add_reflection(target, (RERANK_SERVICE, HEALTH_SERVICE))
        )
        self._server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=config.max_open_calls + self.side_calls.limits.total
        )
        self._server.add_generic_rpc_handlers(
            (
                edge.handler(
                    RerankServicer(
                        pipeline,
                        stream_concurrency=config.stream_concurrency,
                        max_answer_bytes=config.max_message_bytes,
                    )
                ),
                self.side_calls,
            )
        )

    async def start(self) -> int:
        """Bind the port and start serving on it; the port."""
        host, port = self.config.host, self.config.port
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        if self._credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, self._credentials)
        await self._server.start()
        self._peer_guard = PeerGuard(self.port, self.config.max_connections_per_peer)
        self._peer_guard.start()
        return self.port

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls; calls in flight get `grace` seconds (None: as long as they take).
        RerankStreams take no new item: each ends once its items in flight are answered."""
        self._edge.drain()
        await self._server.stop(grace)
        if self._peer_guard is not None:
            self._peer_guard.stop()
            self._peer_guard = None


def channel_options(config: GrpcConfig) -> list[tuple[str, int]]:
    """gRPC core settings: message size bounds, and keepalive suited to a mesh.

    The server pings idle connections (dead peers behind a load balancer are noticed),
    accepts clients' keepalive pings down to 10 s, and asks clients to reconnect after
    `max_connection_age`, so a load balancer gets to spread long-lived connections anew.
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # grpc advertises ~2^32 streams per connection by default: one connection could
        # open tens of thousands of calls, each holding memory before it is authenticated.
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # With grpc's default "overload protection" a stream counts against the limit until the
        # server has freed it, after the client has seen its answer: a client at or below the
        # advertised limit then gets REFUSED_STREAM for calls the protocol allows. Off, the limit
        # is HTTP/2's (streams open on the connection); what calls can hold stays bounded by
        # --max-open-calls, and the streams of one connection by the limit above.
        ("grpc.http.overload_protection", 0),
        # A connection that has not sent its HTTP/2 preface and SETTINGS by then is closed:
        # silent connections cannot hold --max-connections for long.
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.keepalive_time_ms", round(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    if config.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace * 1000)),
        ]
    return options
