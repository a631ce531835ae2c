"""Each deployment's configuration: an upstream or a local one, with only its own fields.

A deployment of the `models:` section is the global settings with its format, URL, model,
key and overrides put in, checked by the one declaration of each setting in settings.py
(so an error names its place in the file), then read into its typed configuration
(config/upstream.py, config/local.py). Without a `models:` section the flags describe one
deployment, read into the same types.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from pydantic import ValidationError

from rerank_service.config.local import LocalDeploymentConfig
from rerank_service.config.problems import describe
from rerank_service.config.routes import DeploymentEntry, RouteEntry, header_safe
from rerank_service.config.settings import ConfigError, Settings, check_consistency, check_local_engine
from rerank_service.config.upstream import UpstreamDeploymentConfig

# What a backend is built from: a reload keeps a deployment whose config is equal.
DeploymentConfig = UpstreamDeploymentConfig | LocalDeploymentConfig


class DeploymentSpec(NamedTuple):
    route: str
    name: str
    priority: int
    weight: int
    config: DeploymentConfig  # what its backend is built from
    place: str  # where it is in the file: models[0].deployments[1]


def deployment_config(settings: Settings) -> DeploymentConfig:
    """The one deployment the flags describe (no `models:` section), or a deployment's
    own settings (`deployment_settings`) read into its type."""
    if settings.backend == "local":
        return LocalDeploymentConfig.from_settings(settings)
    return UpstreamDeploymentConfig.from_settings(settings)


def deployment_settings(settings: Settings, route: RouteEntry, deployment: DeploymentEntry) -> Settings:
    """The settings of `deployment` of `route`; raises pydantic's ValidationError."""
    model = deployment.model or route.name
    if deployment.format == "local":
        assert deployment.source is not None  # DeploymentEntry checks it
        return dataclasses.replace(
            settings,
            backend="local",
            local_models=((model, deployment.source),),
            local_engine=deployment.engine or settings.local_engine,
            local_quantize=deployment.quantize or settings.local_quantize,
            models=(),
        )
    assert deployment.url is not None  # DeploymentEntry checks it
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
    """Every deployment of every route, checked, and named (see `_named`); a bad override
    is a ConfigError naming its place."""
    fields = Settings.__pydantic_fields__  # type: ignore[attr-defined]
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
            if deployment.format == "local":
                try:
                    check_local_engine(own, place=f"{place}: ")
                except ConfigError as exc:
                    raise ConfigError(f"{exc}{origin_of(settings)}") from None
            specs.append(
                DeploymentSpec(
                    route.name,
                    deployment.label(),
                    deployment.priority,
                    deployment.weight,
                    deployment_config(own),
                    place,
                )
            )
    return _named(settings, specs)


def shape(config: DeploymentConfig) -> DeploymentConfig:
    """A deployment's config but for the models it serves: two routes' entries of one
    shape are one deployment (one connection pool, one health) serving both models."""
    if isinstance(config, LocalDeploymentConfig):
        return config.serving(tuple(("-", source) for _, source in config.models))  # a model is its source
    return config.serving(("-",))


def serving_too(config: DeploymentConfig, other: DeploymentConfig) -> DeploymentConfig:
    """`config`, serving `other`'s models as well (a deployment shared by routes)."""
    if isinstance(config, LocalDeploymentConfig):
        assert isinstance(other, LocalDeploymentConfig)  # one shape: `_named`
        return config.serving(tuple(dict.fromkeys(config.models + other.models)))
    assert isinstance(other, UpstreamDeploymentConfig)
    return config.serving(tuple(dict.fromkeys(config.models + other.models)))


def model_of(config: DeploymentConfig) -> str:
    """The one model a deployment entry of a route serves (the name sent to it)."""
    if isinstance(config, LocalDeploymentConfig):
        return config.models[0][0]
    return config.models[0]


def _named(settings: Settings, specs: list[DeploymentSpec]) -> list[DeploymentSpec]:
    """Names unique to what they name, so metrics and logs never mix two deployments.

    Entries of several routes with one name (given, or made from the URL) and one shape
    are one deployment shared by those routes. Where entries with a name made from the URL
    differ, those of the first shape in the file keep it (still shared: an entry that
    differs renames no other), and each other one becomes `ROUTE/NAME`; a given name on
    entries that differ is an error, and so is a name that ends up naming two shapes.
    """
    shapes: dict[str, list[DeploymentConfig]] = {}
    for spec in specs:
        kinds = shapes.setdefault(spec.name, [])
        if shape(spec.config) not in kinds:
            kinds.append(shape(spec.config))
    named = []
    for (r, route), (d, deployment) in _entries(settings):
        spec = next(spec for spec in specs if spec.place == f"models[{r}].deployments[{d}]")
        kinds = shapes[spec.name]
        if len(kinds) > 1:
            if deployment.name:
                raise ConfigError(
                    f"{spec.place}.name {spec.name!r} names deployments of different settings: give "
                    f"each its own name (one name is one deployment, shared by routes){origin_of(settings)}"
                )
            if shape(spec.config) != kinds[0]:
                spec = spec._replace(name=header_safe(f"{route.name}/{spec.name}"))
        named.append(spec)
    _one_shape_a_name(settings, named)
    return named


