"""A model's rotary position embedding, read from its own rotary module.

Every family computes its RoPE in a module of its own (``LlamaRotaryEmbedding``,
``Gemma3RotaryEmbedding``, ...), built by transformers from ``rope_parameters`` for
each ``rope_type`` it knows (default, linear, dynamic, yarn, longrope, llama3, ...) and
for partial rotary dims (Phi-3, StableLM, GPT-NeoX). Instead of re-deriving any of
that, :func:`rope_spec` instantiates that module from the config (or takes it from a
loaded model) and records what it computed: per layer, the inverse frequencies and the
attention scaling folded into cos/sin. ``kvcodec.core.transforms`` turns that record
back into exact rotations, and the .kvc header stores it, so a file can be decoded
(and re-positioned) without the model.
"""
from __future__ import annotations

import importlib

import torch

from ..errors import BackendError
from .support import text_config

# Families whose attention rotates interleaved channel pairs (GPT-J style) rather than
# rotate_half; rope_strip refuses them (kvcodec.core.transforms.key_transform).
_INTERLEAVED = {"gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "chatglm",
                "deepseek_v2", "deepseek_v3", "llama4"}


def _rotary_class(config):
    """The ``*RotaryEmbedding`` class of the causal-LM class that ``config`` builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    module = importlib.import_module(model_cls.__module__)
    prefix = model_cls.__name__.split("For")[0]
    found = getattr(module, f"{prefix}RotaryEmbedding", None)
    if found is None:
        candidates = [v for k, v in vars(module).items()
                      if k.endswith("RotaryEmbedding") and isinstance(v, type)
                      and "Vision" not in k]
        found = candidates[0] if len(candidates) == 1 else None
    return found


def _rotary_module(config, model=None):
    if model is not None:
        for m in model.modules():
            if type(m).__name__.endswith("RotaryEmbedding") and "Vision" not in type(m).__name__:
                return m
    cls = _rotary_class(config)
    if cls is None:
        return None
    try:
        with torch.device("cpu"):
            return cls(config)
    except Exception as exc:  # noqa: BLE001 - transformers' own module on this config
        raise BackendError(f"{getattr(config, 'model_type', '?')}'s rotary embedding cannot "
                           f"be built from its config ({type(exc).__name__}: {exc})"[:300]
                           ) from None


def _no_rope_layers(config, n_layers: int) -> set:
    """Layers that apply no RoPE (SmolLM3 and Llama 4 list them as ``no_rope_layers``,
    1 = uses RoPE)."""
    flags = getattr(config, "no_rope_layers", None)
    if not flags or len(flags) != n_layers:
        return set()
    return {i for i, use in enumerate(flags) if not use}


def rope_spec(config, model=None) -> dict | None:
    """What the model's RoPE does at each layer, or None if it has no rotary module.

    Returns
    -------
    dict
        ``{"style": "half" | "interleaved" | "proportional", "kinds": [{"rope_type", "inv_freq": [float],
        "scaling": float, "max_position": int or None}], "layers": [kind index or None
        per layer]}``.
        ``inv_freq`` has ``rotary_dim / 2`` entries (fewer than ``head_dim / 2`` for
        partial rotary); ``max_position`` bounds the positions where the frequencies are
        the recorded ones, for RoPE types that change them with the sequence length
        (dynamic NTK beyond the context, longrope beyond its original context).
    """
    cfg = text_config(config)
    module = _rotary_module(cfg, model)
    if module is None:
        return None
    n_layers = int(cfg.num_hidden_layers)
    layer_types = getattr(module, "layer_types", None)
    names = [None] if not layer_types else list(layer_types)
    kinds = []
    for name in names:
        prefix = "" if name is None else f"{name}_"
        inv = getattr(module, f"{prefix}original_inv_freq", None)
        if inv is None:
            inv = getattr(module, f"{prefix}inv_freq")
        rope_type = module.rope_type if name is None else module.rope_type[name]
        params = cfg.rope_parameters if name is None else cfg.rope_parameters[name]
        max_pos = None
        if "dynamic" in rope_type:
            max_pos = int(getattr(module, "original_max_seq_len", cfg.max_position_embeddings))
        elif rope_type == "longrope":
            max_pos = int(params["original_max_position_embeddings"])
        kinds.append({"rope_type": str(rope_type),
                      "inv_freq": [float(x) for x in inv.detach().float().cpu()],
                      "scaling": float(getattr(module, f"{prefix}attention_scaling")),
                      "max_position": max_pos})
    layers = [names.index(t) for t in cfg.layer_types] if layer_types else [0] * n_layers
    for i in _no_rope_layers(cfg, n_layers):
        layers[i] = None
    style = "interleaved" if cfg.model_type in _INTERLEAVED else "half"
    if any(k["rope_type"] == "proportional" for k in kinds):
        style = "proportional"  # Gemma 4: unrotated channels inside each half
    return {"style": style, "kinds": kinds, "layers": layers}
