"""Core: what a number becomes. Codec configs (which quantizer each layer's keys and
values get), the quantizers (``klt``: in per-head bases kept in shared codebooks),
invertible transforms (RoPE stripping), the probability tables shared by the CPU and
CUDA coders, the stream layout, and the in-memory :class:`KVCache`.

Knows nothing of files, models or stores. May import only ``kvcodec.errors`` and the
native coder module ``kvcodec._native``.
"""
from . import klt  # noqa: F401 (registers the "klt" quantizer)
from .config import available_configs, load_config, resolve_layers, validate_config
from .kvcache import KVCache, validate_kv

__all__ = ["available_configs", "load_config", "resolve_layers", "validate_config",
           "KVCache", "validate_kv"]
