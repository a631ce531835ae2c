"""Which HTTP proxy, if any, carries the calls to the upstream.

`upstream-proxy` set: that proxy, for every call (as httpx's `proxy=`: the environment
is then not read). Unset: the environment, read as httpx reads it with `trust_env`:
HTTPS_PROXY for an https upstream, HTTP_PROXY for http, ALL_PROXY for either, and
NO_PROXY exempting hosts, the most specific rule winning. The upstream is one origin,
so this is settled once at start-up, never per call.
"""

from __future__ import annotations

import httpx

# httpx's own reading of the environment: private, pinned with httpx (<0.29), and
# checked by tests/unit/test_httpx_private_api.py.
from httpx._utils import URLPattern, get_environment_proxies

from rerank_service.config import ConfigError, SettingError

# get_environment_proxies' keys, by the variable they come from (for error messages).
_VARIABLES = {"http://": "HTTP_PROXY", "https://": "HTTPS_PROXY", "all://": "ALL_PROXY"}


def proxy_for(url: httpx.URL, proxy: str | None) -> httpx.Proxy | None:
    """The proxy for calls to `url`: `proxy` if given, else the environment's; None: go direct."""
    if proxy is not None:
        return _usable(proxy)
    rules = sorted(get_environment_proxies().items(), key=lambda rule: URLPattern(rule[0]))
    for pattern, target in rules:
        if URLPattern(pattern).matches(url):
            return None if target is None else _usable(target, _VARIABLES.get(pattern, pattern))
    return None


def _usable(proxy: str, variable: str | None = None) -> httpx.Proxy:
    """The proxy, or a ConfigError naming where it came from: the environment `variable`, else
    the upstream_proxy setting (never echoing the URL: it may hold a password)."""
    try:
        parsed = httpx.Proxy(proxy)
    except (ValueError, httpx.InvalidURL):
        raise _refused("not a proxy URL (expected http://host:port)", variable) from None
    if parsed.url.scheme not in ("http", "https"):
        raise _refused(f"{parsed.url.scheme} proxies are not supported (expected http://host:port)", variable)
    if not parsed.url.host:
        raise _refused("the proxy URL names no host (expected http://host:port)", variable)
    return parsed


def _refused(problem: str, variable: str | None) -> ConfigError:
    if variable is None:
        return SettingError("upstream_proxy", problem)
    return ConfigError(f"{variable}: {problem}")
