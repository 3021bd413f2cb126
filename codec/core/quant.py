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
``lossless``
    Bit-exact byte planes of the stored dtype (fp16/bf16: 2 planes, fp32: 4).
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
    clipping range. Fields: ``step``, ``bins`` (<= 256), ``scale``, and optionally
    ``head_scale`` (per-KV-head step multipliers, from ``kvcodec calibrate``).

    ``center: true`` (with ``scale: "token"``; format version 5) fits a per-file
    parameter on the stream's non-sink tokens, ``mean``: each channel's mean, subtracted
    before quantizing and added back after. The per-token step is then a fraction of the
    token's *centered* RMS, so a channel that is mostly a constant offset (large key
    biases: Qwen2.5's layer 0 keys carry channels whose mean is 200x the median channel's
    RMS) no longer sizes every token's step.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .tables import MAX_ALPHABET
# Per-token steps live on this grid: code k in [1, 255] means 2**((k - 128) / 8), code 0
# an all-zero token. Shipped as float32 data so that every decoder reads identical values.
STEP_GRID = (2.0 ** ((np.arange(256) - 128) / 8.0)).astype(np.float32)


def to_fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float16, clamped to its finite range (a larger finite value would become
    infinity)."""
    return t.clamp(-65504.0, 65504.0).half()


def _half(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back, clamped to float16's finite range."""
    return to_fp16(t).float()


def _native():
    from .tables import native

    return native()


