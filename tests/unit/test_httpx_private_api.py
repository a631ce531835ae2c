"""The private pieces of httpx that the upstream HTTP layer relies on.

proxies.py reads the environment's proxy settings with httpx's own helpers (so the
service reads HTTP(S)_PROXY, ALL_PROXY and NO_PROXY exactly as httpx does); httpx is
pinned below 0.29 in pyproject.toml. When a new httpx is tried, this says which piece
moved, instead of the service failing at start-up.
"""

from __future__ import annotations

import httpx
import pytest


def test_httpx_environment_proxy_helpers_are_where_proxies_py_imports_them() -> None:
    try:
        from httpx._utils import URLPattern, get_environment_proxies

        rules: object = get_environment_proxies()
        specific, general = URLPattern("all://127.0.0.1"), URLPattern("https://")
        ordered = sorted([general, specific])
    except Exception as exc:
        pytest.fail(f"httpx {httpx.__version__}: httpx._utils' proxy helpers moved ({exc}): adapt proxies.py")
    assert isinstance(rules, dict), "get_environment_proxies no longer returns a dict: adapt proxies.py"
    assert ordered == [specific, general], "URLPattern no longer sorts most specific first"
    assert specific.matches(httpx.URL("https://127.0.0.1:8443"))
