"""Quantizers: float ``[tokens, channels]`` <-> uint8 symbols plus side information.

Every quantizer maps one layer's keys or values, flattened to ``x: [T, C]`` with
``C = kv_heads * head_dim``, to symbols ``[T, C + extra_channels]`` in
``[0, alphabet)``. Side information comes in three kinds, all exactly representable so
that encoder and decoder use bit-identical values:

* per-file parameters (``param_names``, each ``[C]`` float16), fitted on the whole sequence;
* per-token float16 values (``side_per_token`` each), stored raw with each chunk;
* per-token codes in extra symbol columns (``extra_channels``), entropy coded with the
  payload: a per-token step on a 1/8-octave grid (``STEP_GRID``) costs ~4 bits a token
  instead of 16.

Types
-----
``absmax_token`` (CacheGen, Liu et al. 2024, released code)
    One absmax scale per token over all channels of the layer;
    ``q = round(x * M / absmax + M)`` with ``M = bins // 2 - 1``. Fields: ``bins``.
``uniform``
    Uniform scalar quantizer, ``q = clamp(round((x - mean) / s), -R, R) + R`` with
    ``R = (bins - 1) // 2``. With ``scale: "channel"`` (KIVI's choice for keys) the step is
    ``s_c = step * spread_c`` with mean and spread (MAD) fitted per channel per file; with
    ``scale: "token"`` (KIVI's choice for values) ``s_t ~ step * rms_t`` per token, mean 0,
    rounded to ``STEP_GRID`` and coded in one extra symbol column.
    Entropy coding makes the step, not ``bins``, set the rate; ``bins`` only bounds the
    clipping range. Fields: ``step``, ``bins`` (<= 256), ``scale``.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError

MAX_ALPHABET = 256
# Per-token steps live on this grid: code k in [1, 255] means 2**((k - 128) / 8), code 0
# an all-zero token. Shipped as float32 data so that every decoder reads identical values.
STEP_GRID = (2.0 ** ((np.arange(256) - 128) / 8.0)).astype(np.float32)


def _half(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back, clamped to float16's finite range."""
    return t.clamp(-65504.0, 65504.0).half().float()


class Quantizer:
    """Base class; subclasses set ``alphabet``, ``param_names``, ``side_per_token``."""

    param_names: tuple = ()
    side_per_token: int = 0
    extra_channels: int = 0
    alphabet: int = 0

    @property
    def table_alphabet(self) -> int:
        """Alphabet of the probability tables (the extra columns carry byte codes)."""
        return MAX_ALPHABET if self.extra_channels else self.alphabet

    def fit(self, x: torch.Tensor) -> dict:
        """Per-file parameters, each a float16 ``np.ndarray`` of shape ``[C]``."""
        return {}

    def quantize(self, x: torch.Tensor, params: dict):
        """``(symbols uint8 [T, C + extra_channels], side float16 [T, side_per_token] or None)``."""
        raise NotImplementedError

    def dequantize(self, symbols: torch.Tensor, params: dict, side) -> torch.Tensor:
        """float32 ``[T, C]`` reconstruction from symbols and side information."""
        raise NotImplementedError


def _check_bins(spec: dict, lo: int = 2) -> int:
    bins = spec.get("bins")
    if not isinstance(bins, int) or not lo <= bins <= MAX_ALPHABET:
        raise ConfigError(f"'bins' must be an integer in [{lo}, {MAX_ALPHABET}], got {bins!r}")
    return bins


class AbsmaxToken(Quantizer):
    side_per_token = 1

    def __init__(self, spec: dict):
        bins = _check_bins(spec, lo=4)
        self.m = bins // 2 - 1
        self.alphabet = 2 * self.m + 1

    def quantize(self, x, params):
        scale = _half(x.abs().amax(dim=1))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x * (self.m / safe)[:, None] + self.m).clamp_(0, 2 * self.m)
        side = scale.half().numpy().reshape(-1, 1)
        return q.to(torch.uint8).numpy(), side

    def dequantize(self, symbols, params, side):
        scale = torch.from_numpy(np.array(side[:, 0], dtype=np.float32))
        return (symbols.float() - self.m) * (scale / self.m)[:, None]


class Uniform(Quantizer):
    def __init__(self, spec: dict):
        bins = _check_bins(spec, lo=2)
        step = spec.get("step")
        if not isinstance(step, (int, float)) or not 0 < step <= 64:
            raise ConfigError(f"'step' must be a number in (0, 64], got {step!r}")
        self.scale = spec.get("scale", "channel")
        if self.scale not in ("channel", "token"):
            raise ConfigError(f"'scale' must be 'channel' or 'token', got {self.scale!r}")
        self.step = float(step)
        self.r = (bins - 1) // 2
        self.alphabet = 2 * self.r + 1
        self.param_names = ("mean", "step") if self.scale == "channel" else ()
        self.extra_channels = 1 if self.scale == "token" else 0

    def fit(self, x):
        if self.scale == "token":
            return {}
        mean = _half(x.mean(dim=0))
        # Median absolute deviation, not std: a few outlier tokens (the attention sink)
        # would otherwise inflate every step of the channel. 1.4826 maps MAD to std.
        spread = (x - mean).abs().median(dim=0).values * 1.4826
        step = _half(spread * self.step)
        # A constant channel has no spread; any positive step reproduces it from the mean.
        step = torch.where(step > 0, step, torch.ones_like(step))
        return {"mean": mean.half().numpy(), "step": step.half().numpy()}

    def quantize(self, x, params):
        if self.scale == "token":
            target = x.pow(2).mean(dim=1).sqrt() * self.step
            code = torch.round(8 * torch.log2(target)) + 128
            code = torch.where(target > 0, code.clamp(1, 255), torch.zeros_like(code))
            code = code.to(torch.uint8)
            step = torch.from_numpy(STEP_GRID)[code.long()][:, None]
            q = torch.round(x / step).clamp_(-self.r, self.r) + self.r
            q = torch.where(code[:, None] == 0, torch.full_like(q, self.r), q)
            return torch.cat([q.to(torch.uint8), code[:, None]], dim=1).numpy(), None
        mean = torch.from_numpy(params["mean"]).float()
        step = torch.from_numpy(params["step"]).float()
        q = torch.round((x - mean) / step).clamp_(-self.r, self.r) + self.r
        return q.to(torch.uint8).numpy(), None

    def dequantize(self, symbols, params, side):
        if self.scale == "token":
            step = torch.from_numpy(STEP_GRID)[symbols[:, -1].long()][:, None]
            return (symbols[:, :-1].float() - self.r) * step
        mean = torch.from_numpy(params["mean"]).float()
        step = torch.from_numpy(params["step"]).float()
        return (symbols.float() - self.r) * step + mean


_TYPES = {"absmax_token": AbsmaxToken, "uniform": Uniform}


def make_quantizer(spec: dict) -> Quantizer:
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ConfigError(f"unknown quantizer {kind!r}; known: {sorted(_TYPES)}")
    return _TYPES[spec["type"]](spec)
