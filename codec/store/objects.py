"""What a store holds besides entries: named objects (a job's manifest, the shared
tables), written atomically like entries, in folders of their own (entries own the
two-hex folders), and where a :class:`~kvcodec.store.ChunkStore` keeps its shared
tables."""
from __future__ import annotations

import logging
from pathlib import PurePosixPath

from ..errors import ConfigError
from . import keys as keying

log = logging.getLogger("kvcodec")


class StoreObjects:
    """A store's objects (mixed into :class:`~kvcodec.store.ChunkStore`, whose
    ``_backend``, ``_seed`` and ``_tables`` they use)."""

    @staticmethod
    def _object(rel: str) -> str:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not p.parts or keying.ENTRY_NAME.fullmatch(rel):
            raise ConfigError(f"{rel!r} is not a store object name (a relative path outside "
                              "the entries' folders)")
        return p.as_posix()

    @property
    def remote(self) -> bool:
        """Whether reads wait on a network (an object store), not a local disk."""
        return self._backend.remote

    @property
    def seed_hex(self) -> str:
        """This store's (salted) key seed, which names its shared tables' folder."""
        return self._seed.hex()

    def shared_tables(self, digest: str):
        """The shared tables of ``digest`` that entries of this store were coded with
        (:mod:`.shared`); CorruptError if they are gone or damaged."""
        return self._tables.get(self, digest)

    def quarantine_object(self, rel: str) -> None:
        """Move the damaged object ``rel`` aside (``*.bad``)."""
        if self._backend.quarantine(self._object(rel)) is not None:
            log.warning("kvcodec store: %s is damaged; moved it aside", rel)

    def write_object(self, rel: str, data: bytes) -> None:
        """Write the object ``rel`` (``"manifest/job/x.json"``) atomically (its bytes
        count toward the store's capacity)."""
        self._backend.write(self._object(rel), data)
        self._wrote(len(data))

    def read_object(self, rel: str) -> bytes | None:
        """The bytes of the object ``rel``, or None if it is absent."""
        try:
            return self._backend.read(self._object(rel))
        except FileNotFoundError:
            return None

    def exists_object(self, rel: str) -> bool:
        return self._backend.exists(self._object(rel))
