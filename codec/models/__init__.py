"""Models: loading a transformers model (the embedded default, a local directory or a
GGUF file), its fingerprint, turning text into token ids (one rule for every front door),
and capturing its KV cache over a prompt.

Owns everything that runs or inspects a model. May import ``kvcodec.core`` and
``kvcodec.errors``; never the file format, integrations or applications above it.
"""
from .capture import IMPORTANCE_WINDOW, capture_kv, default_anchor
from .fingerprint import check_fingerprint, fingerprint, fingerprint_dir, tokenizer_hash
from .loading import (DEFAULT_MODEL, LoadedModel, cache_dir, convert_gguf, load_model, model_name,
                      resolve_model_path)
from .tokens import chat_suffix, chat_text, document_ids, prompt_ids, special_prefix, text_ids

__all__ = ["IMPORTANCE_WINDOW", "capture_kv", "default_anchor", "check_fingerprint",
           "fingerprint", "fingerprint_dir", "tokenizer_hash", "DEFAULT_MODEL", "LoadedModel",
           "cache_dir", "convert_gguf", "load_model", "model_name", "resolve_model_path",
           "chat_suffix", "chat_text", "document_ids", "prompt_ids", "special_prefix",
           "text_ids"]
