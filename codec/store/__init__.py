"""Store: caches kept on disk or in an object store, as chunk entries keyed by chained
hashes of their token prefix under a model fingerprint and a codec config
(:class:`ChunkStore`, in ``chunks``; the key derivation in ``keys``); the filesystems it
runs on (``backends``: a local directory or any fsspec URL). Atomic writes, checked reads, damaged entries moved aside.

Below the integrations, which all read and write it (transformers through
:func:`kvcodec.integrations.hf.cache_from_store`, vLLM through its connector). May import
``kvcodec.core``, ``kvcodec.format``, ``kvcodec.models`` and ``kvcodec.errors``.
"""
from .chunks import ChunkStore, is_damage

__all__ = ["ChunkStore", "is_damage"]
