"""Single flight: a pair being computed is computed once, however many calls ask for it.

The first call to miss a pair claims it in a `Flight`; a call that then asks for the same
pair finds the claim and waits for the first one's score instead of sending the pair
upstream again. A flight ends when its call has stored or given up its pairs (failed,
cancelled): whoever waited then reads the scores the flight got and computes the others
itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from rerank_service.cache.entry import CachedScore


class Flight:
    """One call's claimed pairs: the scores they got so far, and whether the call is done."""

    __slots__ = ("done", "pending", "scores")

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.pending = set(keys)
        self.scores: dict[bytes, CachedScore] = {}
        self.done = asyncio.Event()


class Flights:
    """The pairs in flight in this process, each with the flight that claimed it."""

    def __init__(self) -> None:
        self._claims: dict[bytes, Flight] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def owner(self, key: bytes) -> Flight | None:
        return self._claims.get(key)

    def claim(self, keys: Iterable[bytes]) -> Flight:
        """A new flight for `keys` (none of them claimed yet)."""
        flight = Flight(keys)
        claims = self._claims
        for key in flight.pending:
            claims[key] = flight
        return flight

    def resolve(self, flight: Flight, entries: Iterable[tuple[bytes, CachedScore]]) -> None:
        """These keys of `flight` have their scores: waiters will read them; the flight ends
        with its last key. Keys it did not claim are left alone."""
        pending, claims = flight.pending, self._claims
        for key, entry in entries:
            if key not in pending:
                continue
            pending.discard(key)
            flight.scores[key] = entry
            if claims.get(key) is flight:
                del claims[key]
        if not pending:
            flight.done.set()

    def finish(self, flight: Flight) -> None:
        """`flight`'s call is done with it: the keys it did not resolve are free again."""
        for key in flight.pending:
            self._unclaim(flight, key)
        flight.pending.clear()
        flight.done.set()

    def _unclaim(self, flight: Flight, key: bytes) -> None:
        if self._claims.get(key) is flight:
            del self._claims[key]
