"""A content-addressed store of cached chunks with prefix reuse (as vLLM and LMCache do).

Each ``chunk_tokens``-token chunk of a sequence is one small .kvc entry, named by a
chained hash: ``h_i = sha256(h_{i-1} || token ids of chunk i)``, with ``h_{-1}`` derived
from the model fingerprint and the codec config. A chunk's KV depends on every token
before it, and so does its name, so a new prompt reuses exactly the longest cached
prefix of whole chunks and prefills only the rest.

Documents are stored a second way, for blending (:mod:`kvcodec.blend`): a document
captured behind a fixed anchor (``capture_kv(..., anchor=...)``) is position-independent,
so its chunks are keyed by the document's own tokens (a chain seeded with the anchor,
not with a prompt prefix) and reused wherever the document appears in a prompt. An
evicted cache (:mod:`kvcodec.evict`) is stored whole (:meth:`ChunkStore.put_evicted`,
:mod:`.whole`).

The store is a local directory or any fsspec URL (``s3://bucket/prefix``, ``gs://...``,
``memory://...``; :mod:`.backends`). Entry ``key`` lives at ``key[:2]/key[2:].kvc``
under the root; other objects (a job's manifest, :meth:`write_object`) live under other
folders. Writes are atomic: on a local disk a temp file, fsync and rename; on an object
store a single PUT, which the store makes visible whole; on other filesystems (sftp,
hdfs) a temp name and a rename. So concurrent writers of the same chunk race harmlessly
(same bytes) and readers never see a partial entry. Locations are :class:`Path` objects
for a local store and URLs otherwise. Entries are coded with the store's shared
probability tables where they fit (:mod:`.shared`), so a reader builds them once; a
config's codebook (``klt`` streams) is kept beside them (:meth:`keep_codebooks`).

A store is a cache, so a damaged entry (bad checksum, truncated, or holding other tokens
than its name says) is never an error for a reader: it is moved aside to ``*.kvc.bad``
with a warning on the ``kvcodec`` logger, the reused prefix ends before it, and the next
``put`` of that text writes it again. Only proven damage moves an entry: a failure of the
environment (a permission, too many open files, an I/O or network error) or a newer
format version leaves it where it is, with a warning, and the read is a miss. And only
the bytes that failed move: an entry a writer has put in their place since stays.

``salt`` separates tenants (vLLM's ``cache_salt``): stores of different salts share no
key, so a tenant's prompts can neither hit nor time another's entries.
"""
from __future__ import annotations

import logging
import time

import torch

from .. import format as kvc
from ..core.config import load_config
from ..core.kvcache import KVCache, check_token_ids
from ..errors import KVCodecError, ShapeError
from ..models.fingerprint import check_fingerprint
from . import keys as keying
from .backends import STALE_TEMP_S, open_backend
from .batch import Entry, decode_entries, fill, leading
from .capacity import StoreCapacity
from .checks import check_entry, entry_limit, is_damage
from .metrics import StoreMetrics
from .objects import StoreObjects
from .shared import StoreTables
from .tails import Prefix, StoreTails
from .whole import StoreEvicted

log = logging.getLogger("kvcodec")


