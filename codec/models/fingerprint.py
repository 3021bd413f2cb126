"""Model fingerprints: what must match for a cache to be valid in a model."""
from __future__ import annotations

import hashlib
import json

from ..errors import ModelMismatchError


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(config, tokenizer=None) -> dict:
    """What must match for a cache to be valid in a model.

    Two models with the same fingerprint produce interchangeable KV caches (same
    architecture, layer/head geometry, RoPE and tokenizer); the weights themselves are not
    hashed, so a fine-tune of the same base is not told apart.
    """
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", config.num_attention_heads)),
        "head_dim": int(head_dim),
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 0.0)) or 0.0),
        "rope_type": str(rope.get("rope_type", "default")),
        "vocab_size": int(config.vocab_size),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
    }


_FINGERPRINT_KEYS = ("architecture", "num_layers", "num_kv_heads", "head_dim",
                     "rope_theta", "rope_type", "vocab_size", "tokenizer_hash")


def check_fingerprint(stored: dict | None, actual: dict) -> None:
    """Raise ModelMismatchError if a cache made by ``stored`` cannot be used in ``actual``."""
    if not stored:
        raise ModelMismatchError(
            "this cache carries no model fingerprint (it was encoded from raw tensors); "
            "it cannot be checked against a model")
    diffs = [f"{k}: file has {stored.get(k)!r}, model has {actual.get(k)!r}"
             for k in _FINGERPRINT_KEYS
             if stored.get(k) is not None and actual.get(k) is not None
             and stored.get(k) != actual.get(k)]
    if diffs:
        raise ModelMismatchError(
            "the cache was made by a different model (" + "; ".join(diffs) + ")")

