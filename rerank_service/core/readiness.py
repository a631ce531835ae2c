"""Whether a backend can answer now, as a value others can wait on changing.

Health follows it as events: the server awaits `changed()` instead of polling, so a
circuit that opens is NOT_SERVING at once, and nothing runs while nothing changes.
"""

from __future__ import annotations

import asyncio


class Readiness:
    def __init__(self, ready: bool = False) -> None:
        self._ready = ready
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    def set(self, ready: bool) -> None:
        """Record the backend's readiness; wakes every waiter if it changed."""
        if ready == self._ready:
            return
        self._ready = ready
        # Waiters hold the old event: setting it wakes them; later waiters get a new one.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self) -> bool:
        """Wait for the next change; the readiness it changed to."""
        await self._changed.wait()
        return self._ready
