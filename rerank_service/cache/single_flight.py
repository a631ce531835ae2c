"""Single flight: a pair being computed is computed once, however many calls ask for it.

The first call to miss a pair claims it in a `Flight`; a call that then asks for the same
pair finds the claim and waits for the first one's score instead of sending the pair
upstream again. A flight ends when its call has stored or given up its pairs (failed,
cancelled): whoever waited then reads the scores the flight got and computes the others
itself.

Most flights are never waited for, so a flight keeps its scores, and makes its event,
only once a call waits for it: claiming and resolving are a few C calls per call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence

from rerank_service.cache.entry import CachedScore


class Flight:
    """One call's claimed pairs: the scores they got so far (once waited for), and whether
    the call is done."""

    __slots__ = ("_done", "ended", "pending", "scores", "waited")

    def __init__(self, keys: set[bytes]) -> None:
        self.pending = keys  # the flight's own set: resolving takes keys out of it
        self.scores: dict[bytes, CachedScore] = {}
        self.waited = False  # a call waits for it: its scores are kept for that call
        self.ended = False
        self._done: asyncio.Event | None = None

    async def wait(self) -> None:
        """Return once the flight has ended (every pair resolved, or its call done)."""
        if self.ended:
            return
        if self._done is None:
            self._done = asyncio.Event()
        await self._done.wait()

    def end(self) -> None:
        self.ended = True
        if self._done is not None:
            self._done.set()


class Flights:
    """The pairs in flight in this process, each with the flight that claimed it. A key is
    claimed by at most one flight, and a flight's pending keys are all claimed by it."""

    def __init__(self) -> None:
        self._claims: dict[bytes, Flight] = {}

    def __len__(self) -> int:
        return len(self._claims)

    @property
    def claims(self) -> dict[bytes, Flight]:
        """Every claimed key's flight (read it; change it through the methods)."""
        return self._claims

    def claim(self, keys: set[bytes]) -> Flight:
        """A new flight for `keys` (none of them claimed yet; the flight keeps the set)."""
        flight = Flight(keys)
        self._claims.update(dict.fromkeys(keys, flight))
        return flight

    def resolve(self, flight: Flight, entries: Iterable[tuple[bytes, CachedScore]]) -> None:
        """These keys of `flight` have their scores: waiters will read them; the flight ends
        with its last key. Keys it did not claim are left alone."""
        pairs = list(entries)
        self.resolve_columns(
            flight, [key for key, _ in pairs], [e.score for _, e in pairs], [e.tokens for _, e in pairs]
        )

    def resolve_columns(
        self,
        flight: Flight,
        keys: Sequence[bytes],
        scores: Sequence[float],
        tokens: Sequence[int | None],
    ) -> None:
        """`resolve`, with the entries as columns (`keys[i]` scored `scores[i]`, `tokens[i]`)."""
        pending = flight.pending
        resolved = pending.intersection(keys)
        if not resolved:
            return
        if flight.waited:
            kept = flight.scores
            for key, score, count in zip(keys, scores, tokens, strict=True):
                if key in resolved:
                    kept[key] = CachedScore(score, count)
        pending -= resolved
        # Pending keys are claimed by their flight, so by this one: out of the claims, in C.
        deque(map(self._claims.__delitem__, resolved), maxlen=0)
        if not pending:
            flight.end()

    def finish(self, flight: Flight) -> None:
        """`flight`'s call is done with it: the keys it did not resolve are free again."""
        deque(map(self._claims.__delitem__, flight.pending), maxlen=0)
        flight.pending.clear()
        flight.end()
