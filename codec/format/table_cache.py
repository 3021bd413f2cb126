"""The reader's cache of built probability tables: files whose table sections are
byte-identical (a store's entries, coded with its shared tables) share one build."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from ..core import tables


class TableCache:
    """Built tables shared by files whose table sections are byte-identical (the entries
    of a store coded with its shared tables, :mod:`kvcodec.format.shared`): frequencies
    and native decode tables are built once per distinct section, not once per file.
    Keyed by a digest of the section's bytes and the layout they are read with (rows and
    alphabet per stream); least recently used out first beyond ``max_bytes`` of
    frequencies (the decode tables built from them take about as much again)."""

    def __init__(self, max_bytes: int = 128 << 20):
        self.max_bytes = max_bytes
        self._sets: OrderedDict = OrderedDict()  # key -> BuiltTables
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(raw: bytes, layout: tuple) -> tuple:
        return hashlib.blake2b(raw, digest_size=20).digest(), layout

    def get(self, key):
        with self._lock:
            got = self._sets.get(key)
            if got is None:
                self.misses += 1
                return None
            self._sets.move_to_end(key)
            self.hits += 1
            return got

    def put(self, key, built: "BuiltTables") -> "BuiltTables":
        with self._lock:
            if key in self._sets:
                return self._sets[key]
            self._sets[key] = built
            self._bytes += built.nbytes
            while self._bytes > self.max_bytes and len(self._sets) > 1:
                _, old = self._sets.popitem(last=False)
                self._bytes -= old.nbytes
            return built

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()
            self._bytes = 0
            self.hits = self.misses = 0


class BuiltTables:
    """One table section's levels and frequencies per stream (file order), and its
    native decode tables once a decode asks for them."""

    def __init__(self, levels: list, freqs: list):
        self.levels, self.freqs = levels, freqs
        self.nbytes = sum(f.nbytes for f in freqs)
        self.dtables = None
        self.lock = threading.Lock()

    def decode_tables(self) -> list:
        with self.lock:
            if self.dtables is None:
                self.dtables = tables.native().build_decode_tables(self.freqs)
            return self.dtables


#: The process's cache of built tables (:class:`TableCache`).
TABLES = TableCache()
