"""Flags, environment variables and a YAML file, merged by precedence into one Settings.

Precedence: a flag, then an environment variable, then the `--config` file, then the
default. An empty variable counts as unset, as shells and container specs write them.
Every problem becomes one ConfigError line naming the setting and where its value came
from; `rerank-service serve` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from collections.abc import Collection, Hashable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import ValidationError

from rerank_service.config.callers import CallerKeyError, check_distinct_keys, with_caller_keys
from rerank_service.config.deployments import deployment_specs
from rerank_service.config.problems import describe
from rerank_service.config.routes import KeySourceError, with_keys
from rerank_service.config.secret import (
    Secret,
    UnreadableKeyFile,
    file_named,
    key_fault,
    read_key_file,
    read_keys,
)
from rerank_service.config.settings import (
    ConfigError,
    KeySources,
    Option,
    Settings,
    check_consistency,
    options,
)

T = TypeVar("T")

# Keys only the file can hold (no flag, no variable).
FILE_ONLY = ("models", "allow_backend_change", "callers")
CONFIG_FLAG = "--config"
CONFIG_ENV = "RERANK_CONFIG"
# An argument only the workers' supervisor passes: the copy of the config file to read.
SNAPSHOT_ARG = "config_snapshot"


class Layer(NamedTuple):
    """The values one source sets, and where each came from (a flag, a variable, a file key)."""

    values: dict[str, Any]
    origins: dict[str, str]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; an unset flag stays None so the environment, file and default apply."""
    parser.add_argument(
        CONFIG_FLAG,
        dest="config",
        default=None,
        metavar="FILE",
        help=f"YAML file of settings, keyed by setting name (env {CONFIG_ENV}); flags and variables win",
    )
    for option in _plain():
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.name.split("_")[-1].upper(),
            help=f"{option.help} (env {option.env}; default {option.shown_default})",
        )
    for option in _secret():
        keys = _keys(option)
        parser.add_argument(
            keys.file_flag,
            dest=keys.file_key,
            default=None,
            metavar="PATH",
            help=f"a file holding {option.help} (env {', '.join(keys.env)})",
        )


