"""Format: the .kvc file. The container (magic, version, capped JSON header, checksummed
and tiled sections, crash-safe writes), the header's fields and caps, the encoder
(:class:`Encoder`, configured once; :func:`encode`; stream coding in ``coding``), the
reader (:class:`KVCFile`: a checked header, lazily verified sections, decode plans),
evicted caches (format v4, per-head kept tokens: ``kept``, ``evicted``), streaming
sources, and plain safetensors interchange.

Knows nothing of models or stores: a file carries a model's fingerprint as data.
May import ``kvcodec.core`` and ``kvcodec.errors``.
"""
from .container import atomic_write
from .opening import decode, open  # noqa: A004
from .reader import KVCFile
from .encoder import Encoder, encode
from .spec import DTYPES

__all__ = ["KVCFile", "Encoder", "decode", "encode", "open", "atomic_write", "DTYPES"]
