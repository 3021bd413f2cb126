"""kvcodec: compress transformer KV caches into compact, safe, randomly accessible files.

>>> import kvcodec
>>> lm = kvcodec.load_model()                       # embedded SmolLM2-135M-Instruct
>>> kv = kvcodec.capture_kv(lm, "Some document ...")
>>> data = kvcodec.encode(kv, "doc.kvc")             # bytes; also written crash-safely
>>> with kvcodec.open("doc.kvc") as f:
...     first = f.decode(chunks=0)                   # only the first 256-token chunk
>>> kv2 = kvcodec.decode("doc.kvc")                  # everything
"""
__version__ = "0.1.0"

from .api import KVCFile, decode, encode, open  # noqa: A004
from .config import available_configs, load_config
from .errors import (BackendError, ConfigError, CorruptError, FormatError, KVCodecError,
                     ModelMismatchError, ShapeError, TruncatedError)
from .model import DEFAULT_MODEL, KVCache, capture_kv, check_fingerprint, fingerprint, load_model

__all__ = [
    "KVCFile", "KVCache", "decode", "encode", "open", "load_config", "available_configs",
    "load_model", "capture_kv", "fingerprint", "check_fingerprint", "DEFAULT_MODEL",
    "KVCodecError", "FormatError", "CorruptError", "TruncatedError", "ModelMismatchError",
    "ShapeError", "ConfigError", "BackendError",
]
