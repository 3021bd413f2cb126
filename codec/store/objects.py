"""What a store holds besides entries: named objects (a job's manifest, the shared
tables, the codebook of a ``klt`` config, a ``klt`` fitted on a first cache), written
atomically like entries, in folders of their own (entries own the two-hex folders), and
where a :class:`~kvcodec.store.ChunkStore` keeps its shared tables and codebooks."""
from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath

from ..core import codebook
from ..core.config import calibrated_config_path, load_config, model_key
from ..core.paths import loads_json
from ..errors import CodebookError, ConfigError, CorruptError
from ..format.container import untrusted
from ..format.encoder import codebooks
from ..format.spec import MAX_CONFIG_BYTES
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

    def read_object(self, rel: str, limit: int = codebook.MAX_BYTES) -> bytes | None:
        """The bytes of the object ``rel``, or None if it is absent; a
        :class:`CorruptError` if it has more than ``limit`` bytes (what an object of its
        kind can hold; by default, what the largest kind can), found before they are
        read: a damaged or crafted object is never read whole."""
        try:
            return self._backend.fetch(self._object(rel), limit)[0]
        except FileNotFoundError:
            return None
        except CorruptError:
            raise CorruptError(f"{rel}: larger than the {limit} bytes an object of its kind "
                               "can be") from None

    def exists_object(self, rel: str) -> bool:
        return self._backend.exists(self._object(rel))

    def keep_codebooks(self) -> None:
        """Put the codebook the store's config names (``klt`` streams) into the store,
        once (``codebooks/<digest>.kvcb``), so that readers elsewhere find it; a store
        that cannot be written now only logs it (the entry's own readers may have it)."""
        for name in codebooks(self.config):
            if name in self._books_kept:
                continue
            rel = f"codebooks/{name}{codebook.SUFFIX}"
            try:
                if not self.exists_object(rel):
                    self.write_object(rel, codebook.get(name).to_bytes())
                self._books_kept.add(name)
            except OSError as exc:
                log.warning("kvcodec store: cannot write its codebook %s (%s)", rel, exc)

    def load_codebooks(self, config: dict | None = None) -> None:
        """Make the codebook the store's config (or ``config``) names available to this
        process: from here (:func:`kvcodec.core.codebook.get`), else from the store.
        Neither: a :class:`CodebookError` (the entries are not damaged: they stay); a
        damaged one in the store is moved aside (the next ``put`` writes it again)."""
        for name in codebooks(self.config if config is None else config):
            try:
                codebook.get(name)
                continue
            except CodebookError:
                pass
            rel = f"codebooks/{name}{codebook.SUFFIX}"
            fp = self.fingerprint
            try:  # bases [2 * layers, heads, head_dim, head_dim] (kvcodec.core.fit)
                data = self.read_object(rel, codebook.max_bytes(
                    2 * fp["num_layers"], fp["num_kv_heads"], fp["head_dim"]))
                if data is not None:
                    codebook.register_bytes(data, name, rel)
            except CorruptError as exc:
                self.quarantine_object(rel)
                self._books_kept.discard(name)
                raise CodebookError(f"the store's codebook is damaged: {exc}") from None
            if data is None:
                raise CodebookError(f"codebook {name[:16]}..., which this store's config "
                                    f"names, is neither here nor in the store ({rel})")

    def store_config(self, config, fingerprint: dict) -> dict:
        """``load_config(config, model=fingerprint)``, except ``"klt"`` for a model that
        no ``klt`` calibration exists for: the ``klt`` fitted on a first cache
        (:mod:`kvcodec.core.fit`) that this store keeps (``configs/klt-<model
        key>.json``), so that every machine sharing the store codes and keys alike; else
        the one this machine keeps, put into the store (with its codebook) for the
        others, and then whichever the store holds (another machine's, where two put
        theirs at once); else a :class:`ConfigError`. A kept fit that is damaged is
        moved aside."""
        key = model_key(fingerprint)
        if not (isinstance(config, str) and config == "klt" and key):
            return load_config(config, model=fingerprint)
        path = calibrated_config_path(fingerprint, "klt")
        local = load_config(path) if path is not None else None
        if local is not None and not local.get("fitted"):
            return local  # a calibration of the model wins over any fit
        rel = f"configs/klt-{key}.json"
        kept = self._kept_fit(rel, key)
        if kept is not None:
            return kept
        if local is None:
            return load_config("klt", model=fingerprint)  # the ConfigError that says how
        try:
            for name in codebooks(local):
                self._backend.write(f"codebooks/{name}{codebook.SUFFIX}",
                                    codebook.get(name).to_bytes())
            self._backend.write(rel, json.dumps(local, indent=1).encode())
        except OSError as exc:  # a cache: coded with it here all the same
            log.warning("kvcodec store: cannot keep the klt fit %s (%s)", rel, exc)
            return local
        return self._kept_fit(rel, key) or local  # the last writer's, if not this one

    def _kept_fit(self, rel: str, key: str) -> dict | None:
        """The fit the store keeps as ``rel`` (its codebook loaded where the store has
        it), or None where it has none; a damaged one is moved aside (None)."""
        try:  # read within bounds: a larger object is damage, not read whole
            data = self._backend.fetch(self._object(rel), MAX_CONFIG_BYTES)[0]
        except FileNotFoundError:
            return None
        except CorruptError:
            data = b""  # over the bound: moved aside below
        try:
            with untrusted(rel):
                cfg = load_config(loads_json(data), copy_dict=False)
                if cfg.get("model_key") != key or not cfg.get("fitted"):
                    raise CorruptError(f"{rel}: not a klt fitted for model {key}")
        except (CorruptError, ConfigError):
            self.quarantine_object(rel)
            return None
        try:
            self.load_codebooks(cfg)
        except CodebookError as exc:  # its entries' readers say so again
            log.warning("kvcodec store: %s", exc)
        return cfg
