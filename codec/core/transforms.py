"""Invertible transforms applied to a layer's tensors around quantization.

``rope_strip`` (KVQuant, Hooper et al. 2024): keys in a transformers cache are post-RoPE,
so each pair of channels rotates with the token's position and a channel's statistics
smear across positions. Undoing the rotation before quantization and redoing it after
decoding makes per-channel statistics stable, which the per-channel probability tables
turn into fewer bits (about 10% at equal KL on SmolLM2), and makes the coded keys
position-independent, as blending cached chunks needs.

The rotation is the model's own: :class:`Rope` holds the inverse frequencies and the
attention scaling its rotary module computed (any ``rope_type``, partial rotary dims;
see :mod:`kvcodec.models.rope`), per layer. Files written before that (format v2) record
a single ``theta`` of default RoPE and still decode.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

MAX_ROPE_KINDS = 16


@dataclass(frozen=True)
class Rope:
    """One layer's rotary embedding: ``rotate_half`` over the first ``rotary_dim``
    channels (pairs ``i`` and ``i + rotary_dim / 2``), angles ``position * inv_freq``,
    cos and sin multiplied by ``scaling`` (transformers' ``attention_scaling``, e.g. YaRN's)."""

    inv_freq: tuple
    scaling: float = 1.0

    @classmethod
    def from_theta(cls, theta: float, head_dim: int) -> "Rope":
        """Default RoPE of base ``theta`` (the v2 files' form), frequencies in float64."""
        if head_dim % 2:
            raise ConfigError(f"rope_strip needs an even head_dim, got {head_dim}")
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return cls(tuple(inv.tolist()))

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)


# cos/sin are computed in blocks of this many positions, each once per process (per
# rope): a table of any span is its blocks' rows, so the spans a stream decodes in
# (whatever arrived, a run of chunks or part of one) cost no new float64 cos/sin.
ROPE_BLOCK = 256


@functools.lru_cache(maxsize=128)
def _rope_block(block: int, r: Rope):
    at = block * ROPE_BLOCK
    return _cos_sin(torch.arange(at, at + ROPE_BLOCK, dtype=torch.float64), r)


@functools.lru_cache(maxsize=64)
def _rope_tables(offset: int, length: int, r: Rope):
    """cos/sin ``[length, rotary_dim]`` (scaled), computed in float64 (in blocks,
    :func:`_rope_block`) once per (span, rope): every layer of a chunk shares them, so a
    decode builds them once per kind."""
    if length <= 0 or offset < 0:
        return _cos_sin(torch.arange(offset, offset + length, dtype=torch.float64), r)
    first, last = offset // ROPE_BLOCK, (offset + length - 1) // ROPE_BLOCK
    parts = [_rope_block(b, r) for b in range(first, last + 1)]
    at = offset - first * ROPE_BLOCK
    if len(parts) == 1:
        c, s = parts[0]
        return c[at:at + length], s[at:at + length]
    return tuple(torch.cat([p[i] for p in parts])[at:at + length].contiguous() for i in (0, 1))


def _cos_sin(positions: torch.Tensor, r: Rope):
    """float32 cos/sin ``[len(positions), rotary_dim]`` (scaled) of float64 positions."""
    inv = torch.tensor(r.inv_freq, dtype=torch.float64)
    freqs = torch.outer(positions, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * r.scaling).float(), (emb.sin() * r.scaling).float()


