"""kvcodec: compress transformer KV caches into compact, safe, randomly accessible files.

>>> import kvcodec
>>> lm = kvcodec.load_model()                       # embedded SmolLM2-135M-Instruct
>>> kv = kvcodec.capture_kv(lm, "Some document ...")
>>> data = kvcodec.encode(kv, "doc.kvc")             # bytes; also written crash-safely
>>> with kvcodec.open("doc.kvc") as f:
...     first = f.decode(chunks=0)                   # only the first 256-token chunk
>>> kv2 = kvcodec.decode("doc.kvc")                  # everything

The package is layered (ARCHITECTURE.md); a layer imports only those below it:
``errors`` < ``core`` < ``format``, ``models`` < ``store`` < ``integrations``
< ``quality``, ``blend``, ``evict`` < ``jobs``.
"""
import importlib

from ._version import __version__
from .core import KVCache, available_configs, load_config
from .errors import (AccessError, BackendError, BlendError, CalibrationError, ConfigError,
                     CorruptError,
                     FormatError, KVCodecError, ModelMismatchError, ShapeError,
                     TruncatedError, VersionError)
from .format import KVCFile, decode, encode, open  # noqa: A004
from .models import DEFAULT_MODEL, capture_kv, check_fingerprint, fingerprint, load_model

__all__ = [
    "KVCFile", "KVCache", "decode", "encode", "open", "load_config", "available_configs",
    "load_model", "capture_kv", "fingerprint", "check_fingerprint", "DEFAULT_MODEL",
    "KVCodecError", "FormatError", "CorruptError", "TruncatedError", "ModelMismatchError",
    "ShapeError", "ConfigError", "BackendError", "BlendError", "AccessError", "VersionError",
    "CalibrationError",
    "__version__",
]

_SUBPACKAGES = {"core", "format", "models", "store", "integrations", "quality", "blend",
                "evict", "jobs"}


def __getattr__(name):
    """``kvcodec.store.ChunkStore(...)`` after a plain ``import kvcodec``: sub-packages
    load on first use."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
