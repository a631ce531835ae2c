"""The in-process tier: a least-recently-used map of pair keys to packed scores, bounded in
bytes, each entry good for a time to live.

The bound counts what an entry really costs the process, not only its payload: the key's
and the value's bytes objects as the allocator rounds them, and the map's own share (the
OrderedDict's node and hash-table slots), so `bytes` follows the process's memory.

Each value is one bytes object (its expiry, the score, the token count): bytes are never
tracked by the garbage collector, so a full tier adds nothing to a collection's work but
the map itself. A call's pairs are read and stored together (`get_many`, `put_columns`):
the tier sits on every call's path, so the per-pair work is kept to a few C calls.
"""

from __future__ import annotations

import struct
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import cast

from rerank_service.cache.entry import CachedScore
from rerank_service.cache.keys import KEY_SIZE

# A stored value: the entry's expiry on the tier's clock, then the entry as entry.pack
# writes it (the score, and the token count in 4 or 8 bytes when there is one).
_EXPIRES = struct.Struct("<d")
_STORED = struct.Struct("<dd")
_STORED32 = struct.Struct("<ddI")
_STORED64 = struct.Struct("<ddQ")
_UINT32_MAX = 0xFFFF_FFFF
_new_tuple = tuple.__new__
_USUAL_SIZE = {_STORED32.size}
_EXPIRY, _ENTRY = itemgetter(0), itemgetter(slice(1, None))  # of a stored value's fields
# What the OrderedDict holds per entry besides the key and the value: its linked node (32
# bytes) and its share of the hash table, the dict's indices, entries and the fast-node
# array, which are 74 to 116 bytes an entry depending on how full the table is after its
# last resize (measured with tracemalloc on CPython 3.11); the worst case, rounded up.
ENTRY_OVERHEAD = 120
_BYTES_HEADER = sys.getsizeof(b"")  # a bytes object's size besides its content
_ROUNDED = _BYTES_HEADER + 15  # allocated_size's addend
# Every SWEEP_EVERY puts, up to as many expired entries leave from the cold end (the rest
# leave when read, or when evicted for room): an entry's time to live frees its memory
# without a timer, and a put stays O(1).
SWEEP_EVERY = 16


def allocated_size(length: int) -> int:
    """The bytes a bytes object of `length` takes: rounded up to CPython's 16-byte unit."""
    return (_ROUNDED + length) & ~15


def entry_cost(key: bytes, stored: bytes) -> int:
    """What one entry costs the process: its key, its stored value, the map's share."""
    return allocated_size(len(key)) + allocated_size(len(stored)) + ENTRY_OVERHEAD


# Every stored value (16, 20 or 24 bytes) takes the same allocation, so an entry's cost
# depends on its key alone: a put or an eviction needs no look at the value.
_VALUE_COST = allocated_size(_STORED.size)
if not _VALUE_COST == allocated_size(_STORED32.size) == allocated_size(_STORED64.size):
    raise RuntimeError("the stored values' sizes fall in different allocation classes")


def _key_cost(key: bytes) -> int:
    """entry_cost of `key` with any stored value."""
    return ((_ROUNDED + len(key)) & ~15) + _VALUE_COST + ENTRY_OVERHEAD


# What an entry of a pair key (keys.KEY_SIZE bytes) costs: every entry, in practice. While
# the tier holds only such entries, room is made by counting, not by looking at each.
USUAL_COST = _key_cost(bytes(KEY_SIZE))


def _stored(expires: float, score: float, tokens: int | None) -> bytes:
    """A value as the tier keeps it (a negative token count is left out, as entry.pack does)."""
    if tokens is None or tokens < 0:
        return _STORED.pack(expires, score)
    if tokens <= _UINT32_MAX:
        return _STORED32.pack(expires, score, tokens)
    return _STORED64.pack(expires, score, tokens)


def _fields(stored: bytes) -> tuple[float, float, int | None]:
    """A stored value's expiry, score and token count (None: none was counted)."""
    if len(stored) == _STORED.size:
        expires, score = _STORED.unpack(stored)
        return expires, score, None
    return cast(tuple[float, float, int], _STORED64.unpack(stored))


