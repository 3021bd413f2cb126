"""Models: loading a transformers model (the embedded default or a local directory), its
fingerprint, and capturing its KV cache over a prompt.

Owns everything that runs or inspects a model. May import ``kvcodec.core`` and
``kvcodec.errors``; never the file format, integrations or applications above it.
"""
from .capture import IMPORTANCE_WINDOW, capture_kv, default_anchor
from .fingerprint import check_fingerprint, fingerprint, fingerprint_dir, tokenizer_hash
from .loading import DEFAULT_MODEL, LoadedModel, cache_dir, load_model, resolve_model_path

__all__ = ["IMPORTANCE_WINDOW", "capture_kv", "default_anchor", "check_fingerprint", "fingerprint", "fingerprint_dir",
           "tokenizer_hash", "DEFAULT_MODEL", "LoadedModel", "cache_dir", "load_model",
           "resolve_model_path"]
