"""A content-addressed store of cached chunks with prefix reuse (as vLLM and LMCache do).

Each ``chunk_tokens``-token chunk of a sequence is one small .kvc file, named by a
chained hash: ``h_i = sha256(h_{i-1} || token ids of chunk i)``, with ``h_{-1}`` derived
from the model fingerprint and the codec config. A chunk's KV depends on every token
before it, and so does its name, so a new prompt reuses exactly the longest cached
prefix of whole chunks and prefills only the rest.

Documents are stored a second way, for blending (:mod:`kvcodec.blend`): a document
captured behind a fixed anchor (``capture_kv(..., anchor=...)``) is position-independent,
so its chunks are keyed by the document's own tokens (a chain seeded with the anchor,
not with a prompt prefix) and reused wherever the document appears in a prompt.

Writes are atomic (temp file + fsync + rename), so concurrent writers of the same chunk
race harmlessly (same bytes) and readers never see a partial file. Each chunk carries
its own probability tables: about 5% over a long file's size, the price of independent
chunks.

A store is a cache, so a damaged entry (bad checksum, truncated, or holding other tokens
than its name says) is never an error for a reader: it is moved aside to ``*.kvc.bad``
with a warning on the ``kvcodec`` logger, the reused prefix ends before it, and the next
``put`` of that text writes it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .. import format as kvc
from ..core.config import load_config
from ..core.kvcache import KVCache, token_views
from ..errors import KVCodecError, ShapeError
from ..format.container import atomic_write
from ..models.fingerprint import check_fingerprint

log = logging.getLogger("kvcodec")


class ChunkStore:
    """A local directory of chunks: keys, atomic puts, lookups and checked reads, which
    every consumer shares (transformers loading in :class:`kvcodec.store.Store`, the vLLM
    connector).

    Parameters
    ----------
    root : path
        Directory (created if missing).
    fingerprint : dict
        The model's fingerprint; part of every key, so models never share entries.
    config : str or dict
        Codec config used for new chunks (part of every key).
    """

    def __init__(self, root, fingerprint: dict, config="default"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.config = load_config(config, model=fingerprint)
        self.chunk_tokens = self.config.get("chunk_tokens", 256)
        seed = json.dumps([fingerprint, self.config], sort_keys=True).encode()
        self._seed = hashlib.sha256(b"kvcodec-store-v1" + seed).digest()

    def keys(self, token_ids, anchor=None) -> list:
        """Chained hash of every chunk of ``token_ids`` (the last may be partial); with
        ``anchor``, the keys of a position-independent document computed behind it."""
        out, h = [], self._seed
        if anchor is not None:
            h = hashlib.sha256(b"kvcodec-document-v1" + h + b"".join(
                int(t).to_bytes(4, "little") for t in anchor)).digest()
        ids = [int(t) for t in token_ids]
        for start in range(0, len(ids), self.chunk_tokens):
            part = ids[start:start + self.chunk_tokens]
            h = hashlib.sha256(h + len(part).to_bytes(4, "little") + b"".join(
                t.to_bytes(4, "little") for t in part)).digest()
            out.append(h.hex())
        return out

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key[2:]}.kvc"

    def put(self, kv: KVCache) -> int:
        """Store every chunk of ``kv`` not yet present; returns how many were written."""
        if kv.extra.get("anchor"):
            raise KVCodecError("this cache was captured behind an anchor, not as a prompt "
                               "prefix; store it with put_document")
        return self._put(kv, None)

    def put_document(self, kv: KVCache) -> int:
        """Store a position-independent document (a cache captured behind an anchor,
        which ``kv.extra["anchor"]`` records) under keys of its own tokens; returns how
        many chunks were written."""
        anchor = kv.extra.get("anchor")
        if not anchor:
            raise KVCodecError("put_document needs a cache captured behind an anchor "
                               "(capture_kv(..., anchor=...)); use put for prompt prefixes")
        return self._put(kv, [int(t) for t in anchor])

    def _put(self, kv: KVCache, anchor) -> int:
        if kv.evicted:
            raise ShapeError("this cache is evicted (each head keeps its own tokens), but a "
                             "store holds dense chunks of every token; encode it into one "
                             ".kvc file instead")
        if kv.token_ids is None:
            raise KVCodecError("the store keys chunks by token ids; this cache has none")
        if kv.model is not None:
            check_fingerprint(kv.model, self.fingerprint)
        if not kv.uniform:
            raise KVCodecError(
                "the store keeps every layer's tokens chunk by chunk, but this cache's "
                "sliding-window layers hold only their last tokens; encode it into one "
                ".kvc file instead")
        written, base = 0, len(anchor or ())
        for i, key in enumerate(self.keys(kv.token_ids, anchor)):
            path = self.path(key)
            if path.exists():
                continue
            t0, t1 = i * self.chunk_tokens, min(kv.num_tokens, (i + 1) * self.chunk_tokens)
            part = kv.slice(t0, t1)
            part.model = self.fingerprint
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, kvc.encode(part, config=self.config, anchor=anchor,
                                          position_offset=base + t0))
            written += 1
        return written

    def document(self, token_ids, anchor) -> list | None:
        """Paths of every chunk of the document ``token_ids`` stored by
        :meth:`put_document` behind ``anchor``, or None unless all are present."""
        paths = [self.path(k) for k in self.keys(token_ids, anchor)]
        return paths if paths and all(p.exists() for p in paths) else None

    def lookup(self, token_ids, *, partial: bool = False) -> list:
        """Paths of the longest cached prefix of whole chunks of ``token_ids``; with
        ``partial``, also a last, partial chunk stored for exactly the remaining tokens
        (``put`` of the same sequence stores it: the same prompt sent again)."""
        found = []
        ids = list(token_ids)
        for i, key in enumerate(self.keys(ids)):
            full = (i + 1) * self.chunk_tokens <= len(ids)
            path = self.path(key)
            if not (full or partial) or not path.exists():
                break
            found.append(path)
        return found

    def cached_tokens(self, token_ids, *, partial: bool = False) -> int:
        """How many leading tokens of ``token_ids`` :meth:`lookup` finds."""
        paths = self.lookup(token_ids, partial=partial)
        return min(len(token_ids), len(paths) * self.chunk_tokens)

    def open_entry(self, path: Path, token_ids, t0: int, anchor=None) -> "kvc.KVCFile":
        """The entry at ``path``, checked to be the chunk of ``token_ids`` starting at token
        ``t0`` (of a document behind ``anchor``, if given) made by the store's model
        (KVCodecError, or OSError, if it is not)."""
        f = kvc.open(path)
        try:
            check_fingerprint(f.model, self.fingerprint)
            ids = [int(t) for t in token_ids]
            anchor = None if anchor is None else [int(t) for t in anchor]
            if (f.num_tokens != len(ids) or f.position_offset != len(anchor or ()) + t0
                    or f.anchor != anchor
                    or (f.token_ids is not None and f.token_ids != ids)):
                raise KVCodecError(f"{path} holds other tokens than its key says")
            return f
        except BaseException:
            f.close()
            raise

    @staticmethod
    def quarantine(path: Path, exc: Exception) -> None:
        """Move a damaged entry aside (``*.kvc.bad``) so the next ``put`` writes it again."""
        bad = path.with_name(path.name + ".bad")
        try:
            os.replace(path, bad)
        except OSError:
            pass  # another reader moved it first
        log.warning("kvcodec store: %s; moved it to %s, the prefix ends before it", exc, bad.name)

    def read_chunk(self, path: Path, token_ids, t0: int, dst: dict, threads: int = 0) -> bool:
        """Decode the entry at ``path`` (the chunk of ``token_ids`` starting at token ``t0``)
        into ``dst`` (``{layer: (keys, values)}`` float views ``[1, kv_heads, n, head_dim]``).

        Returns False, after moving the entry aside, if it is damaged or is not that chunk;
        False without touching it if it vanished (another reader moved it)."""
        try:
            with self.open_entry(path, token_ids, t0) as f:
                f.decode_into(dst, threads=threads)
            return True
        except FileNotFoundError:
            return False
        except (KVCodecError, OSError) as exc:
            self.quarantine(path, exc)
            return False

    def fill(self, bufs, token_ids, paths, threads: int = 0) -> int:
        """Decode the entries ``paths`` (consecutive chunks of ``token_ids`` from token 0)
        into per-layer ``(keys, values)`` buffers until one is damaged; returns the number
        of tokens filled."""
        n = 0
        for path in paths:
            t1 = n + self.chunk_tokens
            if not self.read_chunk(path, token_ids[n:t1], n, token_views(bufs, n, t1), threads):
                break
            n = t1
        return n

    def load_prefix(self, token_ids, dtype=None) -> KVCache | None:
        """Decode the longest cached prefix of ``token_ids`` as a :class:`KVCache`
        (tensors only; :meth:`load_cache` fills a model's cache), or None if nothing is
        cached or its first chunk is damaged."""
        ids = [int(t) for t in token_ids]
        paths = self.lookup(ids)
        if not paths:
            return None
        fp = self.fingerprint
        shape = (1, fp["num_kv_heads"], len(paths) * self.chunk_tokens, fp["head_dim"])
        dtype = dtype or torch.float32
        bufs = [(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
                for _ in range(fp["num_layers"])]
        n = self.fill(bufs, ids, paths)
        if n == 0:
            return None
        return KVCache([k[:, :, :n] for k, _ in bufs], [v[:, :, :n] for _, v in bufs], ids[:n],
                       self.fingerprint)