def _one_shape_a_name(settings: Settings, specs: list[DeploymentSpec]) -> None:
    """A ConfigError where a name made `ROUTE/NAME` is also another entry's name (given, or
    made from its URL) of other settings: the routes would share one deployment, built for
    one of them (its URL, its key)."""
    given = {
        f"models[{r}].deployments[{d}]" for (r, _), (d, deployment) in _entries(settings) if deployment.name
    }
    first: dict[str, DeploymentSpec] = {}
    for spec in specs:
        earlier = first.setdefault(spec.name, spec)
        if shape(earlier.config) == shape(spec.config):
            continue
        # The entry whose name the file gives is the one to rename.
        blamed, other = (earlier, spec) if earlier.place in given else (spec, earlier)
        if blamed.place in given:
            problem = f"{blamed.place}.name {blamed.name!r} is also the name of {other.place}"
        else:
            problem = f"{blamed.place} is named {blamed.name!r}, as is {other.place}"
        raise ConfigError(
            f"{problem}, of different settings: give one of them another name (one name is one "
            f"deployment, shared by routes){origin_of(settings)}"
        )


def _entries(settings: Settings) -> list[tuple[tuple[int, RouteEntry], tuple[int, DeploymentEntry]]]:
    return [
        ((r, route), (d, deployment))
        for r, route in enumerate(settings.models)
        for d, deployment in enumerate(route.deployments)
    ]


def origin_of(settings: Settings) -> str:
    """` (from models in FILE)`, for errors about the models section."""
    origin = settings.sources.get("models")
    return f" (from {origin})" if origin else ""


def backend_kinds(settings: Settings) -> frozenset[str]:
    """The kinds of backend that serve: `upstream`, `local`, or both."""
    if not settings.models:
        return frozenset({settings.backend})
    return frozenset(
        "local" if deployment.format == "local" else "upstream"
        for route in settings.models
        for deployment in route.deployments
    )


def as_reloaded(loaded: Settings, served: Settings) -> Settings:
    """`loaded`, a reloaded file's settings, as a reload from `served` takes them: with the
    caller keys as started (`served`'s: a reload never changes them), checked with those
    keys (a deployment with no key while they are on would send none upstream, and fail
    every call: refused, as at start), and with `reload_refusal`. A ConfigError says why not.
    Both a server's reload and `--workers`' supervisor (the copy its workers start from)
    take a file this way."""
    settings = dataclasses.replace(loaded, api_keys=served.api_keys)
    try:
        check_consistency(settings)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; the caller keys stay as started on a reload") from None
    refusal = reload_refusal(served, settings)
    if refusal is not None:
        raise ConfigError(refusal)
    return settings


def reload_refusal(old: Settings, new: Settings) -> str | None:
    """Why a reload from `old` to `new` must not happen, or None.

    Never one that switches callers' authentication on or off (a callers section added
    to or emptied of a service without --api-keys, which stay as started): deployments
    pass callers' tokens upstream without it, so that takes a restart. Nor one that
    switches pass-through on or off (every upstream deployment given a key of its own, or
    one left without) but by a change of backend kinds: a pass-through service requires
    each caller's bearer token (the upstream checks it), an open one none; a `--workers`
    worker restarted after such a reload would serve the other mode beside its siblings.

    A file truncated or caught mid-write can still be valid YAML: without its `models:`
    section it would put the flags' one deployment (the local demo model, by default) in
    place of every route. Such a change is taken only when the new file says so with
    `allow_backend_change: true`.
    """
    if bool(old.api_keys or new.callers) != bool(old.api_keys or old.callers):
        return (
            "a reload cannot switch callers' authentication on or off (a callers section "
            "added to or emptied of a service without --api-keys): restart the service for that"
        )
    dropped = bool(old.models) and not new.models
    kinds_before, kinds_after = backend_kinds(old), backend_kinds(new)
    kinds_change = dropped or kinds_before != kinds_after
    # A change of backend kinds (to local models: open) may switch it as a consequence; that
    # change is refused below unless the file allows it.
    if old.pass_through != new.pass_through and not kinds_change:
        now = "on" if new.pass_through else "off"
        return (
            f"a reload cannot switch pass-through of callers' bearer tokens {now} (with no caller "
            "keys, an upstream deployment without a key of its own takes each caller's token; "
            "with every deployment keyed, calls need none): restart the service for that"
        )
    if new.allow_backend_change:
        return None
    if dropped:
        names = ", ".join(_flag_models(new))
        problem = (
            f"has no models: section any more: its routes would give way to the {new.backend} "
            f"backend's {names}"
        )
    elif kinds_before != kinds_after:
        problem = f"would change the backends that serve from {_kinds(kinds_before)} to {_kinds(kinds_after)}"
    else:
        return None
    return (
        f"the configuration {problem}; set allow_backend_change: true in {_config_file(new)} if that is meant"
    )


def _flag_models(settings: Settings) -> tuple[str, ...]:
    if settings.backend == "local":
        return tuple(name for name, _ in settings.local_models)
    return settings.upstream_models


def _kinds(kinds: frozenset[str]) -> str:
    return " and ".join(sorted(kinds, key=("upstream", "local").index))


def _config_file(settings: Settings) -> str:
    """The file the settings were read from, as their origins name it (`KEY in FILE`)."""
    for origin in settings.sources.values():
        key, found, path = origin.partition(" in ")
        if found and key.isidentifier():
            return path
    return "the configuration file"
