"""How many extra attempts a route may make: retries and fallbacks as a share of its calls.

Retrying is what turns an upstream that struggles into one that falls over: with three
attempts a call, a failing upstream gets three times the load. As Envoy's retry budgets
do, a route's retries and fallbacks together may add at most `share` of its calls over
the last `window` seconds, and always at least `floor` (so a quiet route still retries).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar

from rerank_service.core.window import SlidingCounts

_CALLS, _EXTRA = 0, 1

# Set by the router in the task that calls a deployment: whether another deployment of the
# route could take the call now (untried, not refusing). A deployment that answers 429 then
# gives the call up at once, for the route to fall over to that one, rather than wait to
# retry it where it was just refused.
FALLBACK_READY: ContextVar[bool] = ContextVar("rerank_fallback_ready", default=False)


class RetryBudget:
    def __init__(
        self,
        share: float = 0.2,
        floor: int = 10,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._share = share
        self._floor = floor
        self._counts = SlidingCounts(2, window, clock)

    def called(self) -> None:
        """One call arrived on the route."""
        self._counts.add(_CALLS)

    def try_spend(self) -> bool:
        """True (and counted) when one more attempt fits in the budget."""
        calls, extra = self._counts.totals()
        if extra >= max(self._floor, self._share * calls):
            return False
        self._counts.add(_EXTRA)
        return True
