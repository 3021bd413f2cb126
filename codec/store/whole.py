"""Evicted caches in a store: each stored whole, as one entry (:mod:`kvcodec.evict`: every
head keeps its own tokens, so a cache has no dense chunks to share), keyed by its tokens,
its anchor and the eviction spec that made it."""
from __future__ import annotations

from ..core.kvcache import KVCache
from . import keys as keying


class StoreEvicted:
    """The evicted entries of a :class:`~.chunks.ChunkStore` (a mixin: its seed, backend,
    checks, writes and lookups)."""

    def evicted_key(self, token_ids, spec: str, anchor=None) -> str:
        """The key of the whole evicted cache of ``token_ids`` (behind ``anchor``, if
        given) evicted by ``spec`` (``"snapkv:0.25"``)."""
        return keying.evicted_key(self._seed, token_ids, spec, anchor)

    def put_evicted(self, kv: KVCache, spec: str) -> int:
        """Store ``kv``, the cache evicted by ``spec`` (``"snapkv:0.25"``), whole as one
        entry (keyed by :meth:`evicted_key` of its tokens and ``kv.anchor``);
        returns 1 if written, 0 if it was already there. A dense cache is stored the same
        way: a kept ratio of 1 evicts nothing."""
        self._check(kv)
        anchor = [int(t) for t in kv.anchor] if kv.anchor else None
        rel = keying.entry_name(self.evicted_key(kv.token_ids, spec, anchor))
        if self._backend.exists(rel):
            return 0
        self._write(rel, kv, anchor, None)
        return 1

    def evicted(self, token_ids, spec: str, anchor=None):
        """The location of the entry :meth:`put_evicted` stored for ``token_ids`` evicted
        by ``spec`` (behind ``anchor``), or None. Read it with :meth:`open_entry` (``t0``
        0) and decode it with ``KVCFile.decode``."""
        rel = keying.entry_name(self.evicted_key(token_ids, spec, anchor))
        return self._backend.location(rel) if self._present(rel) else None