class MemoryTier:
    """`get` and `put` by pair key (`get_many`, `put_many`, `put_columns` for a call's
    pairs at once). `max_bytes` 0 turns the tier off (it stores nothing)."""

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0 or ttl <= 0:
            raise ValueError("max_bytes must be >= 0 and ttl > 0")
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self.bytes = 0
        self.evictions = 0  # entries dropped for room
        self.expirations = 0  # entries dropped past their time to live
        self._puts = 0  # since the last sweep
        self._unusual = 0  # entries whose cost is not USUAL_COST (a key of another size)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedScore | None:
        return self.get_many((key,))[0]

    def get_many(self, keys: Sequence[bytes]) -> list[CachedScore | None]:
        """Each key's entry, in order, None where there is none (or it expired); the ones
        found become the most recently used."""
        found: list[bytes | None] = list(map(self._entries.get, keys))
        if not any(found):  # a stored value is never empty: nothing here
            return found  # type: ignore[return-value]  # every item is None
        entries, now = self._entries, self._clock()
        if all(found) and set(map(len, found)) == _USUAL_SIZE:  # type: ignore[arg-type]
            # A whole hit of usual values (a repeated call): read, checked and moved in C.
            rows = list(_STORED32.iter_unpack(b"".join(found)))  # type: ignore[arg-type]
            if min(map(_EXPIRY, rows)) > now:
                deque(map(entries.move_to_end, keys), maxlen=0)
                return list(map(_new_tuple, repeat(CachedScore), map(_ENTRY, rows)))
        answers: list[CachedScore | None] = []
        append, move_to_end, unpack32, size32 = (
            answers.append,
            entries.move_to_end,
            _STORED32.unpack,
            _STORED32.size,
        )
        for key, stored in zip(keys, found, strict=True):
            if stored is None:
                append(None)
                continue
            # The usual value (a token count in 4 bytes) read inline; a CachedScore made
            # from C (its class's __new__ is Python, several times the cost).
            fields = unpack32(stored) if len(stored) == size32 else _fields(stored)
            if fields[0] > now:
                move_to_end(key)
                append(_new_tuple(CachedScore, fields[1:]))
                continue
            if entries.pop(key, None) is not None:  # a key asked twice is dropped once
                self._dropped(key)
                self.expirations += 1
            append(None)
        return answers

    def put(self, key: bytes, entry: CachedScore) -> None:
        self.put_columns((key,), (entry.score,), (entry.tokens,))

    def put_many(self, entries: Iterable[tuple[bytes, CachedScore]], ttl: float | None = None) -> None:
        pairs = list(entries)
        self.put_columns(
            [key for key, _ in pairs],
            [entry.score for _, entry in pairs],
            [entry.tokens for _, entry in pairs],
            ttl,
        )

    def put_columns(
        self,
        keys: Sequence[bytes],
        scores: Sequence[float],
        tokens: Sequence[int | None],
        ttl: float | None = None,
    ) -> None:
        """Store `scores[i]` (and `tokens[i]`, None for none) under `keys[i]`, as the most
        recently used, evicting the least recently used ones for room. They expire after
        `ttl` seconds, at most the tier's own time to live (None: that)."""
        if not self.enabled or not keys:
            return
        expires = self._clock() + (self.ttl if ttl is None else min(ttl, self.ttl))
        lengths = set(map(len, keys))
        cost = _key_cost(keys[0])
        if len(lengths) != 1 or cost != USUAL_COST or cost > self.max_bytes or None in tokens:
            self._put_each(keys, scores, tokens, expires)
            return
        counts = cast(Sequence[int], tokens)  # no None among them
        if min(counts) < 0 or max(counts) > _UINT32_MAX:
            self._put_each(keys, scores, tokens, expires)
            return
        # The usual call: keys of one size, token counts in 4 bytes. Stored all at once;
        # then keys already there (or sent twice) go to the hot end in the order a put
        # each would leave them, and the coldest leave for room: the same entries, order
        # and counts as storing them one by one.
        entries = self._entries
        before = len(entries)
        entries.update(zip(keys, map(_STORED32.pack, repeat(expires), scores, counts), strict=True))
        added = len(entries) - before
        if added != len(keys):
            move_to_end = entries.move_to_end
            for key in keys:
                move_to_end(key)
        self.bytes += added * cost
        self._evict()
        self._swept(added)

    def _put_each(
        self, keys: Sequence[bytes], scores: Sequence[float], tokens: Sequence[int | None], expires: float
    ) -> None:
        """put_columns, one entry at a time (any key size, token count or bound)."""
        entries, limit, held, added = self._entries, self.max_bytes, self.bytes, 0
        for key, score, count in zip(keys, scores, tokens, strict=True):
            cost = _key_cost(key)
            if cost > limit:  # larger than the whole tier: not kept
                continue
            if entries.pop(key, None) is not None:  # stored again: it moves to the hot end, same cost
                held -= cost
            elif cost != USUAL_COST:
                self._unusual += 1
            entries[key] = _stored(expires, score, count)
            held += cost
            added += 1
        self.bytes = held
        self._evict()
        self._swept(added)

    def _evict(self) -> None:
        """Drop the least recently used entries until the tier is within its bound."""
        over = self.bytes - self.max_bytes
        if over <= 0:
            return
        entries = self._entries
        if not self._unusual:  # every entry costs USUAL_COST: drop as many as make room, in C
            count = min(-(-over // USUAL_COST), len(entries))
            deque(map(entries.popitem, repeat(False, count)), maxlen=0)
            self.bytes -= count * USUAL_COST
            self.evictions += count
            return
        while self.bytes > self.max_bytes:
            self._dropped(entries.popitem(False)[0])
            self.evictions += 1

    def _dropped(self, key: bytes) -> None:
        """`key`'s entry has left the map: its bytes leave the count."""
        cost = _key_cost(key)
        self.bytes -= cost
        if cost != USUAL_COST:
            self._unusual -= 1

    def _swept(self, added: int) -> None:
        self._puts += added
        if self._puts >= SWEEP_EVERY:
            self._sweep(self._puts)
            self._puts = 0

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self._unusual = 0

    def _sweep(self, most: int) -> None:
        """Drop up to `most` expired entries from the cold end."""
        entries, now = self._entries, self._clock()
        for _ in range(most):
            if not entries or _EXPIRES.unpack_from(entries[next(iter(entries))])[0] > now:
                return
            self._dropped(entries.popitem(False)[0])
            self.expirations += 1
