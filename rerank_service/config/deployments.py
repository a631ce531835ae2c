"""Each deployment's own settings: the global ones with the deployment's overrides.

A backend is built from a `Settings`; a deployment's is the global `Settings` with its
format, URL, model, key and overrides put in, so every per-upstream setting is checked
by the one declaration in settings.py, and an error names its place in the file.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from pydantic import ValidationError

from rerank_service.config.routes import DeploymentConfig, RouteConfig
from rerank_service.config.settings import ConfigError, Settings


class DeploymentSpec(NamedTuple):
    route: str
    name: str
    priority: int
    weight: int
    settings: Settings  # what its backend is built from
    place: str  # where it is in the file: models[0].deployments[1]


def deployment_settings(settings: Settings, route: RouteConfig, deployment: DeploymentConfig) -> Settings:
    """The settings of `deployment` of `route`; raises pydantic's ValidationError."""
    model = deployment.model or route.name
    if deployment.format == "local":
        assert deployment.source is not None  # DeploymentConfig checks it
        return dataclasses.replace(
            settings, backend="local", local_models=((model, deployment.source),), models=()
        )
    assert deployment.url is not None  # DeploymentConfig checks it
    return dataclasses.replace(
        settings,
        backend="upstream",
        upstream_url=deployment.url,
        upstream_dialect=deployment.format,
        upstream_models=(model,),
        upstream_api_key=deployment.api_key or settings.upstream_api_key,
        models=(),
        **deployment.overrides(),
    )


def deployment_specs(settings: Settings) -> list[DeploymentSpec]:
    """Every deployment of every route, checked; a bad override is a ConfigError naming its place."""
    from rerank_service.config.sources import describe  # sources imports this module lazily

    fields = Settings.__pydantic_fields__  # type: ignore[attr-defined]
    names = _unique_names(settings)
    specs = []
    for r, route in enumerate(settings.models):
        for d, deployment in enumerate(route.deployments):
            place = f"models[{r}].deployments[{d}]"
            try:
                own = deployment_settings(settings, route, deployment)
            except ValidationError as exc:
                error = exc.errors()[0]
                # "upstream-timeout must be ..., got ...": the setting's own words, at its place.
                problem = describe(error, fields, {}).split(" ", 1)[1]
                key = str(error["loc"][0]).removeprefix("upstream_") if error["loc"] else "settings"
                raise ConfigError(f"{place}.{key} {problem}{origin_of(settings)}") from None
            specs.append(
                DeploymentSpec(route.name, names[r, d], deployment.priority, deployment.weight, own, place)
            )
    return specs


def _unique_names(settings: Settings) -> dict[tuple[int, int], str]:
    """Each deployment's name, unique across routes (metrics and logs tell them apart by it).

    A name made from the URL that two routes share becomes `ROUTE/HOST`; a name given
    twice is an error.
    """
    labels = {
        (r, d): deployment.label()
        for r, route in enumerate(settings.models)
        for d, deployment in enumerate(route.deployments)
    }
    routes_of: dict[str, set[int]] = {}
    for (r, _), label in labels.items():
        routes_of.setdefault(label, set()).add(r)
    names = {}
    for (r, d), label in labels.items():
        first = min(routes_of[label])
        if len(routes_of[label]) == 1 or (r == first and settings.models[r].deployments[d].name):
            names[r, d] = label
        elif settings.models[r].deployments[d].name:
            raise ConfigError(
                f"models[{r}].deployments[{d}].name {label!r} is also a deployment of models[{first}]: "
                f"deployment names are unique across routes{origin_of(settings)}"
            )
        else:
            names[r, d] = f"{settings.models[r].name}/{label}"
    return names


def origin_of(settings: Settings) -> str:
    """` (from models in FILE)`, for errors about the models section."""
    origin = settings.sources.get("models")
    return f" (from {origin})" if origin else ""