class ChunkStore(StoreObjects, StoreCapacity, StoreTails, StoreEvicted):
    """A store of chunks (a directory or fsspec URL): keys, atomic puts, lookups and
    checked reads, which every consumer shares (transformers loading in
    :func:`kvcodec.integrations.hf.cache_from_store`, the vLLM connector, precompute jobs).

    Parameters
    ----------
    root : path or str
        Directory (created if missing), or an fsspec URL (``s3://bucket/prefix``).
    fingerprint : dict
        The model's fingerprint; part of every key, so models never share entries.
    config : str or dict
        Codec config used for new chunks (part of every key).
    storage_options : dict, optional
        Options for a URL's filesystem, on top of fsspec's config and the environment.
    salt : str, optional
        A tenant's secret (vLLM's ``cache_salt``), part of every key: stores of different
        salts share no entry. None (the default) gives the unsalted keys.
    max_bytes, ttl : optional
        Capacity (bytes) and age limit (seconds unread), kept by least-recently-used
        eviction after puts (:mod:`.capacity`); None: unbounded.

    Attributes
    ----------
    encoder : kvcodec.format.Encoder
        Codes new entries (configured once for this store's model and config).
    threads : int
        Coder threads for new entries (0 = all cores; the encoder's).
    written_chunks, written_bytes, written_numel : int
        Entries written by this object, their bytes, and their caches' elements
        (:meth:`KVCache.numel`; an evicted cache's before eviction).
    metrics : StoreMetrics
        What this object's users did: lookups, hits, loads, failures, writes, evictions."""

    def __init__(self, root, fingerprint: dict, config="default", storage_options=None,
                 salt: str | None = None, max_bytes: int | None = None,
                 ttl: float | None = None):
        self._backend = open_backend(root, storage_options)
        self.root = self._backend.root
        self.fingerprint = fingerprint
        self._books_kept: set = set()  # codebooks this object has seen in the store
        self.encoder = kvc.Encoder(self.store_config(config, fingerprint), fingerprint)
        self.config = self.encoder.config
        self.chunk_tokens = self.config.get("chunk_tokens", 256)
        self.salt = salt
        self._base = keying.base_seed(fingerprint, self.config)
        self._seed = keying.salted(self._base, salt)
        self.written_chunks = self.written_bytes = self.written_numel = 0
        self._tables = StoreTables()  # shared with the salted views (with_salt)
        self._encoders: dict = {}     # other configs' encoders (exact), shared likewise
        self.metrics = StoreMetrics()
        self._init_capacity(max_bytes, ttl)

    def with_salt(self, salt: str | None) -> "ChunkStore":
        """This store as tenant ``salt`` sees it: the same place, model and coder, other keys."""
        return self if salt == self.salt else self._view(salt, self.encoder)

    def exact(self) -> "ChunkStore":
        """This store's lossless view: the same place, model and salt, entries coded with
        the ``lossless`` config under keys of their own (the vLLM connector keeps the text
        before a blend's documents there: the attention sinks every blend loads)."""
        if self.config.get("name") == "lossless":
            return self
        enc = self._encoders.get("lossless")  # built once per store, shared by its views
        if enc is None:
            enc = self._encoders.setdefault("lossless", kvc.Encoder(
                load_config("lossless", model=self.fingerprint), self.fingerprint))
        return self._view(self.salt, enc)

    def _view(self, salt, encoder) -> "ChunkStore":
        other = object.__new__(ChunkStore)
        other.__dict__.update(self.__dict__)
        other.salt, other.encoder, other.config = salt, encoder, encoder.config
        other._base = keying.base_seed(self.fingerprint, encoder.config)
        other._seed = keying.salted(other._base, salt)
        return other

    @property
    def threads(self) -> int:
        return self.encoder.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self.encoder.threads = n

    def keys(self, token_ids, anchor=None) -> list:
        """Chained hash of every chunk of ``token_ids`` (the last may be partial); with
        ``anchor``, the keys of a position-independent document computed behind it."""
        return keying.chain(self._seed, token_ids, self.chunk_tokens, anchor)

    def path(self, key: str):
        """The location of entry ``key``: a :class:`Path` in a local store, else a URL."""
        return self._backend.location(keying.entry_name(key))

    def exists(self, loc) -> bool:
        """Whether the entry (or object) at location ``loc`` exists."""
        return self._backend.exists(self._backend.rel(loc))

    def size(self, loc) -> int:
        """Bytes of the entry at ``loc`` (FileNotFoundError if it is absent)."""
        return self._backend.size(self._backend.rel(loc))

    def entries(self):
        """Locations of every entry in the store (not ``*.kvc.bad``, nor other objects)."""
        for rel in self._backend.list():
            if keying.ENTRY_NAME.fullmatch(rel):
                yield self._backend.location(rel)

    def sweep(self, older_than: float = STALE_TEMP_S) -> int:
        """Remove what writers killed mid-write left in a local store (temp files older
        than ``older_than`` seconds; never visible as entries). Object stores have none:
        their writes are single PUTs. Returns how many were removed."""
        return self._backend.sweep(older_than)

    def put(self, kv: KVCache, *, from_token: int = 0, prefix=None) -> int:
        """Store every chunk of ``kv`` not yet present; returns how many were written.
        ``from_token``: only chunks from it on (a multiple of ``chunk_tokens``); ``kv``'s
        K/V before it are never read. ``prefix``: the token ids before ``kv``'s, where
        ``kv`` holds only a sequence's last tokens (the vLLM worker copies only what the
        store lacks; ``len(prefix)`` a multiple of ``chunk_tokens``)."""
        if kv.anchor:
            raise KVCodecError("this cache was captured behind an anchor, not as a prompt "
                               "prefix; store it with put_document")
        prefix = list(prefix or ())
        if from_token % self.chunk_tokens or len(prefix) % self.chunk_tokens or from_token < 0:
            raise ShapeError(f"from_token, len(prefix): multiples of {self.chunk_tokens}")
        return self._put(kv, None, max(from_token, len(prefix)), prefix)

    def put_document(self, kv: KVCache) -> int:
        """Store a position-independent document (a cache captured behind an anchor,
        ``kv.anchor``) under keys of its own tokens; returns how many chunks were written."""
        anchor = kv.anchor
        if not anchor:
            raise KVCodecError("put_document needs a cache captured behind an anchor "
                               "(capture_kv(..., anchor=...)); use put for prompt prefixes")
        return self._put(kv, [int(t) for t in anchor])

    def _check(self, kv: KVCache) -> None:
        if kv.token_ids is None:
            raise KVCodecError("the store keys entries by token ids; this cache has none")
        if kv.model is not None:
            check_fingerprint(kv.model, self.fingerprint)

    def _put(self, kv: KVCache, anchor, from_token: int = 0, prefix=()) -> int:
        if kv.evicted:
            raise ShapeError("this cache is evicted (each head keeps its own tokens), so it "
                             "has no dense chunks to store; store it whole with "
                             "put_evicted(kv, spec)")
        self._check(kv)
        if not kv.uniform:
            raise KVCodecError(
                "the store keeps every layer's tokens chunk by chunk, but this cache's "
                "sliding-window layers hold only their last tokens; capture it with "
                "capture_kv(..., every_token=True) (or encode it into one .kvc file)")
        written, base, tables, skip = 0, len(anchor or ()), None, len(prefix)
        keys, end = self.keys([*prefix, *kv.token_ids], anchor), skip + kv.num_tokens
        self._mark_tail(keys, end, from_token, anchor)  # first: see _mark_tail
        for i, key in enumerate(keys):
            rel = keying.entry_name(key)
            t0, t1 = i * self.chunk_tokens, min(end, (i + 1) * self.chunk_tokens)
            if t0 < from_token or self._backend.exists(rel):
                continue
            if tables is None:
                tables = self._tables.current(self, kv.slice(from_token - skip, end - skip),
                                              base + from_token) or False
            self._write(rel, kv.slice(t0 - skip, t1 - skip), anchor, base + t0, tables or None)
            written += 1
        return written

    def _write(self, rel: str, kv: KVCache, anchor, position_offset, tables=None) -> None:
        t = time.perf_counter()
        self.keep_codebooks()
        data = self.encoder.encode(kv, anchor=anchor, position_offset=position_offset,
                                   tables=tables)
        self._backend.write(rel, data)
        self.metrics.written(len(data), time.perf_counter() - t)
        self.written_chunks += 1
        self.written_bytes += len(data)
        self.written_numel += kv.numel()
        self._wrote(len(data))

    def document(self, token_ids, anchor) -> list | None:
        """Locations of every chunk of the document ``token_ids`` stored by
        :meth:`put_document` behind ``anchor``, or None unless all are present."""
        rels = [keying.entry_name(k) for k in self.keys(token_ids, anchor)]
        if not rels or not all(self._present(r) for r in rels):
            return None
        return [self._backend.location(r) for r in rels]

    def lookup(self, token_ids, *, partial: bool = False, hold: int | None = None) -> Prefix:
        """Locations of the longest cached prefix of whole chunks of ``token_ids`` (a
        list; ``.tokens``: the tokens they hold), in parallel on an object store; with
        ``partial``, also a last, partial chunk stored for exactly the remaining tokens
        (``put`` of the same sequence stores it) or else the longest partial chunk stored
        there that ``token_ids`` continue (a document's end, then a question: :mod:`.tails`).
        ``hold``: a load in this process follows from that token on, so an object store's
        entries from there are asked with GETs whose bytes it takes (:mod:`.held`)."""
        keys = self.keys(ids := check_token_ids(token_ids))
        rels = [keying.entry_name(key) for i, key in enumerate(keys)
                if partial or (i + 1) * self.chunk_tokens <= len(ids)]
        held = hold is not None and hasattr(self._backend, "hold")
        first = hold // self.chunk_tokens if held else len(rels)
        n = leading(lambda i: self._present(rels[i], i >= first), range(len(rels)),
                    self.remote)
        found = self._with_tail(ids, keys, [self._backend.location(r) for r in rels[:n]],
                                partial)
        self.metrics.lookup(len(ids), found.tokens)
        return found

    def _present(self, rel: str, hold: bool = False) -> bool:
        """Whether entry ``rel`` exists (``hold``: its bytes kept, :meth:`lookup`); where
        the store cannot say (no network, a permission), a cache miss, logged."""
        try:
            if hold:
                return self._backend.hold(rel, self.entry_limit(self.chunk_tokens))
            return self._backend.exists(rel)
        except OSError as exc:
            log.warning("kvcodec store: cannot look up %s (%s); a miss", rel, exc)
            return False

    def cached_tokens(self, token_ids, *, partial: bool = False, hold: int | None = None) -> int:
        """How many leading tokens of ``token_ids`` :meth:`lookup` finds."""
        return self.lookup(token_ids, partial=partial, hold=hold).tokens

    def entry_limit(self, n_tokens: int) -> int:
        """The most bytes an entry of ``n_tokens`` tokens can take (:func:`.entry_limit`)."""
        return entry_limit(self.fingerprint, n_tokens)

    def open_entry(self, loc, token_ids, t0: int, anchor=None) -> "kvc.KVCFile":
        """The entry at ``loc``, checked to be the chunk of ``token_ids`` starting at token
        ``t0`` (of a document behind ``anchor``, if given) made by the store's model.

        The entry's bytes are read whole (no descriptor stays open while it decodes);
        the file's ``identity`` says which bytes they were (:meth:`quarantine`). Raises
        FileNotFoundError if it is absent; any other failure is reported
        (:meth:`quarantine`: damage moves it aside, anything else is logged) and raised:
        :class:`CorruptError` for damage (another model's or other tokens' entry under
        this name included), ``OSError`` for the environment."""
        rel = self._backend.rel(loc)
        ids = check_token_ids(token_ids)
        identity, t = None, time.perf_counter()
        try:
            self.load_codebooks()  # CodebookError: not here, and not the entry's damage
            data, identity = self._backend.fetch(rel, self.entry_limit(len(ids)))
            f = kvc.open(data, tables=self.shared_tables, name=str(loc))
            f.identity = identity
        except FileNotFoundError:
            self.metrics.failed("missing")
            raise
        except Exception as exc:
            self.quarantine(loc, exc, identity)
            raise
        try:
            check_entry(f, loc, ids, t0, anchor, self.fingerprint)
            self.metrics.opened(len(data), time.perf_counter() - t)
            self._read(rel)
            return f
        except BaseException as exc:
            f.close()
            self.quarantine(loc, exc, identity)
            raise

    def quarantine(self, loc, exc: BaseException, identity=None) -> bool:
        """Report a failed read of the entry at ``loc``. If ``exc`` proves the bytes
        damaged (:func:`is_damage`), move them aside (``*.kvc.bad``) so the next ``put``
        writes the entry again, unless a writer has replaced them since they were read
        (``identity``, a file's ``.identity``; None moves whatever is there). Any other
        failure (the environment's) leaves the entry and is logged. Returns whether the
        entry was moved."""
        name = str(loc).rsplit("/", 1)[-1]
        self.metrics.failed("damaged" if is_damage(exc) else "environment")
        if not is_damage(exc):
            log.warning("kvcodec store: cannot read %s (%s: %s); left in place", name,
                        type(exc).__name__, exc)
            return False
        bad = self._backend.quarantine(self._backend.rel(loc), identity)
        if bad is None:
            log.warning("kvcodec store: %s; not moved (gone, or replaced since it was read)",
                        exc)
            return False
        log.warning("kvcodec store: %s; moved it to %s, the prefix ends before it", exc,
                    bad.rsplit("/", 1)[-1])
        return True

    def read_chunk(self, loc, token_ids, t0: int, dst: dict, threads: int = 0) -> bool:
        """Decode the entry at ``loc`` (the chunk of ``token_ids`` starting at token ``t0``)
        into ``dst`` (``{layer: (keys, values)}`` float views ``[1, kv_heads, n, head_dim]``).

        Returns False if it could not be read: absent, damaged or not that chunk (moved
        aside), or unreadable for the environment (left in place); see :meth:`quarantine`."""
        try:
            f = self.open_entry(loc, token_ids, t0)
        except (KVCodecError, OSError):
            return False  # reported by open_entry
        with f:
            return decode_entries(self, [Entry(f, loc, dst)], threads)[0]

    def fill(self, bufs, token_ids, locs, threads: int = 0) -> int:
        """Decode the entries ``locs`` (consecutive chunks of ``token_ids`` from token 0)
        into per-layer ``(keys, values)`` buffers, up to the first that is missing or
        damaged; returns the number of tokens filled. Fetched (in parallel from an
        object store) and decoded as one plan in one native call (:func:`.batch.fill`)."""
        return fill(self, bufs, token_ids, locs, threads)

    def load_prefix(self, token_ids, dtype=None) -> KVCache | None:
        """The longest cached prefix of ``token_ids`` decoded as a :class:`KVCache`
        (tensors only), or None if nothing is cached or its first chunk is damaged."""
        ids = check_token_ids(token_ids)
        locs = self.lookup(ids, hold=0)
        if not locs:
            return None
        fp = self.fingerprint
        shape = (1, fp["num_kv_heads"], len(locs) * self.chunk_tokens, fp["head_dim"])
        dtype = dtype or torch.float32
        bufs = [(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
                for _ in range(fp["num_layers"])]
        n = self.fill(bufs, ids, locs)
        if n == 0:
            return None
        return KVCache([k[:, :, :n] for k, _ in bufs], [v[:, :, :n] for _, v in bufs], ids[:n],
                       self.fingerprint)
