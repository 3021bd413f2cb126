"""When a store's entries were last read: the record that least-recently-used eviction
(:mod:`.capacity`) and ``kvcodec store stats`` read.

A load only notes the entry in memory (:meth:`AccessLog.record`: a dict update, nothing
on the store). The notes go to the store in batches, as one new *journal* object
``access/<writer>-<n>.log`` per flush, written by a background thread (every
:data:`FLUSH_ENTRIES` entries or :data:`FLUSH_S` seconds) and at exit; a journal is one
PUT, so any number of processes on any backend write theirs without coordination. Each
line is ``<entry name> <unix time>``. Whoever evicts merges every journal (the latest time
per entry wins), writes the merge as one journal and deletes the ones it merged, so
the record stays one or a few objects; a journal written meanwhile is simply merged the
next time. An entry that was never read counts as used when it was written (its mtime).

The record is a cache's bookkeeping, so it is never trusted for more than an order:
unreadable lines are skipped, and a store whose journals cannot be written loses only
recency (logged), never entries.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import uuid
import weakref

log = logging.getLogger("kvcodec")

FOLDER = "access"
FLUSH_ENTRIES = 256
FLUSH_S = 30.0
MAX_JOURNAL_BYTES = 256 << 20  # a journal larger than this is not ours: skipped

_LIVE: "weakref.WeakSet[AccessLog]" = weakref.WeakSet()


def parse(data: bytes) -> dict:
    """``{entry name: last read}`` of a journal's bytes (bad lines skipped)."""
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        name, _, when = line.partition(" ")
        try:
            t = float(when)
        except ValueError:
            continue
        # NaN compares false; infinity would keep its entry from age and LRU for good
        if name and math.isfinite(t) and t > out.get(name, -1.0):
            out[name] = t
    return out


def render(times: dict) -> bytes:
    return "".join(f"{name} {t:.3f}\n" for name, t in times.items()).encode()


class AccessLog:
    """The reads of one store object in this process, noted in memory and flushed in
    batches as journal objects (see the module)."""

    def __init__(self, backend, flush_entries: int = FLUSH_ENTRIES, flush_s: float = FLUSH_S):
        self._backend = backend
        self.flush_entries, self.flush_s = flush_entries, flush_s
        self._pending: dict = {}
        self._lock = threading.Lock()
        self._flushing = False
        self._last_flush = time.monotonic()
        self._writer = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._seq = 0
        _LIVE.add(self)

    def record(self, rel: str, when: float | None = None) -> None:
        """Note that entry ``rel`` was read (now, or at ``when``); a flush is started in
        the background once enough notes or time have gathered."""
        with self._lock:
            self._pending[rel] = time.time() if when is None else when
            due = (len(self._pending) >= self.flush_entries
                   or time.monotonic() - self._last_flush >= self.flush_s)
            if not due or self._flushing:
                return
            self._flushing = True
        threading.Thread(target=self._flush_in_background, daemon=True,
                         name="kvcodec-access").start()

    def _flush_in_background(self) -> None:
        try:
            self.flush()
        finally:
            with self._lock:
                self._flushing = False

    def flush(self) -> int:
        """Write the pending notes as one journal; returns how many. On a failure of the
        store they stay pending (logged) for the next flush."""
        with self._lock:
            batch, self._pending = self._pending, {}
            self._last_flush = time.monotonic()
            self._seq += 1
            name = f"{FOLDER}/{self._writer}-{self._seq}.log"
        if not batch:
            return 0
        try:
            self._backend.write(name, render(batch))
        except OSError as exc:
            log.warning("kvcodec store: cannot write its access journal (%s); recency "
                        "of %d entries kept for the next try", exc, len(batch))
            with self._lock:
                for k, t in batch.items():
                    if t > self._pending.get(k, -1.0):
                        self._pending[k] = t
            return 0
        return len(batch)

    def pending(self) -> dict:
        with self._lock:
            return dict(self._pending)


def read_all(backend) -> tuple[dict, list]:
    """Every journal of the store merged: ``({entry name: last read}, [journal names])``.
    Journals that cannot be read (gone meanwhile: merged by another process) are
    skipped."""
    times, names = {}, []
    for rel, size, _ in backend.scan(FOLDER):
        if not rel.endswith(".log") or size > MAX_JOURNAL_BYTES:
            continue
        try:
            data = backend.read(rel)
        except FileNotFoundError:
            continue
        names.append(rel)
        for k, t in parse(data).items():
            if t > times.get(k, -1.0):
                times[k] = t
    return times, names


def compact(backend, times: dict, merged: list, alive=None) -> None:
    """Replace the journals ``merged`` by one holding ``times`` (restricted to the
    names in ``alive``, if given: evicted entries need no record)."""
    if len(merged) <= 1 and alive is None:
        return
    keep = times if alive is None else {k: t for k, t in times.items() if k in alive}
    backend.write(f"{FOLDER}/merged-{uuid.uuid4().hex[:12]}.log", render(keep))
    for rel in merged:
        backend.remove(rel)


@atexit.register
def _flush_live() -> None:  # notes of a process that exits reach the store
    for log_ in list(_LIVE):
        try:
            log_.flush()
        except Exception:  # noqa: BLE001 - at exit, never raise
            pass
