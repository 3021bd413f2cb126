"""Which models kvcodec can code, decided from a model's config before any weight loads.

kvcodec codes a decoder's self-attention cache: every layer keeps per-head keys and
values, all layers of one geometry (KV heads, head_dim), one cache layer per model layer.
A model outside that gets a :class:`~kvcodec.errors.ShapeError` that says why, where it
used to fail deep inside transformers (a ``ValueError`` from a hybrid model's cache, an
``IndexError`` from an encoder-decoder's, an ``AttributeError`` from a state-space
model's config) or, for Falcon-7B's single KV head, in every encode:

- encoder-decoder models (BART, Marian, Pegasus): their decoders also cache the
  encoder's keys;
- multi-head latent attention (DeepSeek V2/V3, MiniCPM3): a latent, not per-head K/V;
- state-space and recurrent models (Mamba, RWKV, RecurrentGemma) and hybrids of them with
  attention or convolutions (Jamba, Bamba, Granite 4, Nemotron-H, Falcon-H1, Qwen3-Next,
  Qwen3.5, LFM2): a prefix's recurrent state is not in its K/V, so a K/V codec cannot
  restore it;
- layers of different geometry (Gemma 4's wider full-attention heads) and layers that
  share another layer's K/V (Gemma 3n): a cache whose layers are not one shape each.
"""
from __future__ import annotations

from ..errors import ShapeError

# The layer kinds whose cache is per-head keys and values (transformers' layer_types).
ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def text_config(config):
    """The decoder's config of a model's config (a multimodal model's text part)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") \
        else config


def kv_heads(cfg) -> int:
    """The KV heads each layer of a model of (text) config ``cfg`` caches. Multi-query
    models (``multi_query``: Falcon-7B, StarCoder) cache one whatever else the config
    says, Falcon's new decoder architecture (Falcon-40B) every query head's (it expands
    its ``num_kv_heads`` before caching); the rest say ``num_key_value_heads``, or cache
    every attention head (GPT-BigCode, whatever its ``num_key_value_heads``)."""
    if getattr(cfg, "model_type", None) == "falcon" and getattr(
            cfg, "new_decoder_architecture", False):
        return int(cfg.num_attention_heads)
    if getattr(cfg, "multi_query", False) is True:
        return 1
    if getattr(cfg, "model_type", None) == "falcon":
        return int(getattr(cfg, "num_kv_heads", None) or cfg.num_attention_heads)
    if getattr(cfg, "model_type", None) == "gpt_bigcode":
        return int(cfg.num_attention_heads)
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def kv_geometry(config) -> tuple:
    """``(layers, kv_heads, head_dim)`` of the K/V a model with ``config`` caches."""
    cfg = text_config(config)
    try:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    except Exception as exc:  # noqa: BLE001 - e.g. a per-layer head_dim transformers guards
        raise ShapeError(f"{getattr(cfg, 'model_type', '?')} has no one head_dim ("
                         f"{type(exc).__name__}); kvcodec codes models whose every layer "
                         "caches keys and values of one geometry") from None
    return int(cfg.num_hidden_layers), kv_heads(cfg), int(head_dim)


def check_kv_model(config) -> None:
    """Raise ShapeError unless a model of ``config`` caches what kvcodec codes (above)."""
    cfg = text_config(config)
    name = getattr(cfg, "model_type", None) or type(cfg).__name__

    def refuse(why: str):
        raise ShapeError(f"{name} {why}; kvcodec codes decoder-only models whose every "
                         "layer caches per-head keys and values of one geometry")

    # BartForCausalLM and kin clear is_encoder_decoder on their copy of the config, but
    # still read their heads from decoder_* fields the config's aliases do not name.
    if any(getattr(c, "is_encoder_decoder", False) or (
            getattr(c, "encoder_layers", None) is not None
            and getattr(c, "decoder_layers", None) is not None) for c in (config, cfg)):
        refuse("is an encoder-decoder model (its decoder caches the encoder's keys too)")
    if getattr(cfg, "kv_lora_rank", None):
        refuse("caches multi-head latent attention (MLA) latents, not per-head keys and "
               "values")
    if not getattr(cfg, "num_attention_heads", None):
        refuse("has no attention heads (a state-space or recurrent model)")
    blocks = getattr(cfg, "block_types", None) or getattr(cfg, "layers_block_type", None)
    kinds = set(getattr(cfg, "layer_types", None) or ()) | {
        b for b in (blocks or ()) if isinstance(b, str) and b != "attention"}
    other = sorted(str(k) for k in kinds - ATTENTION_KINDS)
    if other:
        refuse(f"has {', '.join(other)} layers, which cache no per-head keys and values "
               "(a prefix's recurrent state is not in its K/V)")
    shared = getattr(cfg, "num_kv_shared_layers", None)
    if isinstance(shared, int) and shared > 0:
        refuse(f"lets {shared} of its {getattr(cfg, 'num_hidden_layers', '?')} layers reuse "
               "an earlier layer's keys and values")
    _check_layers(cfg, refuse)


def _check_layers(cfg, refuse) -> None:
    """Per-layer geometry, where the config varies it by layer (transformers'
    heterogeneous configs: Gemma 4). Homogeneous configs skip it: a store load checks
    its model on every call, and listing the per-layer configs costs ~0.15 ms."""
    if not vars(cfg).get("_heterogeneity_spec"):
        return
    per_layer = list(cfg.per_layer_config)
    for field in ("head_dim", "num_key_value_heads"):
        seen = sorted({v for v in (getattr(c, field, None) for c in per_layer)
                       if v is not None})
        if len(seen) > 1:
            refuse(f"has layers of different {field} ({', '.join(map(str, seen))})")
