"""Configs of steps, one rule per layer: built from per-(layer, K/V, head) steps, and
kept clear of clipping (:mod:`kvcodec.quality.calibrate` searches over them)."""
from __future__ import annotations

import math

import numpy as np

from ..core.config import validate_config
from ..core.quant import MAX_ALPHABET, make_quantizer
from ..core.streams import KINDS

# Steps stay this far above clipping: a per-token step is rounded to a grid of 2^(1/8)
# ratios (up to 2^(1/16), 4.4%, finer than asked) and the mean is fp16.
CLIP_MARGIN = 1.1


def reach(peak: np.ndarray, mult: np.ndarray, lowest: float) -> float:
    """How far (in units of a rule's step) its range must reach so that no channel
    clips: ``peak`` is each channel's largest ``|x| / rms``
    (:meth:`~kvcodec.quality.calibrate.Calibrator.peak_ratios`), ``mult`` its step
    multipliers, ``lowest`` the smallest factor the step may meet (token importance's
    ``min``, a rate factor), with :data:`CLIP_MARGIN` to spare."""
    return CLIP_MARGIN * float(np.max(peak / mult)) / lowest


def clip_floor(q: dict, peak: np.ndarray, mult: np.ndarray, lowest: float) -> float:
    """The smallest step of quantizer spec ``q`` at which no channel clips
    (:func:`reach` over its ``(bins - 1) / 2`` symbols each side)."""
    return reach(peak, mult, lowest) / ((q["bins"] - 1) // 2)


def channel_mult(q: dict, channels: int, scale=None) -> np.ndarray:
    """Quantizer spec ``q``'s step multipliers per channel (float64 ``[channels]``),
    times ``scale`` (per channel) where given, which ``q`` then records as its
    ``head_scale``, one entry per channel."""
    mult = make_quantizer(q).head_mult(channels).double().numpy()
    if scale is not None:
        mult = mult * np.asarray(scale, dtype=np.float64)
        q["head_scale"] = [round(float(v), 4) for v in mult]
    return mult


def floor_steps(cfg: dict, peaks: dict, channels: int, lowest: float = 1.0) -> None:
    """Keep every rule of ``cfg`` (one per layer) from clipping under token importance's
    smallest multiplier times ``lowest`` (the smallest rate factor it will meet): first
    its range grows (more symbols cost nothing where they are not used), and where 255
    symbols do not reach, its steps rise to their floors (:func:`clip_floor`) at the
    grain of its multipliers: a channel's own where ``head_scale`` has one per channel,
    a head's where one per head, else the rule's step; the other channels keep theirs."""
    imp = (cfg.get("token_importance") or {}).get("min", 1.0) * lowest
    for kind in KINDS:
        for rule in cfg[kind]:
            q = rule["quantizer"]
            peak = peaks[(kind, rule["layers"][0])]
            groups = len(q.get("head_scale") or [1.0])
            mult = make_quantizer(q).head_mult(channels).double().numpy()
            symbols = math.ceil(reach(peak, mult, imp) / q["step"])
            q["bins"] = int(min(MAX_ALPHABET - 1, max(q["bins"], 2 * symbols + 1)))
            need = np.array([clip_floor(q, p, m, imp) / q["step"] for p, m in zip(
                peak.reshape(groups, -1), mult.reshape(groups, -1))])
            if "head_scale" not in q:
                q["step"] = round(q["step"] * max(1.0, float(need[0])), 5)
            elif np.any(need > 1):  # rounded up, so that the floor holds after rounding
                q["head_scale"] = [float(np.ceil(h * max(1.0, n) * 1e4) / 1e4)
                                   for h, n in zip(q["head_scale"], need)]


def build_config(name: str, steps: dict, num_layers: int, kv_heads: int, channels: int,
                 description: str = "", sink_tokens: int = 1,
                 token_importance: dict | None = None,
                 channel_scale: dict | None = None) -> dict:
    """A config with one rule per layer from ``steps[(kind, layer)] = [step per head]``;
    ``channel_scale`` (``{layer: [channels]}``, :meth:`Calibrator.key_channel_scales`)
    multiplies each key channel's step within its head's."""
    cfg = {"name": name, "description": description, "chunk_tokens": 256,
           "sink_tokens": sink_tokens,
           "key_transform": {"type": "rope_strip", "optional": True},
           **({"token_importance": dict(token_importance)} if token_importance else {}),
           "key": [], "value": []}
    for kind in KINDS:
        for layer in range(num_layers):
            hs = [float(v) for v in steps[(kind, layer)]]
            base = math.exp(np.mean(np.log(hs)))
            mult = np.repeat(np.asarray(hs) / base, channels // len(hs))
            if kind == "key" and channel_scale is not None:
                mult = mult * np.asarray(channel_scale[layer], dtype=np.float64)
            # Never clip: |x| / rms <= sqrt(C), so the range needs sqrt(C) / smallest step.
            finest = base * float(mult.min())
            bins = int(min(MAX_ALPHABET - 1, 2 * math.ceil(math.sqrt(channels) / finest) + 1))
            q = {"type": "uniform", "scale": "token", "center": True, "step": round(base, 5),
                 "bins": bins}
            if kind == "key" and channel_scale is not None:
                q["head_scale"] = [round(float(m), 4) for m in mult]
            elif kv_heads > 1 and max(hs) / min(hs) > 1.001:
                q["head_scale"] = [round(h / base, 4) for h in hs]
            cfg[kind].append({"layers": [layer, layer + 1], "quantizer": q})
    validate_config(cfg)
    return cfg
