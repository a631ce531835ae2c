"""The `models:` section of the configuration file: routes of deployments.

A route is the model name callers send; its deployments are where it is served. Every
per-upstream setting may be set per deployment under its name without the `upstream_`
prefix (`timeout` for `upstream_timeout`); what a deployment leaves out comes from the
global setting. Keys are never written inline: `api_key_env` names a variable,
`api_key_file` a file, and both are read when the file is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rerank_service.config.secret import (
    Secret,
    UnreadableKeyFile,
    file_named,
    key_fault,
    read_key_file,
    variable_named,
)
from rerank_service.config.switches import NOT_A_SWITCH

# The formats of backends/upstream, and the in-process model.
Format = Annotated[
    Literal["dashscope", "compatible", "cohere", "tei", "voyage", "local"],
    BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value),
]
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s,]+$")]
# A deployment's name is sent in x-deployment (gRPC metadata, an HTTP header: a list joined
# by commas), where grpc refuses any byte but printable ASCII, as INTERNAL "Invalid
# metadata" once the call has been answered.
_HEADER_SAFE = frozenset(map(chr, range(0x21, 0x7F))) - {","}


def _deployment_name(value: str) -> str:
    if not set(value) <= _HEADER_SAFE:
        raise ValueError(
            "must be printable ASCII without spaces or commas: it is sent in the x-deployment header"
        )
    return value


def header_safe(text: str) -> str:
    """`text` with each character x-deployment cannot carry percent-encoded (UTF-8)."""
    return "".join(char if char in _HEADER_SAFE else quote(char, safe="") for char in text)


DeploymentName = Annotated[Name, AfterValidator(_deployment_name)]

# ListModels sends a deployment's priority and weight as the contract's int32: past it
# protobuf refuses the answer (INTERNAL "Value out of range").
INT32_MAX = 2**31 - 1


def _blank_is_none(value: object) -> object:
    """A blank path is unset, as a blank upstream_ca_file is (Path("") would be the directory ".")."""
    return None if isinstance(value, str) and not value.strip() else value


def _not_blank(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be blank: leave the key out instead")
    return value


def _source(value: str) -> str:
    """A local model's source, trimmed as --local-models trims it."""
    if not value.strip():
        raise ValueError("must name the model: a directory, a hub id or 'bundled'")
    return value.strip()


# The fewest tokens a document's window may have to be chunked (core/long_documents.py):
# fewer leave no room for a useful chunk. A route that chunks by default must leave them.
MIN_CHUNK_TOKENS = 8


def _on_off(value: object) -> object:
    """`on`/`off` as well as YAML's booleans."""
    if isinstance(value, str) and value.strip().lower() in ("on", "off"):
        return value.strip().lower() == "on"
    return value


# Per-deployment overrides: the global setting is `upstream_<key>` (the types are checked
# when the deployment's settings are made from the global ones: settings.Settings).
OVERRIDES = (
    "path",
    "timeout",
    "connect_timeout",
    "max_connections",
    "max_attempts",
    "retry_backoff",
    "retry_max_backoff",
    "breaker_failures",
    "breaker_cooldown",
    "breaker_window",
    "breaker_probe_timeout",
    "score_transform",
    "prompt_template",
    "documents_per_call",
    "tokens_per_call",
    "proxy",
    "ca_file",
    "tokenizer",
)


class DeploymentEntry(BaseModel):
    """One place a route is served: an upstream HTTP API or a model run in-process."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    format: Format
    url: str | None = None  # an upstream's base URL; required unless format is local
    # format local: a model directory, a cached hub id or 'bundled'
    source: Annotated[str, AfterValidator(_source)] | None = None
    engine: Literal["torch", "onnx"] | None = None  # format local: --local-engine for this model
    quantize: Literal["none", "int8"] | None = None  # format local: --local-quantize for this model
    name: DeploymentName | None = None  # in x-deployment, logs and metrics (default: the URL's host)
    model: Name | None = None  # the name sent upstream (default: the route's name)
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    # Blank is refused, not unset: a key file named by a template left empty must not leave
    # the deployment without its key (callers' tokens would go upstream).
    api_key_file: Annotated[Path | None, BeforeValidator(_not_blank)] = None
    # Lowest first; higher numbers are fallbacks.
    priority: Annotated[int, Field(ge=0, le=INT32_MAX), NOT_A_SWITCH] = 0
    # Share among deployments of the same priority.
    weight: Annotated[int, Field(ge=1, le=INT32_MAX), NOT_A_SWITCH] = 1
    path: str | None = None
    timeout: Annotated[float | None, NOT_A_SWITCH] = None
    connect_timeout: Annotated[float | None, NOT_A_SWITCH] = None
    max_connections: Annotated[int | None, NOT_A_SWITCH] = None
    max_attempts: Annotated[int | None, NOT_A_SWITCH] = None
    retry_backoff: Annotated[float | None, NOT_A_SWITCH] = None
    retry_max_backoff: Annotated[float | None, NOT_A_SWITCH] = None
    breaker_failures: Annotated[int | None, NOT_A_SWITCH] = None
    breaker_cooldown: Annotated[float | None, NOT_A_SWITCH] = None
    breaker_window: Annotated[float | None, NOT_A_SWITCH] = None
    breaker_probe_timeout: Annotated[float | None, NOT_A_SWITCH] = None
    score_transform: str | None = None
    prompt_template: str | None = None
    documents_per_call: Annotated[int | None, NOT_A_SWITCH] = None
    tokens_per_call: Annotated[int | None, NOT_A_SWITCH] = None
    proxy: str | None = None
    ca_file: Annotated[Path | None, BeforeValidator(_blank_is_none)] = None
    tokenizer: str | None = None
    # Not from the file: the key read from api_key_env or api_key_file by `with_keys`.
    api_key: InstanceOf[Secret] | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "api_key" in data and not isinstance(data["api_key"], Secret):
            raise ValueError("a key is never written in the file: name it with api_key_env or api_key_file")
        return data

    @model_validator(mode="after")
    def _fits_its_format(self) -> DeploymentEntry:
        if self.format == "local":
            if self.source is None:
                raise ValueError("format local needs source (a model directory, a hub id or 'bundled')")
            # Set at all, not truthy: `breaker_failures: 0` or `path: ""` would be dropped unseen.
            upstream_only = [
                key
                for key in ("url", "api_key_env", "api_key_file", *OVERRIDES)
                if getattr(self, key) is not None
            ]
            if upstream_only:
                raise ValueError(f"format local takes no {', '.join(upstream_only)}")
        else:
            if self.url is None:
                raise ValueError(f"format {self.format} needs url")
            local_only = [key for key in ("source", "engine", "quantize") if getattr(self, key) is not None]
            if local_only:
                verb = "is" if len(local_only) == 1 else "are"
                raise ValueError(f"{' and '.join(local_only)} {verb} for format local only")
        if self.api_key_env and self.api_key_file:
            raise ValueError("api_key_env and api_key_file are exclusive: name one")
        return self

    def label(self) -> str:
        """The deployment's name, or one made from where it is."""
        if self.name:
            return self.name
        if self.format == "local":
            return header_safe(f"local:{Path(str(self.source)).name or self.source}")
        parts = urlsplit(str(self.url))
        return header_safe(parts.netloc.rpartition("@")[2] + parts.path.rstrip("/"))

    def overrides(self) -> dict[str, Any]:
        """The global settings this deployment replaces, by their global names."""
        return {f"upstream_{key}": getattr(self, key) for key in OVERRIDES if getattr(self, key) is not None}


