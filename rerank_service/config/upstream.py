"""An upstream deployment's configuration: one rerank HTTP API, its format and its limits.

What an `UpstreamBackend` is built from, and nothing else: a reload compares two of these
to decide whether a deployment is kept (its connections and health record with it), so a
change to a front-door setting never touches an upstream. The declarations (types, bounds,
defaults, help) stay in settings.py, once; `from_settings` reads the checked values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rerank_service.config.secret import Secret
from rerank_service.config.settings import Dialect, PromptTemplate, ScoreTransform, Settings


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """Attempts of one upstream call, and the jittered waits between them."""

    max_attempts: int
    backoff: float
    max_backoff: float


@dataclasses.dataclass(frozen=True)
class BreakerConfig:
    """When the deployment counts as down, and how it comes back (core/health.py)."""

    failures: int
    cooldown: float
    window: float
    probe_timeout: float


@dataclasses.dataclass(frozen=True)
class ConnectionConfig:
    """How the deployment is reached: its pool, proxy, CA bundle and timeout."""

    url: str
    timeout: float
    connect_timeout: float  # opening a connection, within `timeout`
    max_connections: int
    proxy: str | None
    ca_file: Path | None


@dataclasses.dataclass(frozen=True)
class UpstreamDeploymentConfig:
    """One rerank HTTP API serving `models` in `format` (backends/upstream/dialects.py)."""

    format: Dialect
    models: tuple[str, ...]  # the names sent upstream
    connection: ConnectionConfig
    retry: RetryConfig
    breaker: BreakerConfig
    api_key: Secret | None
    pass_through: bool  # no key of its own: callers' bearer tokens go upstream
    path: str | None  # None: the format's own path
    score_transform: ScoreTransform
    prompt_template: PromptTemplate
    documents_per_call: int | None  # None: the format's own limit
    tokens_per_call: int
    max_documents: int  # a caller's call, before the service splits it
    max_query_tokens: int
    # The model's tokenizer (a directory or a cached hub id) for long documents; None: estimated.
    tokenizer: str | None = None

    kind = "upstream"

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamDeploymentConfig:
        """The deployment the upstream settings describe (a deployment's own: the global
        ones with its overrides, config/deployments.py)."""
        return cls(
            format=settings.upstream_dialect,
            models=settings.upstream_models,
            connection=ConnectionConfig(
                url=settings.upstream_url,
                timeout=settings.upstream_timeout,
                connect_timeout=settings.upstream_connect_timeout,
                max_connections=settings.upstream_max_connections,
                proxy=settings.upstream_proxy,
                ca_file=settings.upstream_ca_file,
            ),
            retry=RetryConfig(
                settings.upstream_max_attempts,
                settings.upstream_retry_backoff,
                settings.upstream_retry_max_backoff,
            ),
            breaker=BreakerConfig(
                settings.upstream_breaker_failures,
                settings.upstream_breaker_cooldown,
                settings.upstream_breaker_window,
                settings.upstream_breaker_probe_timeout,
            ),
            api_key=settings.upstream_api_key,
            pass_through=settings.pass_through,
            path=settings.upstream_path,
            score_transform=settings.upstream_score_transform,
            prompt_template=settings.upstream_prompt_template,
            documents_per_call=settings.upstream_documents_per_call,
            tokens_per_call=settings.upstream_tokens_per_call,
            max_documents=settings.max_documents,
            max_query_tokens=settings.max_query_tokens,
            tokenizer=settings.upstream_tokenizer,
        )

    def serving(self, models: tuple[str, ...]) -> UpstreamDeploymentConfig:
        """This deployment, serving `models` instead."""
        return dataclasses.replace(self, models=models)
