"""A store's keys: chained hashes of token chunks, seeded with the model fingerprint and
the codec config (and a tenant's salt), and where entry ``key`` lives under the root.

``h_{-1} = sha256("kvcodec-store-v1" || json([fingerprint, config]))``, salted as
``sha256("kvcodec-salt-v1" || h_{-1} || len(salt) || salt)``; chunk ``i`` is
``h_i = sha256(h_{i-1} || len(chunk) || token ids as u32)``. A document behind an anchor
starts its chain at ``sha256("kvcodec-document-v1" || h_{-1} || anchor ids)``. Every
variable-length part is preceded by its length, so no two inputs hash the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct

from ..core.kvcache import check_token_ids

ENTRY_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{62}\.kvc")


def entry_name(key: str) -> str:
    """Where entry ``key`` lives under the root: ``key[:2]/key[2:].kvc``."""
    return f"{key[:2]}/{key[2:]}.kvc"


def ids_bytes(ids) -> bytes:
    """Token ids as little-endian u32 (one struct call); ids that are not integers in
    ``[0, 2**32)`` are a ShapeError (they were int.to_bytes' OverflowError, int()'s
    ValueError, or 1.5 hashed as 1)."""
    ids = list(ids)
    try:
        return struct.pack(f"<{len(ids)}I", *ids)
    except struct.error:
        check_token_ids(ids, len(ids))  # says what is wrong
        raise


def base_seed(fingerprint: dict, config: dict) -> bytes:
    """The unsalted ``h_{-1}`` of a model and a config."""
    seed = json.dumps([fingerprint, config], sort_keys=True).encode()
    return hashlib.sha256(b"kvcodec-store-v1" + seed).digest()


def salted(base: bytes, salt) -> bytes:
    """``h_{-1}`` as the tenant ``salt`` sees it (``base`` itself for None)."""
    if salt is None:
        return base
    salt_b = str(salt).encode()
    return hashlib.sha256(b"kvcodec-salt-v1" + base + len(salt_b).to_bytes(4, "little")
                          + salt_b).digest()


def chain(seed: bytes, token_ids, chunk_tokens: int, anchor=None) -> list:
    """The key of every ``chunk_tokens``-token chunk of ``token_ids`` (the last may be
    partial), behind ``anchor`` if given."""
    out, h = [], seed
    if anchor is not None:
        h = hashlib.sha256(b"kvcodec-document-v1" + h + ids_bytes(anchor)).digest()
    ids = check_token_ids(token_ids)  # u32 integers, else a ShapeError (see ids_bytes)
    for start in range(0, len(ids), chunk_tokens):
        part = ids[start:start + chunk_tokens]
        h = hashlib.sha256(h + len(part).to_bytes(4, "little") + ids_bytes(part)).digest()
        out.append(h.hex())
    return out


def evicted_key(seed: bytes, token_ids, spec: str, anchor=None) -> str:
    """The key of a whole evicted cache of ``token_ids`` (behind ``anchor``) evicted by
    ``spec``."""
    spec_b, anchor = str(spec).encode(), list(anchor or ())
    h = hashlib.sha256(seed + b"kvcodec-evicted-v1" + len(spec_b).to_bytes(4, "little")
                       + spec_b + len(anchor).to_bytes(4, "little") + ids_bytes(anchor)
                       + ids_bytes(token_ids))
    return h.hexdigest()
