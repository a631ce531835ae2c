"""The server's configuration, one class per concern: what the front doors, the call
pipeline and the process are built from.

Nothing here reaches a deployment (config/upstream.py, config/local.py), so a reload that
changes only these keys touches no backend. The declarations (types, bounds, defaults,
help) stay in settings.py, once; `ServerConfig.from_settings` reads the checked values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rerank_service.config.callers import CallerConfig, caller_configs
from rerank_service.config.secret import Secret
from rerank_service.config.settings import DEFAULT_LIMITS_STORE_PREFIX, LogFormat, LogLevel, Settings


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """TLS of both ports; client certificates (mTLS) when `client_ca` is set."""

    cert: Path | None
    key: Path | None
    client_ca: Path | None

    @property
    def mode(self) -> str:
        """The transport security served: off, tls, or mtls (client certificates required)."""
        if self.cert is None:
            return "off"
        return "mtls" if self.client_ca is not None else "tls"


@dataclasses.dataclass(frozen=True)
class SideCallConfig:
    """Health and reflection calls, bounded apart from rerank calls (api/grpc/side_calls.py)."""

    max_health_checks: int
    max_watch_streams: int
    watch_stream_max_age: float
    request_timeout: float


@dataclasses.dataclass(frozen=True)
class GrpcConfig:
    """The gRPC port: its connections, messages and streams."""

    host: str
    port: int
    max_message_bytes: int
    max_open_calls: int
    max_connections: int
    max_connections_per_peer: int
    max_streams_per_connection: int
    handshake_timeout: float
    keepalive_time: float
    keepalive_timeout: float
    max_connection_age: float  # 0: never
    max_connection_age_grace: float
    stream_idle_timeout: float
    stream_concurrency: int
    side_calls: SideCallConfig


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """The HTTP front door; `port` None: not served."""

    host: str
    port: int | None
    max_body_bytes: int
    body_timeout: float
    call_timeout: float
    keepalive_timeout: float
    max_connections: int
    max_connections_per_peer: int


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    """What the call pipeline admits at once (pipeline/admission.py)."""

    max_concurrent_requests: int
    max_inflight_bytes: int
    max_open_calls: int


@dataclasses.dataclass(frozen=True)
class CallConfig:
    """How the engine runs one call: its chunks and how much it may send upstream."""

    chunk_concurrency: int
    max_fanout_factor: int
    max_chunks_per_call: int = 1000  # long documents' chunks one call may score


@dataclasses.dataclass(frozen=True)
class LimitsStoreConfig:
    """Where the callers' token buckets live: Redis (`url`), or each process (None)."""

    url: str | None
    fail_open: bool  # while Redis does not answer: serve against the process's own buckets
    timeout: float
    ca_file: Path | None
    key_prefix: str = DEFAULT_LIMITS_STORE_PREFIX  # each caller's keys start with it


@dataclasses.dataclass(frozen=True)
class CallersConfig:
    """Who may call: bearer keys (none: open, or callers' tokens passed upstream) and the
    callers of the `callers:` section, with what each may call and take (docs/TENANTS.md)."""

    api_keys: tuple[Secret, ...]
    pass_through: bool
    callers: tuple[CallerConfig, ...] = ()
    limits_store: LimitsStoreConfig = LimitsStoreConfig(None, True, 0.05, None)
    max_share: float = 0.5  # of the admission slots, for a caller without its own concurrent limit
    usage_log: str | None = None  # a path, or "stdout"

    @classmethod
    def from_settings(cls, settings: Settings) -> CallersConfig:
        return cls(
            api_keys=settings.api_keys,
            pass_through=settings.pass_through,
            callers=caller_configs(settings.callers),
            limits_store=LimitsStoreConfig(
                settings.limits_store,
                settings.limits_store_failure == "open",
                settings.limits_store_timeout,
                settings.limits_store_ca_file,
                settings.limits_store_prefix,
            ),
            max_share=settings.caller_max_share,
            usage_log=settings.usage_log,
        )


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The score cache (docs/CACHE.md): an in-process tier, and a shared one in Redis."""

    memory_bytes: int  # 0: no in-process tier
    ttl: float
    store: str | None  # redis:// or rediss:// URL; None: no shared tier
    store_timeout: float
    store_ca_file: Path | None


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing (docs/OBSERVABILITY.md): where spans go. The rest (protocol,
    sampler, resource) is read from the standard OTEL_* variables by the SDK itself."""

    otlp_endpoint: str | None  # None: the OTEL_EXPORTER_OTLP_* variables decide


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    format: LogFormat
    level: LogLevel


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """The process around the servers: workers, metrics port, draining."""

    workers: int
    metrics_port: int | None
    shutdown_grace: float
    drain_delay: float


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    grpc: GrpcConfig
    http: HttpConfig
    tls: TlsConfig
    admission: AdmissionConfig
    calls: CallConfig
    callers: CallersConfig
    cache: CacheConfig
    logging: LoggingConfig
    tracing: TracingConfig
    process: ProcessConfig

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerConfig:
        return cls(
            grpc=GrpcConfig(
                host=settings.host,
                port=settings.port,
                max_message_bytes=settings.max_message_bytes,
                max_open_calls=settings.max_open_calls,
                max_connections=settings.max_connections,
                max_connections_per_peer=settings.max_connections_per_peer,
                max_streams_per_connection=settings.max_streams_per_connection,
                handshake_timeout=settings.handshake_timeout,
                keepalive_time=settings.keepalive_time,
                keepalive_timeout=settings.keepalive_timeout,
                max_connection_age=settings.max_connection_age,
                max_connection_age_grace=settings.max_connection_age_grace,
                stream_idle_timeout=settings.stream_idle_timeout,
                stream_concurrency=settings.stream_concurrency,
                side_calls=SideCallConfig(
                    max_health_checks=settings.max_health_checks,
                    max_watch_streams=settings.max_watch_streams,
                    watch_stream_max_age=settings.watch_stream_max_age,
                    request_timeout=settings.side_call_timeout,
                ),
            ),
            http=HttpConfig(
                host=settings.host,
                port=settings.http_port,
                max_body_bytes=settings.max_message_bytes,
                body_timeout=settings.http_body_timeout,
                call_timeout=settings.http_call_timeout,
                keepalive_timeout=settings.http_keepalive_timeout,
                max_connections=settings.http_max_connections,
                max_connections_per_peer=settings.max_connections_per_peer,
            ),
            tls=TlsConfig(settings.tls_cert, settings.tls_key, settings.tls_client_ca),
            admission=AdmissionConfig(
                max_concurrent_requests=settings.max_concurrent_requests,
                max_inflight_bytes=settings.max_inflight_bytes,
                max_open_calls=settings.max_open_calls,
            ),
            calls=CallConfig(
                chunk_concurrency=settings.chunk_concurrency,
                max_fanout_factor=settings.max_fanout_factor,
                max_chunks_per_call=settings.max_chunks_per_call,
            ),
            callers=CallersConfig.from_settings(settings),
            cache=CacheConfig(
                memory_bytes=settings.cache_memory_mb * 1024 * 1024,
                ttl=settings.cache_ttl,
                store=settings.cache_store,
                store_timeout=settings.cache_store_timeout,
                store_ca_file=settings.cache_store_ca_file,
            ),
            logging=LoggingConfig(format=settings.log_format, level=settings.log_level),
            tracing=TracingConfig(otlp_endpoint=settings.otlp_endpoint),
            process=ProcessConfig(
                workers=settings.workers,
                metrics_port=settings.metrics_port,
                shutdown_grace=settings.shutdown_grace,
                drain_delay=settings.drain_delay,
            ),
        )
