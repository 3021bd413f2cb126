"""A store's capacity: least-recently-used eviction down to a low watermark, and an
age limit (TTL).

A store opened with ``max_bytes`` counts what it holds (one listing, then what it
writes; listed again every :data:`RESCAN_S` seconds, since other processes write too).
When a put takes it over ``max_bytes``, :func:`evict` lists the store, merges the access
journals (:mod:`.access`) and removes, oldest first, damaged entries set aside
(``*.kvc.bad``), then entries by their last read (or write) until the store holds at
most ``low_water * max_bytes``. With ``ttl``, entries not read for ``ttl`` seconds go
too. Only entries and their ``.bad`` files are ever removed: a job's manifest, the
shared tables and the journals stay (they count toward the bytes).

Removal is safe for readers: on a local disk an open file stays readable after it is
unlinked (and a reader holds whole entries in memory anyway); on an object store a
reader that asks for an entry just removed gets a miss. An entry rewritten since it
was listed is not removed (same size and mtime checked on a local disk).
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field

from ..errors import ConfigError
from . import access
from . import keys as keying

log = logging.getLogger("kvcodec")

RESCAN_S = 60.0
BAD_NAME = re.compile(keying.ENTRY_NAME.pattern + r"\.bad")


def _positive(x) -> bool:
    try:
        return not isinstance(x, bool) and 0 < float(x) < math.inf  # False for NaN
    except (TypeError, ValueError, OverflowError):
        return False


@dataclass
class Policy:
    """``max_bytes`` (None: no cap), ``ttl`` seconds (None: no age limit) and the
    fraction of ``max_bytes`` an eviction goes down to."""

    max_bytes: int | None = None
    ttl: float | None = None
    low_water: float = 0.9

    def __post_init__(self):
        if self.max_bytes is not None and not _positive(self.max_bytes):
            raise ConfigError(f"max_bytes must be positive, got {self.max_bytes!r:.40}")
        if self.ttl is not None and not _positive(self.ttl):  # NaN: entries never expired
            raise ConfigError(f"ttl must be positive seconds, got {self.ttl!r:.40}")
        if not 0 < self.low_water <= 1:
            raise ConfigError(f"low_water must be in (0, 1], got {self.low_water}")
        self.max_bytes = None if self.max_bytes is None else int(float(self.max_bytes))

    @property
    def active(self) -> bool:
        return self.max_bytes is not None or self.ttl is not None


@dataclass
class Item:
    rel: str
    size: int
    mtime: float
    last: float  # last read, or the write if never read

    @property
    def bad(self) -> bool:
        return self.rel.endswith(".bad")


@dataclass
class Report:
    """What an eviction pass found and did (``removed``: entries and ``.bad`` files)."""

    bytes_before: int = 0
    bytes_after: int = 0
    removed: list = field(default_factory=list)
    removed_bytes: int = 0
    expired: int = 0
    ages: list = field(default_factory=list)  # seconds since each removed entry's last use

    def to_dict(self) -> dict:
        ages = sorted(self.ages)
        return {"bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "removed": len(self.removed), "removed_bytes": self.removed_bytes,
                "expired": self.expired,
                "removed_age_s": {"min": round(ages[0], 1), "median": round(
                    ages[len(ages) // 2], 1), "max": round(ages[-1], 1)} if ages else None}


def inventory(backend, times: dict | None = None) -> tuple[list, int]:
    """``([Item of every entry and .bad file], total bytes of every object)``."""
    items, total = [], 0
    for rel, size, mtime in backend.scan():
        total += size
        if keying.ENTRY_NAME.fullmatch(rel) or BAD_NAME.fullmatch(rel):
            last = max(mtime, (times or {}).get(rel, 0.0))
            items.append(Item(rel, size, mtime, last))
    return items, total


def choose(items: list, total: int, policy: Policy, now: float) -> tuple[list, int]:
    """The items to remove, in order, and how many of them are past the TTL: ``.bad``
    files oldest first, then expired entries, then the least recently used until the
    total is at most the low watermark."""
    out, expired = [], 0
    bad = sorted((i for i in items if i.bad), key=lambda i: i.mtime)
    live = sorted((i for i in items if not i.bad), key=lambda i: i.last)
    over = policy.max_bytes is not None and total > policy.max_bytes
    goal = policy.low_water * policy.max_bytes if policy.max_bytes is not None else None
    for i in bad:
        if over and total > goal:
            out.append(i)
            total -= i.size
    for i in live:
        if policy.ttl is not None and i.last < now - policy.ttl:
            expired += 1
        elif not (over and total > goal):
            continue
        out.append(i)
        total -= i.size
    return out, expired


def evict(backend, policy: Policy, log_: "access.AccessLog | None" = None,
          dry_run: bool = False, now: float | None = None) -> Report:
    """One eviction pass over the store (see the module); with ``dry_run``, only what it
    would remove."""
    if log_ is not None:
        log_.flush()
    times, journals = access.read_all(backend)
    items, total = inventory(backend, times)
    now = time.time() if now is None else now
    chosen, expired = choose(items, total, policy, now)
    report = Report(bytes_before=total, expired=expired)
    for i in chosen:
        if dry_run or backend.remove(i.rel, i.size, None if backend.remote else i.mtime):
            report.removed.append(i.rel)
            report.removed_bytes += i.size
            if not i.bad:
                report.ages.append(max(0.0, now - i.last))
    report.bytes_after = total - report.removed_bytes
    if not dry_run and (report.removed or len(journals) > 8):
        gone = set(report.removed)
        try:
            access.compact(backend, times, journals, {i.rel for i in items if i.rel not in gone})
        except OSError as exc:
            log.warning("kvcodec store: cannot compact its access journals (%s)", exc)
    if report.removed and not dry_run:
        log.info("kvcodec store: evicted %d entries (%d bytes, unused for %.0f s or "
                 "more); %d bytes left", len(report.removed), report.removed_bytes,
                 min(report.ages, default=0.0), report.bytes_after)
    return report


class StoreCapacity:
    """Capacity of a :class:`~kvcodec.store.ChunkStore` (mixed in; uses its
    ``_backend`` and ``metrics``): the access log its loads feed, and eviction after
    puts."""

    def _init_capacity(self, max_bytes, ttl, low_water: float = 0.9) -> None:
        self.capacity = Policy(max_bytes, ttl, low_water)
        self.access = access.AccessLog(self._backend)
        # Shared with the salted views (with_salt copies attributes, so a mutable
        # holder): bytes held as last counted, when, and when the last pass ran.
        self._cap = {"used": None, "measured": 0.0, "last_pass": 0.0,
                     "lock": threading.Lock()}

    def _read(self, rel: str) -> None:
        """Entry ``rel`` was read by a load (noted in memory only)."""
        self.access.record(rel)

    def _wrote(self, nbytes: int) -> None:
        """An entry of ``nbytes`` was written: evict if the store is now over its cap,
        or when an age limit's pass is due."""
        policy, cap = self.capacity, self._cap
        if not policy.active:
            return
        with cap["lock"]:
            now = time.monotonic()
            due = False
            if policy.max_bytes is not None:
                if cap["used"] is None or now - cap["measured"] > RESCAN_S:
                    cap["used"], cap["measured"] = inventory(self._backend)[1], now
                    self.metrics.measured(cap["used"])
                else:
                    cap["used"] += nbytes
                due = cap["used"] > policy.max_bytes
            if policy.ttl is not None:
                due = due or now - cap["last_pass"] > min(policy.ttl / 4, 600.0)
            if due:
                self._evict_locked(False)

    def evict(self, dry_run: bool = False) -> Report:
        """Run an eviction pass now with this store's policy (see :mod:`.capacity`)."""
        with self._cap["lock"]:
            return self._evict_locked(dry_run)

    def _evict_locked(self, dry_run: bool) -> Report:
        report = evict(self._backend, self.capacity, self.access, dry_run)
        if not dry_run:
            cap = self._cap
            cap["used"], cap["measured"] = report.bytes_after, time.monotonic()
            cap["last_pass"] = cap["measured"]
            self.metrics.evicted(len(report.removed), report.removed_bytes)
            self.metrics.measured(report.bytes_after)
        return report
