"""Routes and deployments from the settings: the `models:` section, or the flags alone."""

from __future__ import annotations

from collections.abc import Iterable

from rerank_service.cache import ScoreCache
from rerank_service.config import ConfigError, SettingError, Settings
from rerank_service.config.deployments import (
    DeploymentConfig,
    deployment_config,
    deployment_specs,
    model_of,
    origin_of,
    serving_too,
)
from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.config.routes import header_safe
from rerank_service.config.upstream import UpstreamDeploymentConfig
from rerank_service.core.backend import Backend
from rerank_service.core.domain import LongDocuments
from rerank_service.core.retry_budget import RetryBudget
from rerank_service.observability.metrics import Metrics
from rerank_service.routing.cached_scores import CachedScores, score_identity
from rerank_service.routing.deployment import Deployment
from rerank_service.routing.route import Member, Route
from rerank_service.routing.router import Router


def build_routes(
    settings: Settings,
    reuse: Iterable[Deployment] = (),
    metrics: Metrics | None = None,
    cache: ScoreCache | None = None,
) -> list[Route]:
    """Every route the settings describe.

    Without a `models:` section, one deployment (the upstream, or the local models)
    serves every configured model name, each its own route, exactly as the flags say.
    A deployment of `reuse` with the same name and an equal config is kept as it is (a
    reload keeps its connections, its health and its loaded model). New deployments
    record into `metrics` (None: a Metrics of their own, served nowhere: check-config),
    and answer the pairs `cache` knows from it (None: no score cache).
    """
    existing = {deployment.key: deployment for deployment in reuse}
    recorded = metrics if metrics is not None else Metrics()

    def deployment(name: str, config: DeploymentConfig, place: str | None = None) -> Deployment:
        key = (name, config)
        found = existing.get(key)
        if found is None:
            try:
                backend = _backend(config, recorded)
            except ConfigError as exc:  # a CA file or proxy of the deployment's own
                if place is None:
                    raise
                raise ConfigError(f"{_placed(exc, place)}{origin_of(settings)}") from None
            scores = (
                None
                if cache is None or _passes_tokens_through(config)
                else CachedScores(
                    cache,
                    score_identity(config, _revision, _precision, _runs_on_torch),
                    recorded.cache,
                    backend.readiness,
                )
            )
            found = existing[key] = Deployment(
                name, backend, getattr(backend, "health", None), key=key, metrics=recorded, scores=scores
            )
        return found

    if not settings.models:
        single = deployment(_single_name(settings), deployment_config(settings))
        return [
            Route(model.name, [Member(single, model.name)], RetryBudget(settings.retry_budget))
            for model in single.backend.models()
        ]
    specs = deployment_specs(settings)
    # A deployment shared by routes serves every model they send it (see deployments.py).
    served: dict[str, DeploymentConfig] = {}
    for spec in specs:
        own = served.get(spec.name)
        served[spec.name] = spec.config if own is None else serving_too(own, spec.config)
    cached = {route.name: route.cache for route in settings.models}
    entries = {route.name: route for route in settings.models}
    routes: dict[str, Route] = {}
    for spec in specs:
        route = routes.get(spec.route)
        if route is None:
            route = routes[spec.route] = Route(
                spec.route,
                [],
                RetryBudget(settings.retry_budget),
                cache=cached[spec.route],
                long_documents=LongDocuments(entries[spec.route].long_documents),
                max_tokens_per_doc=entries[spec.route].max_tokens_per_doc,
            )
        member = Member(
            deployment(spec.name, served[spec.name], spec.place),
            model_of(spec.config),
            spec.priority,
            spec.weight,
        )
        route.members.append(member)
    return list(routes.values())


def _passes_tokens_through(config: DeploymentConfig) -> bool:
    """Whether the deployment sends each caller's own token upstream (no key of its own).
    Its scores are never cached: only the upstream can tell a good token from a bad one, so
    a cached answer would reach a caller with no token, or a revoked one."""
    return isinstance(config, UpstreamDeploymentConfig) and config.pass_through


def checked_routes(settings: Settings) -> list[Route]:
    """Every route the settings describe, built and not started, and every local model's
    files found: what `check-config` checks, and a reload under --workers before its file
    reaches the workers (server.check_reload). A ConfigError says what fails."""
    routes = build_routes(settings)
    check_local_sources(settings)
    return routes


def check_local_sources(settings: Settings) -> None:
    """Every local model's files are found (a directory, the local hub cache, the bundled
    model) and hold a config.json and weights, none is loaded: `check-config` fails on a
    source that `serve` would fail on, and a --workers reload on one its workers would."""
    from rerank_service.backends.local.model_files import ModelLoadError, model_directory  # no torch

    for place, source, origin in _local_sources(settings):
        try:
            model_directory(source)
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


def _placed(error: ConfigError, place: str) -> str:
    """`error` of the deployment at `place`: a setting named as the deployment's key
    (`models[0].deployments[1].ca_file X: ...`), anything else (the environment's proxy or
    CA bundle) after the place."""
    if isinstance(error, SettingError):
        return error.at(place)
    return f"{place}: {error}"


def _backend(config: DeploymentConfig, metrics: Metrics) -> Backend:
    if isinstance(config, LocalDeploymentConfig):
        from rerank_service.backends.local import LocalBackend  # torch: only when a model is local

        return LocalBackend.from_config(config, metrics)
    from rerank_service.backends.upstream import UpstreamBackend

    return UpstreamBackend.from_config(config, metrics)


def _single_name(settings: Settings) -> str:
    if settings.backend == "local":
        return "local"
    from rerank_service.backends.upstream.backend import without_credentials

    return header_safe(without_credentials(settings.upstream_url).split("://", 1)[-1])


def build_router(
    settings: Settings, metrics: Metrics | None = None, cache: ScoreCache | None = None
) -> Router:
    """The router of the settings' routes, recording into `metrics` (None: a Metrics of its own),
    with `cache` in front of every deployment (None: no score cache)."""
    recorded = metrics if metrics is not None else Metrics()
    return Router(build_routes(settings, metrics=recorded, cache=cache), recorded)


def _precision(device: str, dtype: str) -> tuple[str, str]:
    """The device type and dtype a local model runs in on this machine, for the score cache."""
    # Asked on a local deployment's first call once its backend is ready (CachedScores): its
    # loader has imported torch by then.
    from rerank_service.backends.local.common import ModelLoadError
    from rerank_service.backends.local.models import select_device, select_dtype

    try:
        target = select_device(device)
        chosen = select_dtype(dtype, target)
    except ModelLoadError:  # settings the model could not load with: it answers nothing
        return device, dtype
    return target.type, str(chosen).removeprefix("torch.")


def _runs_on_torch(source: str) -> bool:
    """Whether a local model runs on torch whatever --local-engine says (Qwen3-Reranker), for
    the score cache; asked once its backend is ready, as `_precision` is."""
    from rerank_service.backends.local.common import ModelLoadError
    from rerank_service.backends.local.models import runs_on_torch

    try:
        return runs_on_torch(source)
    except ModelLoadError:  # files the model could not load from: it answers nothing
        return False


def _revision(source: str) -> str:
    """A local model's files, named for the score cache (see model_files.model_revision)."""
    from rerank_service.backends.local.model_files import ModelLoadError, model_revision  # no torch

    try:
        return model_revision(source)
    except ModelLoadError:  # not loadable: it serves nothing, so its name is never a key
        return source
