"""Model fingerprints: what must match for a cache to be valid in a model."""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import torch

from ..errors import BackendError, ModelMismatchError
from .rope import rope_spec
from .support import check_kv_model, kv_geometry, text_config

# Parameters that shape a layer's keys and values (their projections, biases and norms,
# the input norm before them), across the naming schemes of the common families.
_KV_PARAMS = re.compile(r"(^|\.)layers?\.(\d+)\..*(k_proj|v_proj|k_norm|qkv_proj|"
                        r"query_key_value|c_attn|Wqkv|input_layernorm|attention_norm|ln_1)"
                        r"\.(weight|bias)$")
# Elements sampled from each tensor: enough that any fine-tune changes the hash, few
# enough that an 8B model hashes in well under a second.
_SAMPLE = 4096


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@torch.no_grad()
def weights_hash(model) -> str:
    """A cheap hash of the weights that shape K/V: for every layer, an evenly strided
    sample of its key/value projections and norms, rounded to bfloat16 first so that a
    bf16 checkpoint hashes alike loaded in bf16 or fp32 (and any checkpoint alike loaded
    in its own dtype or upcast).

    A full fine-tune or a LoRA on k/v changes it; a LoRA that touches only queries or
    MLPs of the last layer leaves it (and, for the touched layers, the K/V) unchanged.
    ``model`` is a module, or a directory of safetensors files holding the same names
    (what an engine such as vLLM loads), so both sides hash alike without loading twice.
    """
    if isinstance(model, (str, Path)):
        return _hash_tensors(_checkpoint_tensors(Path(model)))
    return _hash_tensors(dict(model.named_parameters()))


def _checkpoint_tensors(directory: Path) -> dict:
    """The K/V-shaping tensors of a safetensors checkpoint (all of them if none match)."""
    from safetensors import safe_open

    out, files = {}, sorted(directory.glob("*.safetensors"))
    if not files:
        raise BackendError(f"{directory} has no .safetensors weights to fingerprint")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            picked = [n for n in names if _KV_PARAMS.search(n)] or names
            out.update({n: f.get_tensor(n) for n in picked})
    return out


def _hash_tensors(tensors: dict) -> str:
    h = hashlib.sha256()
    picked = [(name, p) for name, p in tensors.items() if _KV_PARAMS.search(name)]
    if not picked:  # an unknown naming scheme: sample every parameter instead
        picked = list(tensors.items())
    for name, p in sorted(picked, key=lambda np_: np_[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _rope_summary(cfg) -> tuple:
    """(theta, rope_type) for display and for files of older kvcodec versions."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
        rope = rope.get("full_attention") or next(iter(rope.values()))
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 0.0)) or 0.0
    return float(theta), str(rope.get("rope_type", "default"))


def fingerprint_dir(path) -> dict:
    """The fingerprint of a local model directory (config, tokenizer, safetensors
    weights), equal to :func:`fingerprint` of the same model loaded by transformers,
    without loading it: what a serving engine's side of the store checks against."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    return fingerprint(AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                       weights=path)


def fingerprint(config, tokenizer=None, model=None, *, weights=None, rope: bool = True) -> dict:
    """What must match for a cache to be valid in a model.

    Two models with the same fingerprint produce interchangeable KV caches: same
    architecture, layer/head geometry, attention windows, RoPE, tokenizer and (when
    ``model`` is given) the weights that shape K/V. ``rope`` records the model's own
    rotary frequencies per layer (:func:`kvcodec.models.rope.rope_spec`), which encoding
    with ``rope_strip`` needs. ``weights`` (a checkpoint directory) hashes the weights
    there instead of ``model``'s. ``rope=False`` leaves ``rope`` None: what
    :func:`check_fingerprint` compares, without building the model's rotary module.
    """
    check_kv_model(config)
    cfg = text_config(config)
    n_layers, n_kv_heads, head_dim = kv_geometry(cfg)
    theta, rope_type = _rope_summary(cfg)
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is not None and not any("sliding" in t for t in layer_types):
        window = None  # configs carry a window value even where no layer uses it
    return {
        "architecture": (getattr(config, "architectures", None) or [cfg.model_type])[0],
        "model_type": cfg.model_type,
        "num_layers": n_layers,
        "num_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "rope_theta": theta,
        "rope_type": rope_type,
        "sliding_window": int(window) if window else None,
        "layer_types": list(layer_types) if layer_types is not None else None,
        "vocab_size": int(cfg.vocab_size),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "weights_hash": weights_hash(weights if weights is not None else model)
        if weights is not None or model is not None else None,
        "rope": rope_spec(config, model) if rope else None,
    }


_FINGERPRINT_KEYS = ("architecture", "num_layers", "num_kv_heads", "head_dim",
                     "rope_theta", "rope_type", "sliding_window", "layer_types",
                     "vocab_size", "tokenizer_hash", "weights_hash")
# What every fingerprint states: without these a cache's shape is not the model's.
_REQUIRED_KEYS = ("architecture", "num_layers", "num_kv_heads", "head_dim")


def check_fingerprint(stored: dict | None, actual: dict) -> None:
    """Raise ModelMismatchError if a cache made by ``stored`` cannot be used in ``actual``.

    The geometry (architecture, layers, KV heads, head_dim) must be stated on both
    sides; other fields either side lacks are not compared; a file from before weight
    hashes (no ``weights_hash``) checked against a model that has one opens with a
    warning, since a fine-tune of the same base cannot be told apart from it.
    """
    if not stored:
        raise ModelMismatchError(
            "this cache carries no model fingerprint (it was encoded from raw tensors); "
            "it cannot be checked against a model")
    for side, fp in (("cache", stored), ("model", actual)):
        if not isinstance(fp, dict):
            raise ModelMismatchError(f"the {side}'s fingerprint is not a fingerprint")
        missing = [k for k in _REQUIRED_KEYS if fp.get(k) is None]
        if missing:
            raise ModelMismatchError(f"the {side}'s fingerprint does not state "
                                     f"{', '.join(missing)}; it cannot be checked")
    diffs = [f"{k}: file has {stored.get(k)!r:.80}, model has {actual.get(k)!r:.80}"
             for k in _FINGERPRINT_KEYS
             if stored.get(k) is not None and actual.get(k) is not None
             and stored.get(k) != actual.get(k)]
    if diffs:
        raise ModelMismatchError(
            "the cache was made by a different model (" + "; ".join(diffs) + ")")
    if stored.get("weights_hash") is None and actual.get("weights_hash") is not None:
        warnings.warn("this cache's fingerprint has no weights hash (made by an older kvcodec "
                      "or from a config alone): it matches the model's architecture, but a "
                      "fine-tune of the same base would match too", stacklevel=2)
