"""A content-addressed store of cached chunks with prefix reuse (as vLLM and LMCache do).

Each ``chunk_tokens``-token chunk of a sequence is one small .kvc file, named by a
chained hash: ``h_i = sha256(h_{i-1} || token ids of chunk i)``, with ``h_{-1}`` derived
from the model fingerprint and the codec config. A chunk's KV depends on every token
before it, and so does its name, so a new prompt reuses exactly the longest cached
prefix of whole chunks and prefills only the rest.

Writes are atomic (temp file + fsync + rename), so concurrent writers of the same chunk
race harmlessly (same bytes) and readers never see a partial file. Each chunk carries
its own probability tables: about 5% over a long file's size, the price of independent
chunks.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import api
from .config import load_config
from .container import atomic_write
from .errors import KVCodecError
from .model import KVCache, check_fingerprint


class Store:
    """A local directory of chunks.

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
        self.config = load_config(config)
        self.chunk_tokens = self.config.get("chunk_tokens", 256)
        seed = json.dumps([fingerprint, self.config], sort_keys=True).encode()
        self._seed = hashlib.sha256(b"kvcodec-store-v1" + seed).digest()

    def keys(self, token_ids) -> list:
        """Chained hash of every chunk of ``token_ids`` (the last may be partial)."""
        out, h = [], self._seed
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
        if kv.token_ids is None:
            raise KVCodecError("the store keys chunks by token ids; this cache has none")
        if kv.model is not None:
            check_fingerprint(kv.model, self.fingerprint)
        written = 0
        for i, key in enumerate(self.keys(kv.token_ids)):
            path = self.path(key)
            if path.exists():
                continue
            t0, t1 = i * self.chunk_tokens, min(kv.num_tokens, (i + 1) * self.chunk_tokens)
            part = kv.slice(t0, t1)
            part.model = self.fingerprint
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, api.encode(part, config=self.config, position_offset=t0))
            written += 1
        return written

    def lookup(self, token_ids) -> list:
        """Paths of the longest cached prefix of whole chunks of ``token_ids``."""
        found = []
        ids = list(token_ids)
        for i, key in enumerate(self.keys(ids)):
            full = (i + 1) * self.chunk_tokens <= len(ids)
            path = self.path(key)
            if not full or not path.exists():
                break
            found.append(path)
        return found

    def load_prefix(self, token_ids, dtype=None) -> KVCache | None:
        """Decode the longest cached prefix of ``token_ids``, or None if nothing is cached."""
        paths = self.lookup(token_ids)
        if not paths:
            return None
        parts = []
        for p in paths:
            with api.open(p) as f:
                check_fingerprint(f.model, self.fingerprint)
                parts.append(f.decode(dtype=dtype))
        n = len(parts[0].keys)
        return KVCache([torch.cat([p.keys[l] for p in parts], dim=2) for l in range(n)],
                       [torch.cat([p.values[l] for p in parts], dim=2) for l in range(n)],
                       [t for p in parts for t in p.token_ids], self.fingerprint)


@torch.no_grad()
def prefill_with_store(lm, store: Store, token_ids):
    """A DynamicCache for ``token_ids``: the cached prefix from ``store``, the rest
    prefilled by the model. Returns ``(cache, cached_tokens, last_logits)``."""
    ids = list(token_ids)
    # Keep at least one token to run, so the caller gets the next-token logits.
    prefix = store.load_prefix(ids[:-1], dtype=next(lm.model.parameters()).dtype)
    n = 0 if prefix is None else prefix.num_tokens
    from transformers import DynamicCache

    cache = prefix.to_dynamic_cache(lm.config) if prefix else DynamicCache(config=lm.config)
    out = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True)
    return cache, n, out.logits[0, -1]