def rope_tables(offset: int, length: int, r: Rope):
    """float32 cos/sin ``[length, rotary_dim]`` for positions ``offset ..``, scaling
    included, as :func:`rope` applies them (contiguous; shared, do not modify)."""
    return _rope_tables(int(offset), int(length), r)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(keys: torch.Tensor, r, offset: int | torch.Tensor = 0,
         inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) rotary embedding to ``keys [1, H, T, D]``; float32 out.

    ``r`` is a :class:`Rope` or a default-RoPE ``theta``. Uses transformers' convention
    (``rotate_half`` within the first ``rotary_dim`` channels, the rest passed through)
    and positions ``offset .. offset + T - 1``, or, with ``offset`` an integer tensor
    ``[T]``, each token's own position (the kept tokens of an evicted cache). The
    inverse divides the scaling out.
    """
    t, d = keys.shape[2], keys.shape[3]
    if not isinstance(r, Rope):
        r = Rope.from_theta(float(r), d)
    rd = r.rotary_dim
    if rd > d:
        raise ConfigError(f"a rotary dim of {rd} does not fit head_dim {d}")
    if isinstance(offset, torch.Tensor):
        cos, sin = _cos_sin(offset.to("cpu", torch.float64), r)
    else:
        cos, sin = _rope_tables(int(offset), int(t), r)
    x = keys.float()
    if inverse:
        xr = x[..., :rd]
        out = (xr * cos - _rotate_half(xr) * sin) / (r.scaling * r.scaling)
        return out if rd == d else torch.cat([out, x[..., rd:]], dim=-1)
    return rotate(x, cos, sin)


def rotate(x, cos, sin):
    """float32 ``x [..., T, D]`` rotated by cos/sin ``[T, rotary_dim]`` (from
    :func:`rope_tables`: scaling included) as :func:`rope` rotates, the channels past the
    rotary dims passed through: torch tensors, or NumPy arrays (the same IEEE products and
    sums, without torch's per-call cost on the few rows a decode restores)."""
    rd = cos.shape[-1]
    xr = x[..., :rd]
    if isinstance(x, np.ndarray):
        half = rd // 2
        out = xr * cos + np.concatenate([-xr[..., half:], xr[..., :half]], -1) * sin
        return out if rd == x.shape[-1] else np.concatenate([out, x[..., rd:]], -1)
    out = xr * cos + _rotate_half(xr) * sin
    return out if rd == x.shape[-1] else torch.cat([out, x[..., rd:]], dim=-1)


def shift(keys: torch.Tensor, r: Rope, delta: int) -> torch.Tensor:
    """Turn post-RoPE ``keys [1, H, T, D]`` by ``delta`` positions (every token alike);
    float32 out. RoPE rotates each channel pair by ``position * inv_freq``, so a key
    rotated at ``p`` and turned by ``delta`` is the key rotated at ``p + delta``; the
    attention scaling is already in the keys and is not applied again."""
    rd = r.rotary_dim
    if rd > keys.shape[-1]:
        raise ConfigError(f"a rotary dim of {rd} does not fit head_dim {keys.shape[-1]}")
    ang = torch.tensor(r.inv_freq, dtype=torch.float64) * float(delta)
    ang = torch.cat([ang, ang])
    cos, sin = ang.cos().float(), ang.sin().float()
    x = keys.float()
    xr = x[..., :rd]
    out = xr * cos + _rotate_half(xr) * sin
    return out if rd == keys.shape[-1] else torch.cat([out, x[..., rd:]], dim=-1)


def model_ropes(model: dict | None, num_layers: int, head_dim: int) -> list:
    """Per-layer :class:`Rope` (None where a layer has none) that a model fingerprint
    records; ConfigError where it records none or the model's RoPE is not rotate_half."""
    if not (model or {}).get("rope") and not (model or {}).get("rope_theta"):
        raise ConfigError("the model fingerprint records no rotary embedding")
    xform = key_transform({"key_transform": {"type": "rope_strip"}}, model, num_layers)
    return layer_ropes(xform, num_layers, head_dim)


def key_transform(cfg: dict, model: dict | None, num_layers: int | None = None) -> dict | None:
    """The resolved key transform of a config for a model, as the header records it.

    With a model fingerprint that carries the model's RoPE (``"rope"``, see
    :func:`kvcodec.models.rope.rope_spec`): ``{"type": "rope_strip", "kinds": [...],
    "layers": [...]}``, the model's own frequencies per layer. Without one (raw tensors,
    older fingerprints): default RoPE of the model's or the config's ``theta``,
    ``{"type": "rope_strip", "theta": ...}``. ``num_layers`` is the cache's: a cache of
    fewer layers than its model (a slice, in tests) works where every layer's RoPE is alike.
    """
    spec = cfg.get("key_transform")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "rope_strip":
        raise ConfigError(f"unknown key_transform {spec!r}; known: rope_strip")
    model = model or {}
    if model.get("rope"):
        rope = model["rope"]  # a fingerprint may come from a file: its shape is checked
        if isinstance(rope, dict) and rope.get("style", "half") != "half":
            raise ConfigError(f"{model.get('model_type')} applies {rope['style']!r:.40} RoPE; "
                              "rope_strip supports rotate_half RoPE only (use a config "
                              "without key_transform, e.g. cachegen or lossless)")
        if not isinstance(rope, dict) or not isinstance(rope.get("layers"), list) \
                or not rope["layers"]:
            raise ConfigError(f"the model fingerprint's rope {rope!r:.80} is not "
                              "{'style', 'kinds', 'layers'}")
        layers = list(rope["layers"])
        if num_layers is not None and num_layers != len(layers):
            if any(v != layers[0] for v in layers):
                raise ConfigError(f"the cache has {num_layers} layers but its model's RoPE "
                                  f"differs across its {len(layers)} layers")
            layers = layers[:1] * num_layers
        return {"type": "rope_strip", "kinds": rope.get("kinds"), "layers": layers}
    # The model's own theta wins: the config may have been calibrated on another model.
    theta = model.get("rope_theta") or spec.get("theta")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError("rope_strip needs the model's RoPE: encode a cache that carries "
                          "its model fingerprint (kvcodec.capture_kv does), or give theta "
                          "in the config for default RoPE")
    rope_type = model.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise ConfigError(f"this cache's fingerprint records rope_type {rope_type!r} but not "
                          "the model's frequencies; capture it again with this kvcodec")
    return {"type": "rope_strip", "theta": float(theta)}


def layer_ropes(xform: dict | None, num_layers: int, head_dim: int) -> list:
    """Per-layer :class:`Rope` (None: no RoPE at that layer) of a resolved transform,
    checked as untrusted input (it comes from a file header); ConfigError if invalid."""
    if xform is None:
        return [None] * num_layers
    if not isinstance(xform, dict) or xform.get("type") != "rope_strip":
        raise ConfigError(f"unknown key_transform {xform!r:.80}")
    if "kinds" not in xform:
        theta = xform.get("theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
            raise ConfigError(f"rope_strip theta must be a positive number, got {theta!r:.40}")
        return [Rope.from_theta(float(theta), head_dim)] * num_layers
    kinds, layers = xform.get("kinds"), xform.get("layers")
    if not isinstance(kinds, list) or not 1 <= len(kinds) <= MAX_ROPE_KINDS:
        raise ConfigError(f"rope_strip needs 1..{MAX_ROPE_KINDS} kinds")
    ropes = []
    for i, k in enumerate(kinds):
        inv = k.get("inv_freq") if isinstance(k, dict) else None
        scaling = k.get("scaling", 1.0) if isinstance(k, dict) else None
        if (not isinstance(inv, list) or not 1 <= len(inv) <= head_dim // 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and v >= 0 for v in inv)):
            raise ConfigError(f"rope kind {i}: inv_freq must be 1..head_dim/2 finite numbers")
        if (not isinstance(scaling, (int, float)) or isinstance(scaling, bool)
                or not math.isfinite(scaling) or not scaling > 0):
            raise ConfigError(f"rope kind {i}: scaling must be a positive number")
        limit = k.get("max_position")  # check_positions compares positions with it
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise ConfigError(f"rope kind {i}: max_position must be an integer or null")
        ropes.append(Rope(tuple(float(v) for v in inv), float(scaling)))
    if not isinstance(layers, list) or len(layers) != num_layers or not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(ropes))
            for v in layers):
        raise ConfigError(f"rope_strip layers must list a kind index (or null) for each of "
                          f"{num_layers} layers")
    return [None if v is None else ropes[v] for v in layers]


def check_positions(xform: dict | None, offset: int, num_tokens: int) -> None:
    """Refuse positions where a length-dependent RoPE (dynamic NTK, longrope) no longer
    uses the recorded frequencies: the cache could not be re-rotated exactly."""
    for k in (xform or {}).get("kinds", ()):
        limit = k.get("max_position")
        if limit is not None and offset + num_tokens > limit:
            raise ConfigError(
                f"{k.get('rope_type')} RoPE changes its frequencies beyond {limit} positions "
                f"and this cache reaches position {offset + num_tokens}; rope_strip cannot "
                "undo it exactly: encode at most that many tokens or use a config without "
                "key_transform (e.g. lossless)")


def applied_key_transform(cfg: dict, model: dict | None, num_layers: int, offset: int,
                          num_tokens: int) -> tuple:
    """``(resolved transform or None, config as applied)`` for coding a cache.

    An ``optional`` transform (the model-free default's) is dropped where the model's
    RoPE cannot be undone exactly (interleaved rotation, no rotary module, a
    length-dependent RoPE past its range): the returned config then has no
    ``key_transform``, which is what the file records.
    """
    try:
        xform = key_transform(cfg, model, num_layers)
        check_positions(xform, offset, num_tokens)
    except ConfigError:
        if not (cfg.get("key_transform") or {}).get("optional"):
            raise
        return None, dict(cfg, key_transform=None)
    return xform, cfg