def load_settings(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags (argparse's `vars()`), the environment and the --config file.

    `env` replaces os.environ (tests pass their own); no .env file is ever read.
    """
    args = args or {}
    env = os.environ if env is None else env
    file = _config_file(args, env)
    plain = {option.name for option in _plain()} | set(FILE_ONLY)
    from_file = Layer(
        {key: value for key, value in file.values.items() if key in plain},
        {key: origin for key, origin in file.origins.items() if key in plain},
    )
    merged = _merge(_flags(args), _environment(env), from_file)
    _check_text(merged)
    secrets = _secrets(args, env, file)
    origins = {**merged.origins, **secrets.origins}
    settings = build(Settings, Layer({**merged.values, **secrets.values}, origins), sources=origins)
    if settings.models:
        try:
            settings = dataclasses.replace(settings, models=with_keys(settings.models, env))
        except KeySourceError as exc:
            raise ConfigError(f"{exc} (from {origins['models']})") from None
        deployment_specs(settings)  # every deployment's own settings are valid
    if settings.callers:
        try:
            callers = with_caller_keys(settings.callers, env)
            check_distinct_keys(callers, settings.api_keys)
        except CallerKeyError as exc:
            raise ConfigError(f"{exc} (from {origins['callers']})") from None
        settings = dataclasses.replace(settings, callers=callers)
    check_consistency(settings)
    return settings


def build(cls: type[T], layer: Layer, **extra: Any) -> T:
    """Validate the layer's values into `cls`; any error becomes one ConfigError line."""
    try:
        return cls(**layer.values, **extra)
    except ValidationError as exc:
        fields = getattr(cls, "__pydantic_fields__", {})
        problems = (describe(error, fields, layer.origins) for error in exc.errors())
        raise ConfigError("; ".join(problems)) from None


def file_layer(path: Path, known: Collection[str], read_from: Path | None = None) -> Layer:
    """A YAML file's settings: a mapping of setting names (snake_case) to values.

    Values stay as YAML gives them (numbers, lists, mappings), so a nested section reaches
    its pydantic model whole and is validated there. `read_from`: a copy of the file to
    read in its place (messages still name `path`).
    """
    try:
        text = (read_from or path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: is not UTF-8 text") from None
    import yaml  # only when a file is given: `rerank-service rerank --help` stays fast

    try:
        data = yaml.load(text, Loader=_unique_keys_loader(yaml))  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config {path}: not valid YAML: {problem}{where}") from None
    except RecursionError:  # yaml reads nested lists and mappings by recursion
        raise ConfigError(f"config {path}: nests lists or mappings too deeply") from None
    if data is None:
        # A truncated file, or one read mid-write, must not mean "every default" (the demo
        # model in place of the routes it held); `{}` says "no settings" on purpose.
        raise ConfigError(f"config {path}: is empty (blank or comments only); write {{}} to set nothing")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: must be a mapping of setting names to values")
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), [str(name) for name in known], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config {path}: unknown setting {key!r}{hint}")
    return Layer(dict(data), {key: f"{key} in {path}" for key in data})


def _unique_keys_loader(yaml: Any) -> Any:
    """yaml's SafeLoader, refusing a mapping that names a key twice: YAML would keep the
    last one only, so a second `callers:` section would silently drop the first."""

    class UniqueKeys(yaml.SafeLoader):  # type: ignore[misc]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # a list or a mapping: refused by yaml below
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is written twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


# --- the sources -----------------------------------------------------------------------------


def _plain() -> tuple[Option, ...]:
    return tuple(option for option in options() if option.keys is None)


def _secret() -> tuple[Option, ...]:
    return tuple(option for option in options() if option.keys is not None)


def _keys(option: Option) -> KeySources:
    assert option.keys is not None
    return option.keys


def _flags(args: Mapping[str, Any]) -> Layer:
    values, origins = {}, {}
    for option in _plain():
        raw = args.get(option.name)
        if raw is not None:
            values[option.name] = raw.strip() if isinstance(raw, str) else raw
            origins[option.name] = option.flag
    return Layer(values, origins)


def _environment(env: Mapping[str, str]) -> Layer:
    values, origins = {}, {}
    for option in _plain():
        raw = env.get(option.env, "").strip()
        if raw:  # empty counts as unset
            values[option.name] = raw
            origins[option.name] = option.env
    return Layer(values, origins)


def _config_file(args: Mapping[str, Any], env: Mapping[str, str]) -> Layer:
    path = args.get("config") or env.get(CONFIG_ENV, "").strip()
    if not path:
        return Layer({}, {})
    secrets = {option.name: _keys(option) for option in _secret()}
    known = (
        [option.name for option in _plain()] + [keys.file_key for keys in secrets.values()] + list(FILE_ONLY)
    )
    # `serve --workers N`: the workers read the supervisor's copy of the file, named as the file.
    snapshot = args.get(SNAPSHOT_ARG)
    layer = file_layer(Path(path), [*known, *secrets], read_from=Path(snapshot) if snapshot else None)
    for name, keys in secrets.items():
        if name in layer.values:  # a config file is often committed: keys never go in one
            raise ConfigError(
                f"config {path}: {name} is a secret: name a key file ({keys.file_key}) "
                f"or set {' or '.join(keys.env)} instead"
            )
    return layer


def _check_text(layer: Layer) -> None:
    """Refuse a value, or a key of a nested section, that is no UTF-8 text: a byte of another
    encoding in a flag or variable (Python holds it as a lone surrogate) or a `\\ud800`
    escape in the file. Every message, log line and header repeating it would fail to encode
    (a traceback, not a configuration error); the value is not repeated."""
    for name, value in layer.values.items():
        pending = [value]
        while pending:  # not recursive: a section may nest deeply
            item = pending.pop()
            if isinstance(item, Mapping):
                pending += [*item.keys(), *item.values()]
            elif isinstance(item, list | tuple):
                pending += item
            elif isinstance(item, str) and not _utf8(item):
                origin = layer.origins.get(name)
                raise ConfigError(
                    f"{name.replace('_', '-')} holds text that is not UTF-8 (a byte of another "
                    "encoding, or a lone surrogate such as \\ud800)" + (f" (from {origin})" if origin else "")
                )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _merge(*layers: Layer) -> Layer:
    """Earlier layers win."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in reversed(layers):
        values.update(layer.values)
        origins.update(layer.origins)
    return Layer(values, origins)


def _secrets(args: Mapping[str, Any], env: Mapping[str, str], file: Layer) -> Layer:
    """Each secret from its first source that is set: the file flag, the variables, the file."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for option in _secret():
        keys = _keys(option)
        candidates = [(keys.file_flag, args.get(keys.file_key), True)]
        candidates += [(name, env.get(name), name.endswith("_FILE")) for name in keys.env]
        candidates.append((file.origins.get(keys.file_key, ""), file.values.get(keys.file_key), True))
        for origin, raw, is_file in candidates:
            # Only an absent or empty source is unset: one of blanks alone (a Secret's value
            # that is just a newline) is set, and refused below, rather than auth left off.
            if raw is None or raw == "":
                continue
            text = str(raw).strip()
            if is_file and not text:
                raise ConfigError(f"{origin} is set but names no file (it is blank)")
            if is_file and not _utf8(text):  # a key itself: key_fault says so, unrepeated
                raise ConfigError(f"{origin} names a file by text that is not UTF-8")
            found = _read_keys(keys, text, is_file, origin)
            if not found:  # a key source that holds no key must not silently switch auth off
                raise ConfigError(f"{origin} is set but holds no key")
            values[option.name] = tuple(found) if keys.several else found[0]
            origins[option.name] = origin
            break
    return Layer(values, origins)


def _read_keys(keys: KeySources, raw: str, is_file: bool, origin: str) -> list[Secret]:
    if not is_file:
        found = [key.strip() for key in raw.split(",")] if keys.several else [raw]
        for position, key in enumerate(found, 1):
            # A comment after a key ("sk-a # prod") would become part of it, and every call
            # with the real key be refused; the error says which key, never the key.
            if fault := key_fault(key):
                which = f"key {position} of its comma-separated list" if keys.several else "the key"
                raise ConfigError(f"{origin}: {which} {fault}")
        return [Secret(key) for key in found if key]
    named = "" if origin == keys.file_flag else f" (from {origin})"
    try:
        if keys.several:
            # The text as given, not a Path: an error names a `./` path (secret.file_named).
            return [Secret(key) for key in read_keys(raw)]
        text = read_key_file(raw).strip()
    except UnreadableKeyFile as exc:
        raise ConfigError(f"{keys.file_flag.removeprefix('--')} {exc}{named}") from None
    # One key, sent upstream in a header: a comment line after it would make every call fail.
    if fault := key_fault(text):
        setting = keys.file_flag.removeprefix("--")
        raise ConfigError(f"{setting} {file_named(raw)}: the key {fault}{named}")
    return [Secret(text)] if text else []
