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
    specs = []
    for r, route in enumerate(settings.models):
        for d, deployment in enumerate(route.deployments):
            try:
                own = deployment_settings(settings, route, deployment)
            except ValidationError as exc:
                error = exc.errors()[0]
                key = str(error["loc"][0]).removeprefix("upstream_") if error["loc"] else "settings"
                problem = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
                raise ConfigError(
                    f"models[{r}].deployments[{d}].{key} {problem}{_origin(settings)}"
                ) from None
            specs.append(
                DeploymentSpec(route.name, deployment.label(), deployment.priority, deployment.weight, own)
            )
    return specs


def _origin(settings: Settings) -> str:
    origin = settings.sources.get("models")
    return f" (from {origin})" if origin else ""
