"""Invertible transforms applied to a layer's tensors around quantization.

``rope_strip`` (KVQuant, Hooper et al. 2024): keys in a transformers cache are post-RoPE,
so each pair of channels rotates with the token's position and a channel's statistics
smear across positions. Undoing the rotation before quantization and redoing it after
decoding makes per-channel statistics stable, which the per-channel probability tables
turn into fewer bits (about 10% at equal KL on SmolLM2), and makes the coded keys
position-independent, as blending cached chunks needs.
"""
from __future__ import annotations

import functools

import torch

from ..errors import ConfigError


@functools.lru_cache(maxsize=64)
def _rope_tables(offset: int, length: int, head_dim: int, theta: float):
    """cos/sin ``[length, head_dim]``, computed in float64 once per (span, theta): every
    layer of a chunk shares them, so a decode builds them once, not once per layer."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(offset, offset + length, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rope_tables(offset: int, length: int, head_dim: int, theta: float):
    """float32 cos/sin ``[length, head_dim]`` for positions ``offset ..``, as :func:`rope`
    uses them (contiguous; shared, do not modify)."""
    return _rope_tables(int(offset), int(length), int(head_dim), float(theta))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(keys: torch.Tensor, theta: float, offset: int = 0, inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) Llama-style rotary embedding to ``keys [1, H, T, D]`` (float32).

    Uses transformers' convention (``rotate_half``, channel ``i`` paired with ``i + D/2``)
    and positions ``offset .. offset + T - 1``.
    """
    t, d = keys.shape[2], keys.shape[3]
    if d % 2:
        raise ConfigError(f"rope_strip needs an even head_dim, got {d}")
    cos, sin = _rope_tables(int(offset), int(t), int(d), float(theta))
    x = keys.float()
    return x * cos - _rotate_half(x) * sin if inverse else x * cos + _rotate_half(x) * sin


def key_transform(cfg: dict, model: dict | None) -> dict | None:
    """The resolved key transform of a config, or None: ``{"type": "rope_strip", "theta"}``."""
    spec = cfg.get("key_transform")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "rope_strip":
        raise ConfigError(f"unknown key_transform {spec!r}; known: rope_strip")
    # The model's own theta wins: the config may have been calibrated on another model.
    theta = (model or {}).get("rope_theta") or spec.get("theta")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError("rope_strip needs rope_theta: give it in the config or encode a "
                          "cache that carries its model fingerprint")
    rope_type = (model or {}).get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise ConfigError(f"rope_strip supports default RoPE only, not {rope_type!r}")
    return {"type": "rope_strip", "theta": float(theta)}
