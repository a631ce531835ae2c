"""Routes and deployments from the settings: the `models:` section, or the flags alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from rerank_service.config import ConfigError, SettingError, Settings
from rerank_service.config.deployments import deployment_specs, origin_of
from rerank_service.core.backend import Backend
from rerank_service.core.retry_budget import RetryBudget
from rerank_service.routing.deployment import Deployment
from rerank_service.routing.route import Member, Route
from rerank_service.routing.router import Router


def build_routes(settings: Settings, reuse: Iterable[Deployment] = ()) -> list[Route]:
    """Every route the settings describe.

    Without a `models:` section, one deployment (the upstream, or the local models)
    serves every configured model name, each its own route, exactly as the flags say.
    A deployment of `reuse` built from the same settings is kept as it is (a reload keeps
    its connections, its health and its loaded model).
    """
    existing = {deployment.key: deployment for deployment in reuse}

    def deployment(name: str, own: Settings, place: str | None = None) -> Deployment:
        key = (name, _backend_view(own))
        found = existing.get(key)
        if found is None:
            try:
                backend = _backend(own)
            except ConfigError as exc:  # a CA file or proxy of the deployment's own
                if place is None:
                    raise
                raise ConfigError(f"{_placed(exc, place)}{origin_of(settings)}") from None
            found = existing[key] = Deployment(name, backend, getattr(backend, "health", None), key=key)
        return found

    if not settings.models:
        single = deployment(_single_name(settings), settings)
        return [
            Route(model.name, [Member(single, model.name)], RetryBudget(settings.retry_budget))
            for model in single.backend.models()
        ]
    specs = deployment_specs(settings)
    # A deployment shared by routes serves every model they send it (see deployments.py).
    served: dict[str, Settings] = {}
    for spec in specs:
        own = served.get(spec.name)
        served[spec.name] = spec.settings if own is None else _serving_too(own, spec.settings)
    routes: dict[str, Route] = {}
    for spec in specs:
        route = routes.setdefault(spec.route, Route(spec.route, [], RetryBudget(settings.retry_budget)))
        model = _model_of(spec.settings)
        member = Member(
            deployment(spec.name, served[spec.name], spec.place), model, spec.priority, spec.weight
        )
        route.members.append(member)
    return list(routes.values())


def check_local_sources(settings: Settings) -> None:
    """Every local model's files are found (a directory, the local hub cache, the bundled
    model), none is loaded: `check-config` fails on a source that `serve` would fail on."""
    from rerank_service.backends.local.model_files import ModelLoadError, resolve_source  # no torch

    for place, source, origin in _local_sources(settings):
        try:
            resolve_source(source)
        except ModelLoadError as exc:
            raise ConfigError(f"{place}: {exc}{origin}") from None


def _local_sources(settings: Settings) -> list[tuple[str, str, str]]:
    """(place, source, ` (from ...)`) of each local model the settings would load."""
    if settings.models:
        return [
            (f"models[{r}].deployments[{d}].source", deployment.source, origin_of(settings))
            for r, route in enumerate(settings.models)
            for d, deployment in enumerate(route.deployments)
            if deployment.format == "local" and deployment.source is not None
        ]
    if settings.backend != "local":
        return []
    origin = settings.sources.get("local_models")
    return [
        (f"local-models.{name}", source, f" (from {origin})" if origin else "")
        for name, source in settings.local_models
    ]


# What a backend is built from: the only settings backends read (tests/unit/
# test_backend_settings.py checks this list against their code). A deployment is kept on
# a reload unless one of these changed for it, so a change to a front-door key (listening,
# callers, limits, logging, HTTP) touches no deployment.
BACKEND_SETTINGS = (
    "backend", "pass_through", "max_documents", "max_query_tokens",
    "device", "dtype", "local_engine", "local_models", "local_onnx_cache", "local_quantize",
    "local_threads", "batch_wait_ms", "max_batch_size", "max_batch_tokens", "micro_batching",
    "upstream_api_key", "upstream_url", "upstream_models", "upstream_dialect", "upstream_path",
    "upstream_prompt_template", "upstream_score_transform", "upstream_documents_per_call",
    "upstream_tokens_per_call", "upstream_timeout", "upstream_max_attempts", "upstream_max_connections",
    "upstream_retry_backoff", "upstream_retry_max_backoff", "upstream_breaker_cooldown",
    "upstream_breaker_failures", "upstream_breaker_window", "upstream_breaker_probe_timeout",
    "upstream_ca_file", "upstream_proxy",
)  # fmt: skip


def _backend_view(settings: Settings) -> tuple[object, ...]:
    """What a backend is built from, as a value a reload compares."""
    return tuple(getattr(settings, name) for name in BACKEND_SETTINGS)


def _placed(error: ConfigError, place: str) -> str:
    """`error` of the deployment at `place`: a setting named as the deployment's key
    (`models[0].deployments[1].ca_file X: ...`), anything else (the environment's proxy or
    CA bundle) after the place."""
    if isinstance(error, SettingError):
        return error.at(place)
    return f"{place}: {error}"


def _model_of(own: Settings) -> str:
    return own.local_models[0][0] if own.backend == "local" else own.upstream_models[0]


def _serving_too(own: Settings, other: Settings) -> Settings:
    """`own`, serving `other`'s model as well."""
    if own.backend == "local":
        return dataclasses.replace(
            own, local_models=tuple(dict.fromkeys(own.local_models + other.local_models))
        )
    return dataclasses.replace(
        own, upstream_models=tuple(dict.fromkeys(own.upstream_models + other.upstream_models))
    )


def _backend(settings: Settings) -> Backend:
    if settings.backend == "local":
        from rerank_service.backends.local import LocalBackend  # torch: only when a model is local

        return LocalBackend.from_settings(settings)
    from rerank_service.backends.upstream import UpstreamBackend

    return UpstreamBackend.from_settings(settings)


def _single_name(settings: Settings) -> str:
    if settings.backend == "local":
        return "local"
    from rerank_service.backends.upstream.backend import without_credentials

    return without_credentials(settings.upstream_url).split("://", 1)[-1]


def build_router(settings: Settings) -> Router:
    return Router(build_routes(settings))