def _f32(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 NumPy view (or copy) of ``x``."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


class Quantizer:
    """Base class; subclasses set ``alphabet``, ``param_names``, ``side_per_token``."""

    param_names: tuple = ()
    side_per_token: int = 0
    extra_channels: int = 0
    alphabet: int = 0
    #: True for quantizers that code a transform of the channels (``klt``), whose
    #: decoders need its inverse (``dequant_basis``).
    transformed: bool = False

    def coded_columns(self, channels: int) -> int:
        """Symbol columns per token for ``channels`` channels."""
        return channels + self.extra_channels

    def table_groups(self, channels: int):
        """Columns that share one probability table (an int group id per column), or
        None for a table per column. Sharing is an encoder choice: the file still stores
        a table per column, and identical rows cost zstd almost nothing."""
        return None

    @property
    def table_alphabet(self) -> int:
        """Alphabet of the probability tables (the extra columns carry byte codes)."""
        return MAX_ALPHABET if self.extra_channels else self.alphabet

    def fit(self, x: torch.Tensor) -> dict:
        """Per-file parameters, each a float16 ``np.ndarray`` of shape ``[C]``, of the
        stream's tokens after its attention sinks."""
        return {}

    def quantize(self, x: torch.Tensor, params: dict, step_mult=None):
        """``(symbols uint8 [T, C + extra_channels], side float16 [T, side_per_token] or None)``.

        ``step_mult`` (float ``[T]``, optional) scales each token's step, for quantizers
        that code a per-token step (see :func:`token_step_multipliers`); others ignore it.
        """
        raise NotImplementedError

    def dequantize(self, symbols: torch.Tensor, params: dict, side) -> torch.Tensor:
        """float32 ``[T, C]`` reconstruction from symbols and side information."""
        raise NotImplementedError

    def batch_key(self):
        """Quantizers with equal keys can code several layers in one
        :meth:`quantize_layers` call; None: one layer at a time."""
        return None

    @staticmethod
    def quantize_layers(qs: list, x: torch.Tensor, params: list, step_mults: list,
                        threads: int = 0) -> list:
        """:meth:`quantize` of layer ``i`` of ``x [L, T, C]`` (float32, contiguous) with
        ``qs[i]``, ``params[i]`` and ``step_mults[i]``, for quantizers of equal
        :meth:`batch_key`: a list of ``(symbols, side)``, bit for bit what
        :meth:`quantize` returns layer by layer."""
        return [q.quantize(x[i], p, m) for i, (q, p, m) in enumerate(zip(qs, params, step_mults))]


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

    def quantize(self, x, params, step_mult=None):
        return self.quantize_layers([self], x[None], [params], [step_mult])[0]

    def batch_key(self):
        return AbsmaxToken

    @staticmethod
    def quantize_layers(qs, x, params, step_mults, threads=0):
        # Per layer and token: scale = fp16(absmax), q = round(x * (M / scale) + M)
        # clamped to [0, 2M]. The max is exact in any order and the rest elementwise, so
        # every layer is done at once; ``M / scale`` is what PyTorch computes for it,
        # ``scale.reciprocal() * M``, and the native kernel rounds x * that + M the same.
        m = [q.m for q in qs]
        scale = _half(x.abs().amax(dim=2))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        inv = safe.reciprocal() * torch.tensor(m, dtype=torch.float32)[:, None]
        sym = _native().quantize_absmax(_f32(x), _f32(inv), m, threads)
        side = scale.half().numpy()
        return [(sym[i], side[i].reshape(-1, 1)) for i in range(len(qs))]

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
        heads = spec.get("head_scale")
        if heads is not None and (not isinstance(heads, list) or not heads or not all(
                isinstance(h, (int, float)) and 0 < h <= 64 for h in heads)):
            raise ConfigError(f"'head_scale' must be a list of positive multipliers, got {heads!r}")
        self.head_scale = heads
        self._mults = {}  # channels -> head_mult_array
        self.center = spec.get("center", False)
        if self.center not in (True, False) or (self.center and self.scale != "token"):
            raise ConfigError(f"'center' must be true or false, and true only with scale "
                              f"'token'; got {self.center!r:.40}")
        self.r = (bins - 1) // 2
        self.alphabet = 2 * self.r + 1
        self.param_names = (("mean", "step") if self.scale == "channel" else
                            ("mean",) if self.center else ())
        self.extra_channels = 1 if self.scale == "token" else 0

    def fit(self, x):
        if self.scale == "token":
            return self._fit_centered(x) if self.center else {}
        mean = _half(x.mean(dim=0))
        # Median absolute deviation, not std: a few outlier tokens (the attention sink)
        # would otherwise inflate every step of the channel. 1.4826 maps MAD to std.
        spread = (x - mean).abs().median(dim=0).values * 1.4826
        step = _half(spread * self.step)
        # A constant channel has no spread; any positive step reproduces it from the mean.
        step = torch.where(step > 0, step, torch.ones_like(step))
        return {"mean": mean.half().numpy(), "step": step.half().numpy()}

    def _fit_centered(self, x: torch.Tensor) -> dict:
        """``mean`` per channel, float16, of ``x [T, C]``."""
        return {"mean": _half(x.mean(dim=0)).half().numpy()}

    def head_mult_array(self, channels: int) -> np.ndarray:
        """:meth:`head_mult` as a float32 NumPy array, built once per width (the reader
        asks for it per stream of every file; read-only)."""
        got = self._mults.get(channels)
        if got is None:
            got = self._mults[channels] = np.ascontiguousarray(self.head_mult(channels).numpy())
            got.flags.writeable = False
        return got

    def dequant_mult(self, channels: int) -> np.ndarray:
        """The native dequantizer's per-column step multipliers (read-only)."""
        return self.head_mult_array(channels)

    def dequant_basis(self, channels: int):
        """The native dequantizer's inverse transform (``klt``), or None."""
        return None

    def head_mult(self, channels: int) -> torch.Tensor:
        """Per-channel step multipliers ``[C]`` from ``head_scale`` (1 without it)."""
        if self.head_scale is None:
            return torch.ones(channels)
        if channels % len(self.head_scale):
            raise ConfigError(f"head_scale has {len(self.head_scale)} entries, which do not "
                              f"divide {channels} channels")
        mult = np.asarray(self.head_scale, dtype=np.float32)
        return torch.from_numpy(np.repeat(mult, channels // len(self.head_scale)))

    def quantize(self, x, params, step_mult=None):
        if self.scale == "token":
            return self.quantize_layers([self], x[None], [params], [step_mult])[0]
        mean = torch.from_numpy(params["mean"]).float()
        step = torch.from_numpy(params["step"]).float()
        q = torch.round((x - mean) / step).clamp_(-self.r, self.r) + self.r
        return q.to(torch.uint8).numpy(), None

    def batch_key(self):
        return (Uniform, "token", self.center) if self.scale == "token" else None

    @staticmethod
    def quantize_layers(qs, x, params, step_mults, threads=0):
        if qs[0].scale != "token":
            return Quantizer.quantize_layers(qs, x, params, step_mults, threads)
        # Per token: target = rms * step (* step_mult), code = round(8 log2 target) + 128
        # (0 for target 0), step = STEP_GRID[code] * head_mult, q = round(x / step)
        # clamped to [-R, R], plus R. The mean and log2 run layer by layer on [T], as a
        # single layer's quantize does: PyTorch vectorizes all but a tail of each call, and
        # its vector and scalar log2 may differ in the last bit, so batching them would
        # move the tail. Everything else is elementwise and exactly rounded: batched.
        x, code = Uniform.token_codes(qs, x, params, step_mults)
        mult = torch.stack([q.head_mult(x.shape[2]) for q in qs])
        sym = _native().quantize_token(_f32(x), code.numpy(), STEP_GRID, _f32(mult),
                                       [q.r for q in qs], threads)
        return [(sym[i], None) for i in range(len(qs))]

    @staticmethod
    def token_codes(qs, x, params, step_mults, center=None):
        """``(x centered where the quantizers center (or ``center`` says), per-token step
        codes uint8 [L, T])`` of ``x [L, T, C]`` (see :meth:`quantize_layers`)."""
        n = len(qs)
        if qs[0].center if center is None else center:
            x = x - torch.stack([torch.from_numpy(p["mean"]).float() for p in params])[:, None]
        sq = x.pow(2)
        rms = torch.stack([sq[i].mean(dim=1) for i in range(n)]).sqrt()
        target = rms * torch.tensor([q.step for q in qs], dtype=torch.float32)[:, None]
        if any(m is not None for m in step_mults):
            target = target * torch.stack([torch.ones(x.shape[1]) if m is None else m.float()
                                           for m in step_mults])
        log = torch.stack([torch.log2(target[i]) for i in range(n)])
        code = torch.round(8 * log) + 128
        code = torch.where(target > 0, code.clamp(1, 255), torch.zeros_like(code))
        return x, code.to(torch.uint8)

    def dequantize(self, symbols, params, side):
        if self.scale == "token":
            step = torch.from_numpy(STEP_GRID)[symbols[:, -1].long()][:, None]
            x = (symbols[:, :-1].float() - self.r) * (step * self.head_mult(
                symbols.shape[1] - 1))
            if self.center:
                x = x + torch.from_numpy(params["mean"]).float()
            return x
        mean = torch.from_numpy(params["mean"]).float()
        step = torch.from_numpy(params["step"]).float()
        return (symbols.float() - self.r) * step + mean


class Lossless(Quantizer):
    """Bit-exact: the stored dtype's bytes as symbols, one plane per byte position.

    A 16-bit value becomes two symbols, its high byte (sign, exponent, top mantissa bits:
    skewed, cheap to code) and its low byte (near uniform); each (plane, channel) gets
    its own table. Columns are ``[plane 0 of all C channels, plane 1, ...]``, little
    endian planes in order, so the output is ``[T, C * itemsize]``.
    """

    alphabet = MAX_ALPHABET

    def __init__(self, spec: dict, dtype: torch.dtype = torch.float16):
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.extra_channels = None  # depends on C; see coded_columns

    def coded_columns(self, channels: int) -> int:
        return channels * self.itemsize

    def table_groups(self, channels: int):
        # The most significant byte (sign, exponent) depends on each channel's magnitude:
        # a table per channel. Lower bytes are near uniform: one table per plane, else
        # 256-entry tables per channel would cost more than they save.
        groups = np.arange(channels * self.itemsize)
        for plane in range(self.itemsize - 1):
            groups[plane * channels:(plane + 1) * channels] = plane * channels
        return groups

    def quantize(self, x, params, step_mult=None):
        return self.quantize_layers([self], x[None], [params], [step_mult])[0]

    def batch_key(self):
        return (Lossless, self.dtype)

    @staticmethod
    def quantize_layers(qs, x, params, step_mults, threads=0):
        q = qs[0]
        n, t, c = x.shape
        raw = x.to(q.dtype).contiguous().view(torch.uint8)  # [L, T, C * itemsize], interleaved
        planes = raw.reshape(n, t, c, q.itemsize).permute(0, 1, 3, 2).reshape(
            n, t, c * q.itemsize).contiguous().numpy()
        return [(planes[i], None) for i in range(n)]

    def dequantize(self, symbols, params, side):
        t, c = symbols.shape[0], symbols.shape[1] // self.itemsize
        raw = torch.empty(t, c, self.itemsize, dtype=torch.uint8)  # canonical strides: view()
        raw.copy_(symbols.reshape(t, self.itemsize, c).permute(0, 2, 1))  # refused 1 channel's
        return raw.view(self.dtype).reshape(t, c).float()


def fit_stream(q: Quantizer, x: torch.Tensor, n_sink: int = 0) -> dict:
    """``q``'s per-file parameters for stream ``x [T, C]`` whose first ``n_sink`` rows are
    attention sinks (kept exactly, so not fitted on, unless they are all there is; an
    empty stream fits one zero row)."""
    if len(x) > n_sink:
        x = x[n_sink:]
    elif not len(x):
        x = torch.zeros(1, x.shape[1])
    return q.fit(x)


def validate_token_importance(spec) -> None:
    """``token_importance`` config field: ``{"beta", "min", "max"}`` or null."""
    if spec is None:
        return
    ok = (isinstance(spec, dict) and set(spec) <= {"beta", "min", "max"}
          and all(isinstance(spec.get(k), (int, float)) for k in ("beta", "min", "max")))
    if not ok or not (0 <= spec["beta"] <= 2 and 0 < spec["min"] <= 1 <= spec["max"] <= 16):
        raise ConfigError("token_importance must be {\"beta\": 0..2, \"min\": (0, 1], "
                          f"\"max\": [1, 16]}}, got {spec!r}")


def token_step_multipliers(importance: torch.Tensor, spec: dict, skip: int = 0) -> torch.Tensor:
    """Per-token step multipliers ``[T]`` from one layer's attention importance ``[T]``.

    ``m_t = clamp((imp_t / geomean(imp))^-beta, min, max)``: attended tokens get finer
    steps, ignored ones coarser, at about the same total rate (log-mean of ``m`` ~ 0
    before clamping). The first ``skip`` tokens (stored exactly as sinks) do not enter
    the mean. This is an encoder choice: the steps it yields are coded in the payload.
    """
    r = importance.float().clamp(min=1e-9).log()
    rest = r[skip:] if r.numel() > skip else r
    r = r - rest.mean()
    return (-float(spec["beta"]) * r).exp().clamp(float(spec["min"]), float(spec["max"]))


_TYPES = {"absmax_token": AbsmaxToken, "uniform": Uniform, "lossless": Lossless}


def register_quantizer(name: str, cls) -> None:
    """Make ``cls(spec)`` the quantizer of type ``name`` (:mod:`.klt` registers itself
    when :mod:`kvcodec.core` is imported)."""
    _TYPES[name] = cls


def make_quantizer(spec: dict, dtype: torch.dtype = torch.float16) -> Quantizer:
    """Quantizer for a config spec; ``dtype`` is the cache's (used by ``lossless``)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) \
            or spec["type"] not in _TYPES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ConfigError(f"unknown quantizer {kind!r:.50}; known: {sorted(_TYPES)}")
    if spec["type"] == "lossless":
        return Lossless(spec, dtype)
    return _TYPES[spec["type"]](spec)
