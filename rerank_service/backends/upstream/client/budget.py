"""How long one upstream attempt may take: the upstream timeout, or less if the caller's
deadline comes first (a call must never outlive its caller)."""

from __future__ import annotations

import time


def attempt_budget(upstream_timeout: float, deadline: float | None) -> tuple[float, bool]:
    """(seconds, by_caller): the time one attempt may take (zero or less: the deadline has
    passed), and whether the caller's deadline rather than the upstream timeout set it.
    `deadline` is on time.monotonic()'s clock. A plain tuple: this runs on every call."""
    if deadline is None:
        return upstream_timeout, False
    remaining = deadline - time.monotonic()
    return (remaining, True) if remaining < upstream_timeout else (upstream_timeout, False)
