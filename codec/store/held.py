"""Entry bytes read ahead by a lookup, for the read that follows in the same process.

On an object store a lookup asks whether each entry of a prefix exists (a HEAD each),
then the load fetches them (a GET each): two round trips per entry before a byte is
decoded. A lookup that will be followed by a load in this process (the vLLM
connector's scheduler, where its worker runs beside it; ``load_prefix``) asks with a
GET instead and keeps the bytes here, and the load takes them: one round trip. (A
2,017-token prompt's 8 entries from moto behind a 1 Gbit/s relay, 2 cores: HEADs
34 ms, then GETs 68 ms.)

What is held is bounded (``max_bytes``, oldest out first) and taken once; bytes older
than ``ttl_s`` are not served (a request that waited in vLLM's queue fetches again).
A lookup holds while an entry of the largest size it can have still fits (a longer
prompt's later entries are asked with HEADs, as before, not fetched twice).
A write, move or delete of the entry through this process drops its held copy.
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
        self.bytes = self._reserved = 0

    def has(self, key) -> bool:
        """Whether ``key``'s bytes are held and fresh."""
        with self._lock:
            got = self._items.get(key)
            return got is not None and time.monotonic() - got[2] <= self.ttl_s

    def reserve(self, n: int) -> bool:
        """Whether ``n`` more bytes fit under the bound beside those held and reserved;
        if so they are reserved (for a read in flight) until :meth:`release`."""
        with self._lock:
            if self.bytes + self._reserved + n > self.max_bytes:
                return False
            self._reserved += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._reserved -= n

    def put(self, key, data: bytes, identity) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            self._drop(key)
            self._items[key] = (data, identity, time.monotonic())
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def take(self, key):
        """``(data, identity)`` held for ``key`` (no longer held), or None."""
        with self._lock:
            got = self._drop(key)
        if got is None or time.monotonic() - got[2] > self.ttl_s:
            return None
        return got[0], got[1]

    def drop(self, key) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key):
        got = self._items.pop(key, None)
        if got is not None:
            self.bytes -= len(got[0])
        return got


HELD = HeldReads()