class RouteEntry(BaseModel):
    """A model name callers send, and the deployments that serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: Name
    deployments: tuple[DeploymentEntry, ...]
    # off: the route's scores are never cached (an upstream whose scores vary from call to call).
    cache: Annotated[bool, BeforeValidator(_on_off)] = True
    # What a call that says nothing does with a document longer than the window
    # (docs/LONG_DOCUMENTS.md), and the window it cuts or chunks to (unset: the deployment's).
    long_documents: Annotated[
        Literal["truncate", "chunk", "reject"],
        BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value),
    ] = "truncate"
    max_tokens_per_doc: Annotated[Annotated[int, Field(ge=1, le=INT32_MAX)] | None, NOT_A_SWITCH] = None

    @field_validator("max_tokens_per_doc")
    @classmethod
    def _room_to_chunk(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Refused here, not on every call with a long document (declared after long_documents:
        # its value is known, unless it was refused itself).
        if value is not None and value < MIN_CHUNK_TOKENS and info.data.get("long_documents") == "chunk":
            raise ValueError(
                f"must be at least {MIN_CHUNK_TOKENS} with long_documents chunk (the fewest tokens "
                f"a chunk may have), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _distinct_deployment_names(self) -> RouteEntry:
        if not self.deployments:
            raise ValueError("has no deployments: a route needs at least one")
        labels = [deployment.label() for deployment in self.deployments]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"two deployments are named {label!r}: give each its own name")
        return self


def distinct_routes(routes: tuple[RouteEntry, ...]) -> tuple[RouteEntry, ...]:
    """Route names are unique: the model a caller names must mean one route."""
    names = [route.name for route in routes]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ValueError(f"names two routes {name!r} (models[{names.index(name)}] and models[{index}])")
    return routes


class KeySourceError(ValueError):
    """A deployment's key source is unusable; `place` says where in the file."""

    def __init__(self, place: str, problem: str) -> None:
        super().__init__(f"{place} {problem}")


def with_keys(routes: tuple[RouteEntry, ...], env: Mapping[str, str] | None = None) -> tuple[RouteEntry, ...]:
    """The routes with each deployment's key read from its variable or file."""
    env = os.environ if env is None else env
    resolved = []
    for r, route in enumerate(routes):
        deployments = []
        for d, deployment in enumerate(route.deployments):
            key = _read_key(deployment, env, f"models[{r}].deployments[{d}]")
            deployments.append(deployment.model_copy(update={"api_key": key}) if key else deployment)
        resolved.append(route.model_copy(update={"deployments": tuple(deployments)}))
    return tuple(resolved)


def _read_key(deployment: DeploymentEntry, env: Mapping[str, str], place: str) -> Secret | None:
    if deployment.api_key_env:
        value = env.get(deployment.api_key_env, "").strip()
        if not value:
            name = variable_named(deployment.api_key_env)
            raise KeySourceError(f"{place}.api_key_env", f"names {name}, which is not set")
        fault = key_fault(value)
        if fault:
            name = variable_named(deployment.api_key_env)
            raise KeySourceError(f"{place}.api_key_env", f"names {name}, whose key {fault}")
        return Secret(value)
    if deployment.api_key_file:
        try:
            value = read_key_file(deployment.api_key_file).strip()
        except UnreadableKeyFile as exc:
            raise KeySourceError(f"{place}.api_key_file", str(exc)) from None
        if not value:
            named = file_named(deployment.api_key_file)
            raise KeySourceError(f"{place}.api_key_file", f"{named} holds no key")
        fault = key_fault(value)
        if fault:
            named = file_named(deployment.api_key_file)
            raise KeySourceError(f"{place}.api_key_file", f"{named}: the key {fault}")
        return Secret(value)
    return None


@dataclasses.dataclass(frozen=True)
class FileOnly:
    """Marks a setting read only from the configuration file (a nested section)."""
