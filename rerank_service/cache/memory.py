"""The in-process tier: a least-recently-used map of pair keys to packed scores, bounded in
bytes, each entry good for a time to live.

The bound counts what an entry really costs the process, not only its payload: the key's
and the value's bytes objects as the allocator rounds them, and the map's own share (the
OrderedDict's node and hash-table slots), so `bytes` follows the process's memory.
"""

from __future__ import annotations

import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from rerank_service.cache.entry import CachedScore, pack, unpack

_EXPIRES = struct.Struct("<d")  # the entry's expiry on the tier's clock, before the packed score
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


class MemoryTier:
    """`get` and `put` by pair key. `max_bytes` 0 turns the tier off (it stores nothing)."""

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

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedScore | None:
        stored = self._entries.get(key)
        if stored is None:
            return None
        if _EXPIRES.unpack_from(stored)[0] <= self._clock():
            self._drop(key, stored)
            self.expirations += 1
            return None
        self._entries.move_to_end(key)
        return unpack(stored, _EXPIRES.size)

    def put(self, key: bytes, entry: CachedScore) -> None:
        self.put_many(((key, entry),))

    def put_many(self, entries: Iterable[tuple[bytes, CachedScore]]) -> None:
        if not self.enabled:
            return
        expires = _EXPIRES.pack(self._clock() + self.ttl)
        stored_entries, limit = self._entries, self.max_bytes
        held, added, evicted = self.bytes, 0, 0
        pop, popitem = stored_entries.pop, stored_entries.popitem
        for key, entry in entries:
            stored = expires + pack(entry)
            # entry_cost, inlined (this loop runs once per pair stored)
            cost = ((_ROUNDED + len(key)) & ~15) + ((_ROUNDED + len(stored)) & ~15) + ENTRY_OVERHEAD
            if cost > limit:
                continue
            previous = pop(key, None)
            if previous is not None:
                held -= entry_cost(key, previous)
            stored_entries[key] = stored
            held += cost
            added += 1
            while held > limit:
                cold_key, cold = popitem(last=False)
                held -= entry_cost(cold_key, cold)
                evicted += 1
        self.bytes = held
        self.evictions += evicted
        self._puts += added
        if self._puts >= SWEEP_EVERY:
            self._sweep(self._puts)
            self._puts = 0

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _sweep(self, most: int) -> None:
        """Drop up to `most` expired entries from the cold end."""
        entries, now = self._entries, self._clock()
        for _ in range(most):
            if not entries or _EXPIRES.unpack_from(entries[next(iter(entries))])[0] > now:
                return
            self._drop_coldest()
            self.expirations += 1

    def _drop_coldest(self) -> None:
        key, stored = self._entries.popitem(last=False)
        self.bytes -= entry_cost(key, stored)

    def _drop(self, key: bytes, stored: bytes) -> None:
        del self._entries[key]
        self.bytes -= entry_cost(key, stored)
