"""Routes and deployments from the settings: the `models:` section, or the flags alone."""

from __future__ import annotations

from collections.abc import Iterable

from rerank_service.config import Settings
from rerank_service.config.deployments import deployment_specs
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

    def deployment(name: str, own: Settings) -> Deployment:
        key = (name, own)
        found = existing.get(key)
        if found is None:
            backend = _backend(own)
            found = existing[key] = Deployment(name, backend, getattr(backend, "health", None), key=key)
        return found

    if not settings.models:
        single = deployment(_single_name(settings), settings)
        return [
            Route(model.name, [Member(single, model.name)], RetryBudget(settings.retry_budget))
            for model in single.backend.models()
        ]
    routes: dict[str, Route] = {}
    for spec in deployment_specs(settings):
        route = routes.setdefault(spec.route, Route(spec.route, [], RetryBudget(settings.retry_budget)))
        model = (
            spec.settings.local_models[0][0]
            if spec.settings.backend == "local"
            else spec.settings.upstream_models[0]
        )
        route.members.append(Member(deployment(spec.name, spec.settings), model, spec.priority, spec.weight))
    return list(routes.values())


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
