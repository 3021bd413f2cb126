"""Format: the .kvc file. The container (magic, version, capped JSON header, checksummed
and tiled sections, crash-safe writes), the header's fields and caps, the writer
(:func:`encode`), the reader (:class:`KVCFile`: header checks, lazy sections, decode
planning), evicted caches (format v4, per-head kept tokens: ``kept``, ``evicted``),
streaming sources, and plain safetensors interchange.

Knows nothing of models or stores: a file carries a model's fingerprint as data.
May import ``kvcodec.core`` and ``kvcodec.errors``.
"""
from .container import atomic_write
from .reader import KVCFile, decode, open  # noqa: A004
from .spec import DTYPES
from .writer import encode

__all__ = ["KVCFile", "decode", "encode", "open", "atomic_write", "DTYPES"]
