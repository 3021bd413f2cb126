"""Storage: caches kept on disk, as chunk files keyed by chained hashes of their token
prefix under a model fingerprint and a codec config (:class:`ChunkStore`). Atomic
writes, checked reads, damaged entries moved aside.

Below the integrations, which all read and write it (transformers through
:mod:`kvcodec.store`, vLLM through its connector). May import ``kvcodec.core``,
``kvcodec.format``, ``kvcodec.models`` and ``kvcodec.errors``.
"""
from .chunks import ChunkStore

__all__ = ["ChunkStore"]
