"""One line per configuration problem: the setting as its flag spells it, what is wrong,
and where the value came from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_core import ErrorDetails

from rerank_service.config.secret import url_named
from rerank_service.config.settings import KeySources, expectation

# Places in the file where a value may be a key pasted by mistake: never repeated.
_HOLD_KEYS = frozenset(("credentials", "api_key_env", "api_key_file", "key_env", "key_file", "key_sha256"))
# Settings, and keys of a deployment, holding a URL, whose user:password@ a value of the
# wrong type (the URL written as a list or a mapping) would repeat: it is not.
_HOLD_URLS = frozenset(
    ("upstream_url", "upstream_proxy", "otlp_endpoint", "cache_store", "limits_store", "url", "proxy")
)


def describe(error: ErrorDetails, fields: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    """`upstream-timeout must be ..., got '-3' (from RERANK_UPSTREAM_TIMEOUT)`."""
    top, *inner = [str(part) if isinstance(part, str) else part for part in error["loc"]] or ["settings"]
    # The flag's spelling, then the place inside a nested section as the file writes it.
    name = str(top).replace("_", "-") + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in inner
    )
    info = fields.get(str(top))
    # A key pasted where its variable or file is named, or where a caller's credentials go
    # (a key written in place of the list or of an entry), must not be repeated.
    secret = (
        (info is not None and any(isinstance(item, KeySources) for item in info.metadata))
        or any(part in _HOLD_KEYS for part in inner)
        # `callers:` itself or one of its entries written as a bare string: a key pasted there.
        or (str(top) == "callers" and all(isinstance(part, int) for part in inner))
    )
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        problem = "is not a known setting"
    elif kind == "missing":
        problem = "is required"
    elif kind in ("value_error", "assertion_error"):
        problem = str(error.get("ctx", {}).get("error", error["msg"]))
    elif inner and inner[-1] == "api_key_env":
        problem = "must name an environment variable (letters, digits and _), not hold the key"
    else:
        declared = expectation(info) if info is not None and not inner else None
        expected = declared or error["msg"].removeprefix("Input should be ")
        url = str(top) in _HOLD_URLS or any(part in _HOLD_URLS for part in inner)
        shown = _url_brief(error["input"]) if url else _brief(error["input"])
        problem = f"must be {expected}" + ("" if secret else f", got {shown}")
    origin = origins.get(str(top))
    return f"{name} {problem}" + (f" (from {origin})" if origin else "")


def _url_brief(value: Any) -> str:
    """A URL setting's value as an error may say it: a string as url_named shows it, a number
    or switch as it is, anything else (a list or mapping, which may hold the URL) by its kind."""
    if isinstance(value, str):
        return _brief(url_named(value))
    if value is None or isinstance(value, bool | int | float):
        return _brief(value)
    return "a mapping" if isinstance(value, Mapping) else f"a {type(value).__name__}"


def _brief(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
