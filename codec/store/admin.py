"""A store as its operator sees it, without a model: what it holds (``stats``, ``ls``),
whether every entry's bytes are intact (``verify``), and cleaning (``gc``, ``rm``).
The ``kvcodec store`` commands call these.

Entries are described from their headers alone (one ranged read each): the model
(architecture and a short hash of its fingerprint), the codec config, the kind
(``prefix``: a chunk of a prompt prefix; ``document``: a chunk of a document cached
behind an anchor; ``evicted``: a whole evicted cache), tokens and format version. Last
reads come from the access journals (:mod:`.access`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.paths import loads_json
from ..errors import ConfigError, CorruptError, KVCodecError
from ..format.container import crc32
from . import access, capacity
from . import keys as keying
from .backends import open_backend
from .verify import HEAD, Verifier, head, read_config

READ_AHEAD = 16  # files a local verify asks the disk for ahead of its checks
MAX_RECORD_BYTES = 16 << 20  # a manifest record larger than this is not one


@dataclass
class EntryInfo:
    """One entry (or ``.bad`` file) as the store lists it and its header says."""

    name: str
    bytes: int
    mtime: float
    last_read: float | None
    model: str = "?"
    config: str = "?"
    kind: str = "?"
    tokens: int = 0
    version: int = 0
    error: str | None = None  # the header could not be read (damaged, or the environment)

    def to_dict(self) -> dict:
        return asdict(self)


def model_label(fp) -> str:
    """``<architecture>:<12 hex>``: a fingerprint, short (the hash covers all of it)."""
    if not isinstance(fp, dict):
        return "?"
    h = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return f"{fp.get('architecture', '?')}:{h}"


def describe(header: dict, info: EntryInfo) -> EntryInfo:
    info.model = model_label(header.get("model"))
    info.kind = ("evicted" if header.get("evicted") else
                 "document" if header.get("anchor") else "prefix")
    tokens = header.get("num_tokens")
    info.tokens = tokens if isinstance(tokens, int) else 0
    return info


class StoreAdmin:
    """A store (directory or fsspec URL) opened for operations; no model needed."""

    def __init__(self, root, storage_options=None, threads: int = 8):
        if not (isinstance(root, str) and "://" in root) and not Path(root).is_dir():
            raise ConfigError(f"store {root}: no such directory")
        self.backend = open_backend(root, storage_options)
        self.root = self.backend.root
        self.threads = threads
        self._configs: dict = {}  # config section bytes -> name

    # -- listing ---------------------------------------------------------------------
    def objects(self) -> tuple[list, int, dict]:
        """``([Item of every entry and .bad file], total bytes, {entry: last read})``."""
        times, _ = access.read_all(self.backend)
        items, total = capacity.inventory(self.backend, times)
        return items, total, times

    def _info(self, item, times: dict) -> EntryInfo:
        info = EntryInfo(item.rel, item.size, item.mtime, times.get(item.rel))
        try:
            data = self.backend.read_head(item.rel, HEAD)
            got = head(data, item.rel)
            if isinstance(got, int):
                data = self.backend.read_head(item.rel, got)
                got = head(data, item.rel)
            if isinstance(got, int):
                raise CorruptError(f"{item.rel}: truncated header")
            info.version = got[0]
            describe(got[1], info)
            info.config = self._config_name(item.rel, data, got[1], got[2])
            return info
        except (KVCodecError, OSError) as exc:
            info.error = f"{type(exc).__name__}: {exc}"
            return info

    def _config_name(self, rel: str, data: bytes, header: dict, start: int) -> str:
        """The name in an entry's config section (``start``: where its data begins; read
        with the header when it follows it closely; entries of one config share the
        section, parsed once)."""
        sec = next((s for s in header.get("sections") or () if isinstance(s, dict)
                    and s.get("name") == "config"), None)
        try:
            begin = start + int(sec["offset"])
            end = begin + int(sec["length"])
        except (TypeError, KeyError, ValueError):
            return "?"
        if end > len(data):
            if end > HEAD * 16:
                return "?"
            data = self.backend.read_head(rel, end)
        raw = bytes(data[begin:end])
        if crc32(raw) != sec.get("crc32"):
            return "?"
        name = self._configs.get(raw)
        if name is None:
            try:
                name = str(read_config(raw, rel).get("name", "?"))
            except KVCodecError:
                name = "?"
            self._configs[raw] = name
        return name

    def entries(self, progress=None) -> list:
        """:class:`EntryInfo` of every entry and ``.bad`` file (headers read in
        parallel); ``progress(n)`` is called as they are read."""
        items, _, times = self.objects()
        return self._map(lambda i: self._info(i, times), items, progress)

    def _map(self, fn, items, progress, threads=None):
        out = []
        with ThreadPoolExecutor(max_workers=max(1, threads or self.threads)) as pool:
            for r in pool.map(fn, items):
                out.append(r)
                if progress is not None:
                    progress(1)
        return out

    def stats(self, progress=None) -> dict:
        """Entries and bytes in all, per model and config, per kind; oldest and newest
        read; ``.bad`` files; bytes of other objects (manifests, tables, journals)."""
        items, total, times = self.objects()
        infos = self._map(lambda i: self._info(i, times), items, progress)
        live = [i for i in infos if not i.name.endswith(".bad")]
        groups: dict = {}
        for i in live:
            g = groups.setdefault((i.model, i.config), {"model": i.model, "config": i.config,
                                                        "entries": 0, "bytes": 0, "tokens": 0})
            g["entries"] += 1
            g["bytes"] += i.bytes
            g["tokens"] += i.tokens
        kinds = {k: {"entries": sum(1 for i in live if i.kind == k),
                     "bytes": sum(i.bytes for i in live if i.kind == k)}
                 for k in ("prefix", "document", "evicted", "?")}
        reads = [i.last_read for i in live if i.last_read is not None]
        used = [i.last_read or i.mtime for i in live]
        bad = [i for i in infos if i.name.endswith(".bad")]
        return {
            "store": str(self.root), "kvcodec_store_entries": len(live),
            "kvcodec_store_bytes": total, "entry_bytes": sum(i.bytes for i in live),
            "other_bytes": total - sum(i.bytes for i in infos),
            "by_model_config": sorted(groups.values(), key=lambda g: -g["bytes"]),
            "by_kind": {k: v for k, v in kinds.items() if v["entries"] or k != "?"},
            "oldest_use": min(used, default=None), "newest_use": max(used, default=None),
            "entries_read": len(reads), "unreadable_headers": sum(1 for i in live if i.error),
            "bad": len(bad), "bad_bytes": sum(i.bytes for i in bad),
        }

    def select(self, infos: list, model=None, config=None, kind=None,
               older_than: float | None = None, now: float | None = None) -> list:
        """The entries of ``infos`` matching every filter given (``model``: a substring
        of its label; ``older_than``: seconds since its last use)."""
        now = time.time() if now is None else now
        out = []
        for i in infos:
            if i.name.endswith(".bad"):
                continue
            if model is not None and model not in i.model:
                continue
            if config is not None and i.config != config:
                continue
            if kind is not None and i.kind != kind:
                continue
            if older_than is not None and (i.last_read or i.mtime) > now - older_than:
                continue
            out.append(i)
        return out

    # -- verify ----------------------------------------------------------------------
    def verify(self, quarantine: bool = False, progress=None, salts=None) -> dict:
        """Check every entry (:class:`.verify.Verifier`: checksums, shared tables,
        tokens, and a first chunk's key under ``salts``, the tenants' salts with None for
        unsalted entries; None: unknown); with ``quarantine``, move the damaged ones
        aside (``*.kvc.bad``). Returns a report: entries, bytes, damaged (name and why),
        unreadable (the environment's failures: never moved), seconds, MB/s."""
        t0 = time.perf_counter()
        items = [i for i in capacity.inventory(self.backend)[0] if not i.bad]
        checker = Verifier(self.backend, salts)
        # A local disk reads ahead (WILLNEED hints, READ_AHEAD files on) while the
        # checks run, one thread per core: it is I/O-bound then, not checksum-bound.
        prefetch = getattr(self.backend, "prefetch", None)
        for item in items[:READ_AHEAD] if prefetch else ():
            prefetch(item.rel)

        def one(k):
            if prefetch and k + READ_AHEAD < len(items):
                prefetch(items[k + READ_AHEAD].rel)
            try:
                return items[k], checker.check(items[k].rel, items[k].size), None
            except FileNotFoundError:
                return items[k], "gone", None  # removed since the listing (evicted)
            except OSError as exc:
                return items[k], None, f"{type(exc).__name__}: {exc}"
        damaged, unreadable, unverified, moved, nbytes, gone, newer = [], [], 0, 0, 0, 0, 0
        local = None if self.backend.remote else (os.cpu_count() or 2)
        for item, problem, env in self._map(one, range(len(items)), progress, local):
            nbytes += item.size
            if env is not None:
                unreadable.append({"name": item.rel, "error": env})
            elif problem == "unverified":
                unverified += 1
            elif problem == "gone":
                gone += 1
            elif problem == "newer":
                newer += 1  # left in place: not damage (a newer kvcodec reads it)
            elif problem is not None:
                damaged.append({"name": item.rel, "error": problem})
                if quarantine and self.backend.quarantine(item.rel) is not None:
                    moved += 1
        secs = time.perf_counter() - t0
        return {"store": str(self.root), "entries": len(items), "bytes": nbytes,
                "ok": len(items) - len(damaged) - len(unreadable) - gone - newer,
                "gone": gone, "newer_version": newer,
                "damaged": damaged,
                "unreadable": unreadable, "quarantined": moved,
                "keys_unverified": unverified, "seconds": round(secs, 3),
                "mb_per_s": round(nbytes / 1e6 / secs, 1) if secs > 0 else None}

    # -- cleaning --------------------------------------------------------------------
    def gc(self, bad_older_than: float | None = 7 * 86400, max_bytes: int | None = None,
           ttl: float | None = None, low_water: float = 0.9, dry_run: bool = False) -> dict:
        """Remove what a store no longer needs: writers' stale temp files (local),
        ``.bad`` files older than ``bad_older_than`` seconds, and with ``max_bytes`` /
        ``ttl`` an eviction pass (:func:`.capacity.evict`)."""
        temps = 0 if dry_run else self.backend.sweep()
        now, bad, bad_bytes = time.time(), [], 0
        if bad_older_than is not None:
            for rel, size, mtime in list(self.backend.scan()):
                if capacity.BAD_NAME.fullmatch(rel) and mtime < now - bad_older_than:
                    if dry_run or self.backend.remove(rel, size):
                        bad.append(rel)
                        bad_bytes += size
        report = {"store": str(self.root), "dry_run": dry_run, "temp_files": temps,
                  "bad_removed": len(bad), "bad_bytes": bad_bytes}
        policy = capacity.Policy(max_bytes, ttl, low_water)
        if policy.active:
            report["eviction"] = capacity.evict(self.backend, policy, None, dry_run).to_dict()
        return report

    def rm_documents(self, ids, dry_run: bool = False) -> dict:
        """Remove the documents ``ids`` (their ids in a ``kvcodec precompute`` corpus):
        every entry their manifest records list, and the records, so that a rerun of the
        job stores them again. Records written before they listed their entries are
        counted (``unlisted``) and left."""
        ids = {str(i) for i in ids}
        found, unlisted, removed, nbytes = set(), 0, 0, 0
        sizes = {rel: size for rel, size, _ in self.backend.scan()}
        for rel in [r for r in sizes if r.startswith("manifest/") and r.endswith(".json")]:
            if sizes[rel] > MAX_RECORD_BYTES:
                continue
            try:
                record = loads_json(self.backend.read(rel))
            except (ValueError, FileNotFoundError):
                continue
            if not isinstance(record, dict) or str(record.get("id")) not in ids:
                continue
            found.add(str(record.get("id")))
            names = record.get("entries")
            if not isinstance(names, list):
                unlisted += 1
                continue
            for name in names:
                if not (isinstance(name, str) and keying.ENTRY_NAME.fullmatch(name)
                        and name in sizes):
                    continue
                if dry_run or self.backend.remove(name, sizes[name]):
                    removed += 1
                    nbytes += sizes.pop(name)
            if not dry_run:
                self.backend.remove(rel)
        return {"store": str(self.root), "dry_run": dry_run, "documents": len(found),
                "not_found": sorted(ids - found), "unlisted": unlisted,
                "removed": removed, "bytes": nbytes}

    def rm(self, infos: list, dry_run: bool = False) -> dict:
        """Remove the entries ``infos`` (from :meth:`select`)."""
        removed, nbytes = 0, 0
        for i in infos:
            if dry_run or self.backend.remove(i.name, i.bytes):
                removed += 1
                nbytes += i.bytes
        return {"store": str(self.root), "dry_run": dry_run, "removed": removed,
                "bytes": nbytes}


__all__ = ["StoreAdmin", "EntryInfo", "model_label"]
