"""A store's shared probability tables (:mod:`kvcodec.format.shared`): measured on the
first document a store of a model, config and tenant keeps, and used by every entry
they fit, which then carries no tables of its own (format v6) and decodes without
building any: a reader builds them once per digest, not once per entry.

Objects under ``tables/<seed>/`` (``seed``: the store's key seed, so tenants and configs
never share): ``<digest>.kvt``, the tables (content-addressed, never replaced), and
``current``, the digest new entries use. Writers racing to create them each write their
own tables and the last ``current`` wins; every entry stays readable, since each names
the tables it was coded with.

Like the entries, these objects are a cache. ``current`` absent, damaged or naming
missing tables: new tables are built and written. Tables that an entry names but that
are gone or damaged make that entry damaged (moved aside and written again by the next
``put``); damaged tables are moved aside too. A failure of the environment is never
damage: a put codes its entries with their own tables, a read is a miss."""
from __future__ import annotations

import logging
import threading

from ..errors import CorruptError
from ..format.shared import DIGEST, SharedTables, max_bytes

log = logging.getLogger("kvcodec")


class StoreTables:
    """The shared tables a store (and its salted views, each under its own seed) has
    loaded or built: by digest, and the current ones by folder."""

    def __init__(self):
        self._by_digest: dict = {}
        self._current: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def folder(store) -> str:
        return f"tables/{store.seed_hex[:40]}"

    def current(self, store, kv, position_offset: int = 0) -> SharedTables | None:
        """The tables new entries of ``store`` are coded with: read once, or built from
        ``kv`` (the document being stored, its first token at ``position_offset``) and
        written; None when the store cannot be read or written now."""
        folder = self.folder(store)
        got = self._current.get(folder)
        if got is not None:
            return got
        with self._lock:
            got = self._current.get(folder)
            if got is None:
                got = self._load_current(store, folder, kv, position_offset)
                if got is not None:
                    self._current[folder] = got
        return got

    def _load_current(self, store, folder: str, kv,
                      position_offset: int) -> SharedTables | None:
        try:  # a digest (its writer adds nothing), read within a bound
            name = store.read_object(f"{folder}/current", 1 << 10)
            if name is not None:
                return self.get(store, name.decode("ascii", "replace").strip())
        except CorruptError as exc:
            log.warning("kvcodec store: %s; building new shared tables", exc)
        except OSError as exc:
            log.warning("kvcodec store: cannot read its shared tables (%s); coding with "
                        "own tables", exc)
            return None
        tables = store.encoder.shared_tables(kv, position_offset=position_offset,
                                             chunk=store.chunk_tokens)
        try:
            store.write_object(f"{folder}/{tables.digest}.kvt", tables.data)
            store.write_object(f"{folder}/current", tables.digest.encode())
        except OSError as exc:
            log.warning("kvcodec store: cannot write shared tables (%s); coding with own "
                        "tables", exc)
            return None
        self._by_digest[tables.digest] = tables
        return tables

    def get(self, store, name: str) -> SharedTables:
        """The tables of digest ``name`` (what an entry records), checked: CorruptError
        if they are gone or damaged (damaged ones are moved aside), OSError if the store
        cannot be read now."""
        got = self._by_digest.get(name)
        if got is not None:
            return got
        if not DIGEST.fullmatch(name):
            raise CorruptError(f"shared tables {name[:50]!r} is not a digest")
        rel = f"{self.folder(store)}/{name}.kvt"
        fp = store.fingerprint
        try:
            data = store.read_object(rel, max_bytes(fp))
            tables = None if data is None else SharedTables.stored(data, name, fp, rel)
        except CorruptError:
            store.quarantine_object(rel)
            raise
        if tables is None:
            raise CorruptError(f"its store's shared tables {name[:12]}... are gone")
        self._by_digest[name] = tables
        return tables
