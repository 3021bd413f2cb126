"""Entry bytes read ahead by a lookup, for the read that follows in the same process.

On an object store a lookup asks whether each entry of a prefix exists (a HEAD each),
then the load fetches them (a GET each): two round trips per entry before a byte is
decoded. A lookup that will be followed by a load in this process (the vLLM
connector's scheduler, where its worker runs beside it; ``load_prefix``) asks with a
GET instead and keeps the bytes here, and the load takes them: one round trip. (A
2,017-token prompt's 8 entries from moto behind a 1 Gbit/s relay, 2 cores: HEADs
34 ms, then GETs 68 ms.)

What is held is taken once, bounded and fresh. Bytes older than ``ttl_s`` are dropped
(a request that waited in vLLM's queue fetches again). Past ``max_bytes`` nothing
more is held: a lookup then asks with HEADs, as without holding (a prompt longer than
the bound fetches its later entries once, in its load), and what its reads in flight
bring past the bound is not kept (fetched again by the load; what is held stays, for
the load it was read for). A write, move or delete of the entry through this process
drops its held copy.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict


class HeldReads:
    """``(data, identity)`` of entries by ``(store root, rel)``: see the module."""

    def __init__(self, max_bytes: int = 256 << 20, ttl_s: float = 30.0):
        self.max_bytes, self.ttl_s = int(max_bytes), float(ttl_s)
        self._items: OrderedDict = OrderedDict()  # key -> (data, identity, time held)
        self._lock = threading.Lock()
        self.bytes = 0

    def has(self, key) -> bool:
        """Whether ``key``'s bytes are held (and fresh)."""
        with self._lock:
            self._expire()
            return key in self._items

    def room(self) -> bool:
        """Whether more bytes may be held."""
        with self._lock:
            self._expire()
            return self.bytes < self.max_bytes

    def put(self, key, data: bytes, identity) -> bool:
        """Hold ``data`` for ``key`` if it fits under the bound; returns whether it does."""
        with self._lock:
            self._drop(key)
            self._expire()
            if self.bytes + len(data) > self.max_bytes:
                return False
            self._items[key] = (data, identity, time.monotonic())
            self.bytes += len(data)
            return True

    def take(self, key):
        """``(data, identity)`` held for ``key`` (no longer held), or None."""
        with self._lock:
            self._expire()
            got = self._drop(key)
        return None if got is None else got[:2]

    def drop(self, key) -> None:
        with self._lock:
            self._drop(key)

    def _expire(self) -> None:
        """Drop what was held longer than ``ttl_s`` (the oldest come first)."""
        now = time.monotonic()
        while self._items:
            key, (_, _, t) = next(iter(self._items.items()))
            if now - t <= self.ttl_s:
                return
            self._drop(key)

    def _drop(self, key):
        got = self._items.pop(key, None)
        if got is not None:
            self.bytes -= len(got[0])
        return got


HELD = HeldReads()
