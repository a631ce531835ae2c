"""The `callers:` section of the configuration file: who calls, what each may call, and
how much each may take.

A caller is a tenant: a `name` (in logs, metrics and usage), its credentials (bearer
keys, or the identity of an mTLS client certificate), the `models` it may call and its
`limits`. Keys are never written inline: `key_env` names a variable, `key_file` a file
(one key a line), and `key_sha256` is the hex SHA-256 of a key, so the file can be
committed; `with_caller_keys` reads the first two when the file is loaded.

The entries (`CallerEntry`, as the file writes them) become `CallerConfig` values (what
the pipeline is built from: key digests, identities, models, limits) in `caller_configs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    InstanceOf,
    model_validator,
)

from rerank_service.config.secret import (
    Secret,
    UnreadableKeyFile,
    file_named,
    key_fault,
    read_keys,
    variable_named,
)
from rerank_service.config.switches import NOT_A_SWITCH

# Names of anonymous callers (`--api-keys`, pass-through) and of a call without a key.
ANONYMOUS = "anonymous"
KEY_NAME_PREFIX = "key-"
ALL_MODELS = "*"
# A caller's name is a metric label and a log field: short, no spaces or commas.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}")  # matched whole (fullmatch)
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_bytes(key: str) -> bytes:
    """A key's bytes as sent. An HTTP header of bytes that are not UTF-8 arrives with them as
    surrogates (aiohttp's decoding): their bytes again, so such a token hashes (and matches
    no key) instead of failing the call as a bug."""
    return key.encode("utf-8", "surrogateescape")


def key_digest(key: str) -> bytes:
    """The SHA-256 of a key: how keys are looked up and compared (never the key itself)."""
    return hashlib.sha256(_key_bytes(key)).digest()


def anonymous_name(key: str) -> str:
    """The name of a caller known only by its key: `key-` and 8 hex digits of its SHA-256."""
    return KEY_NAME_PREFIX + hashlib.sha256(_key_bytes(key)).hexdigest()[:8]


def _caller_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            "must be 1 to 64 letters, digits or _ . : @ / - (starting with a letter or digit): it "
            "names the caller in logs and metrics"
        )
    if value == ANONYMOUS or value.startswith(KEY_NAME_PREFIX):
        raise ValueError(f"{value!r} is reserved: callers without a name are called {ANONYMOUS} or key-…")
    return value


def _variable(value: str) -> str:
    if not _VARIABLE.fullmatch(value):  # the message never repeats it: a key may have been pasted here
        raise ValueError("must name an environment variable (letters, digits and _), not hold the key")
    return value


def _sha256(value: str) -> str:
    if not _HEX_SHA256.fullmatch(value):
        raise ValueError("must be the key's SHA-256 as 64 hex digits (sha256sum of the key, no newline)")
    return value.lower()


class CredentialEntry(BaseModel):
    """One way a caller proves who it is: exactly one of the four keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    key_env: Annotated[str, AfterValidator(_variable)] | None = None
    key_file: Path | None = None
    key_sha256: Annotated[str, AfterValidator(_sha256)] | None = None
    # The client certificate's URI SAN (a SPIFFE ID), or its subject CN when it has none.
    tls_identity: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    # Not from the file: the keys read from key_env or key_file by `with_caller_keys`.
    keys: tuple[InstanceOf[Secret], ...] = Field(default=(), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and ("key" in data or "api_key" in data):
            raise ValueError(
                "a key is never written in the file: name it with key_env or key_file, or give its key_sha256"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialEntry:
        given = [
            name for name in ("key_env", "key_file", "key_sha256", "tls_identity") if getattr(self, name)
        ]
        if len(given) != 1:
            raise ValueError(
                "must give exactly one of key_env, key_file, key_sha256 or tls_identity"
                + (f" (got {', '.join(given)}: write each as its own credential)" if given else "")
            )
        return self


# The smallest limit: one in a million minutes (about two years between calls). A smaller
# one refills too slowly for the bucket arithmetic: the wait for a call overflows to
# infinity (1e-310), or the rate underflows to 0 (1e-323), and the call fails instead of
# its refusal.
MIN_PER_MINUTE = 1e-6


def _refillable(value: float) -> float:
    if value < MIN_PER_MINUTE:
        raise ValueError(f"must be at least {MIN_PER_MINUTE:g} (one in a million minutes), got {value:g}")
    return value


PerMinute = Annotated[float, Field(gt=0, allow_inf_nan=False), NOT_A_SWITCH, AfterValidator(_refillable)]
BurstSize = Annotated[float, Field(gt=0, allow_inf_nan=False), NOT_A_SWITCH]


class BurstEntry(BaseModel):
    """How much a bucket holds when full, where one minute's worth is not wanted."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    requests: BurstSize | None = None
    documents: BurstSize | None = None
    tokens: BurstSize | None = None


# A bucket's limit key and its burst key.
BUCKETS = (
    ("requests_per_minute", "requests"),
    ("documents_per_minute", "documents"),
    ("tokens_per_minute", "tokens"),
)


class LimitsEntry(BaseModel):
    """A caller's limits: token buckets refilled every minute, and calls in flight."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    requests_per_minute: PerMinute | None = None
    documents_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    concurrent: Annotated[int, Field(ge=1, le=2**31 - 1), NOT_A_SWITCH] | None = None
    burst: BurstEntry | None = None

    @model_validator(mode="after")
    def _burst_of_a_limit(self) -> LimitsEntry:
        if self.burst is not None:
            for limit, burst in BUCKETS:
                if getattr(self.burst, burst) is not None and getattr(self, limit) is None:
                    raise ValueError(
                        f"burst.{burst} needs {limit}: a burst is the size of that limit's bucket"
                    )
        return self


def _one_name(name: str) -> str:
    if "," in name:
        raise ValueError(f"{name!r} is no model name (no commas): list several as [a, b]")
    return name


def _one_or_more(value: object) -> object:
    """A single model name as a list of one."""
    return (value,) if isinstance(value, str) else value


def _not_empty(models: tuple[str, ...]) -> tuple[str, ...]:
    if not models:
        raise ValueError("is empty: the caller could call no model; name them, or '*' for every model")
    return models


class CallerEntry(BaseModel):
    """One caller, as the file writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: Annotated[str, AfterValidator(_caller_name)]
    credentials: tuple[CredentialEntry, ...] = ()
    # One name (`*` above all, as the docs write it) is a list of one; an empty list, a caller
    # that may call nothing, is refused: a caller is removed, not emptied.
    models: Annotated[
        # A model name (no commas: `a, b` in one string is no list).
        tuple[Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_one_name)], ...],
        BeforeValidator(_one_or_more),
        AfterValidator(_not_empty),
    ] = (ALL_MODELS,)
    limits: LimitsEntry | None = None

    @model_validator(mode="after")
    def _has_a_credential(self) -> CallerEntry:
        if not self.credentials:
            raise ValueError(
                "has no credential: list at least one under credentials (key_env, key_file, key_sha256 "
                "or tls_identity)"
            )
        return self


def distinct_callers(callers: tuple[CallerEntry, ...]) -> tuple[CallerEntry, ...]:
    """Names, key hashes and certificate identities each belong to one caller (the keys read
    from variables and files are compared once read: `check_distinct_keys`). A message reads
    after the section's name: `callers give one key to two callers (...)`."""
    seen: dict[tuple[str, str], str] = {}
    for c, caller in enumerate(callers):
        claims = [("name", caller.name, f"callers[{c}].name")]
        for k, credential in enumerate(caller.credentials):
            place = f"callers[{c}].credentials[{k}]"
            if credential.key_sha256:
                claims.append(("key", credential.key_sha256, f"{place}.key_sha256"))
            if credential.tls_identity:
                claims.append(("tls_identity", credential.tls_identity, f"{place}.tls_identity"))
        for kind, value, place in claims:
            first = seen.setdefault((kind, value), place)
            if first != place:
                what = {"name": "one name", "key": "one key", "tls_identity": "one tls_identity"}[kind]
                raise ValueError(
                    f"give {what} to two callers ({first} and {place}): each belongs to one caller"
                )
    return callers


class CallerKeyError(ValueError):
    """A caller's key source is unusable, or a key is given twice; the message names the place."""


def with_caller_keys(
    callers: tuple[CallerEntry, ...], env: Mapping[str, str] | None = None
) -> tuple[CallerEntry, ...]:
    """The callers with each key_env and key_file credential's keys read."""
    env = os.environ if env is None else env
    resolved = []
    for c, caller in enumerate(callers):
        credentials = []
        for k, credential in enumerate(caller.credentials):
            keys = _read_keys(credential, env, f"callers[{c}].credentials[{k}]")
            credentials.append(credential.model_copy(update={"keys": keys}) if keys else credential)
        resolved.append(caller.model_copy(update={"credentials": tuple(credentials)}))
    return tuple(resolved)


def _read_keys(credential: CredentialEntry, env: Mapping[str, str], place: str) -> tuple[Secret, ...]:
    if credential.key_env:
        value = env.get(credential.key_env, "").strip()
        if not value:
            raise CallerKeyError(
                f"{place}.key_env names {variable_named(credential.key_env)}, which is not set"
            )
        # A comment after the key ("sk-b  # search team") would become part of it, and every
        # call with the real key be refused; the error names the variable, never the key.
        if fault := key_fault(value):
            raise CallerKeyError(f"{place}.key_env: {variable_named(credential.key_env)} {fault}")
        return (Secret(value),)
    if credential.key_file:
        try:
            keys = tuple(map(Secret, read_keys(credential.key_file)))
        except UnreadableKeyFile as exc:
            raise CallerKeyError(f"{place}.key_file {exc}") from None
        if not keys:
            raise CallerKeyError(f"{place}.key_file {file_named(credential.key_file)} holds no key")
        return keys
    return ()


def check_distinct_keys(callers: tuple[CallerEntry, ...], api_keys: Sequence[Secret]) -> None:
    """No key belongs to two callers, nor to a caller and `--api-keys`; CallerKeyError names both."""
    owners: dict[bytes, str] = {key_digest(key.reveal()): "api-keys" for key in api_keys}
    for c, caller in enumerate(callers):
        for k, credential in enumerate(caller.credentials):
            place = f"callers[{c}].credentials[{k}]"
            for digest in _digests(credential):
                first = owners.setdefault(digest, place)
                if first != place:
                    raise CallerKeyError(
                        f"{place} holds the same key as {first}: each key belongs to one caller"
                    )


def _digests(credential: CredentialEntry) -> list[bytes]:
    if credential.key_sha256:
        return [bytes.fromhex(credential.key_sha256)]
    return [key_digest(key.reveal()) for key in credential.keys]


# --- what the pipeline is built from --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class BucketLimit:
    """One token bucket: `per_minute` refilled evenly, holding at most `burst`."""

    name: str  # the limit's key: requests_per_minute, documents_per_minute, tokens_per_minute
    per_minute: float
    burst: float

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class CallerLimits:
    requests: BucketLimit | None = None
    documents: BucketLimit | None = None
    tokens: BucketLimit | None = None
    concurrent: int | None = None

    @property
    def buckets(self) -> tuple[BucketLimit, ...]:
        return tuple(bucket for bucket in (self.requests, self.documents, self.tokens) if bucket is not None)


@dataclasses.dataclass(frozen=True, slots=True)
class CallerConfig:
    """A caller as the pipeline knows it: the SHA-256 of each of its keys, its certificate
    identities, the models it may call (None: all) and its limits (None: none)."""

    name: str
    key_digests: frozenset[bytes]
    tls_identities: frozenset[str]
    models: frozenset[str] | None
    limits: CallerLimits | None


def caller_configs(callers: tuple[CallerEntry, ...]) -> tuple[CallerConfig, ...]:
    """What the pipeline is built from; the keys of key_env and key_file must have been read."""
    configs = []
    for c, caller in enumerate(callers):
        digests: set[bytes] = set()
        identities: set[str] = set()
        for k, credential in enumerate(caller.credentials):
            if (credential.key_env or credential.key_file) and not credential.keys:
                raise CallerKeyError(
                    f"callers[{c}].credentials[{k}]: its key was not read (with_caller_keys)"
                )
            digests.update(_digests(credential))
            if credential.tls_identity:
                identities.add(credential.tls_identity)
        models = None if ALL_MODELS in caller.models else frozenset(caller.models)
        configs.append(
            CallerConfig(caller.name, frozenset(digests), frozenset(identities), models, _limits(caller))
        )
    return tuple(configs)


def _limits(caller: CallerEntry) -> CallerLimits | None:
    entry = caller.limits
    if entry is None:
        return None
    buckets: dict[str, BucketLimit | None] = {}
    for limit, burst_key in BUCKETS:
        per_minute = getattr(entry, limit)
        burst = getattr(entry.burst, burst_key) if entry.burst is not None else None
        buckets[burst_key] = (
            None if per_minute is None else BucketLimit(limit, per_minute, burst or per_minute)
        )
    limits = CallerLimits(concurrent=entry.concurrent, **buckets)
    return limits if limits.buckets or limits.concurrent is not None else None


def caller_secrets(callers: tuple[CallerEntry, ...]) -> list[Secret]:
    """Every key the callers' variables and files hold, for log redaction."""
    return [key for caller in callers for credential in caller.credentials for key in credential.keys]
