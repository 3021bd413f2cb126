"""``klt``: per-token-step uniform quantization in a decorrelating basis (format v7).

Each KV head's centered vectors ``x - mean`` (keys before RoPE), divided by the
config's per-channel step multipliers (``head_scale``: the query weights), are turned
into the eigenbasis of their covariance, fitted once on calibration text and kept in a
shared :class:`~kvcodec.core.codebook.Codebook`: ``y = ((x - mean) / m) U``. The
components are quantized with one step per token (the token's code, as ``uniform``
codes it), so components of small variance round to zero and cost almost nothing:
reverse water-filling, done by the entropy coder. The decoder computes
``x = y M + mean`` with ``M = U^T diag(m)`` in the same native pass that dequantizes
and re-applies RoPE (:mod:`kvcodec.format.plan`).

Spec: ``{"type": "klt", "step", "bins", "head_scale"?, "rms"?, "basis": {"codebook":
digest, "index": i}}`` (``scale`` is always ``"token"`` and the stream always centered).
``rms`` sizes each token's step: ``"centered"`` (default; as a centered ``uniform``
stream) or ``"raw"``, the token's RMS before centering, which is what a calibration
of uncentered streams chose its steps for: a ``klt`` config made from it
(:func:`kvcodec.quality.transform.klt_config`) keeps every token's step and changes only
what is coded with it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CodebookError, ConfigError, CorruptError
from . import codebook
from .quant import STEP_GRID, Quantizer, Uniform, register_quantizer
from .tables import native


class KLT(Uniform):
    """A ``klt`` stream's quantizer (see the module docstring)."""

    transformed = True
    quantize_layers = staticmethod(Quantizer.quantize_layers)  # one layer at a time

    def __init__(self, spec: dict):
        if spec.get("scale", "token") != "token" or spec.get("center", True) is not True:
            raise ConfigError("a klt quantizer has per-token steps and centered streams "
                              "('scale': 'token', 'center': true, or neither field)")
        super().__init__({**spec, "type": "uniform", "scale": "token", "center": True})
        basis = spec.get("basis")

        def small(v, hi):
            return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < hi

        if not (isinstance(basis, dict) and {"codebook", "index"} <= set(basis)
                <= {"codebook", "index", "head"} and codebook.valid_digest(basis["codebook"])
                and small(basis["index"], codebook.MAX_COUNT)
                and small(basis.get("head", 0), codebook.MAX_HEADS)):
            raise ConfigError("'basis' must be {\"codebook\": <64 hex digits>, \"index\": "
                              f"0..{codebook.MAX_COUNT - 1}}} (and, for one head's stream, "
                              f"\"head\"), got {basis!r:.120}")
        self.rms = spec.get("rms", "centered")
        if self.rms not in ("centered", "raw"):
            raise ConfigError(f"'rms' must be 'centered' or 'raw', got {self.rms!r:.40}")
        self.codebook = basis["codebook"]
        self.index = basis["index"]
        self.head = basis.get("head")  # one KV head's stream (evicted caches), or all
        self._mats = {}  # (what, channels) -> read-only float32 arrays

    def batch_key(self):
        return None

    def dequant_mult(self, channels: int) -> np.ndarray:
        got = self._mats.get(("ones", channels))
        if got is None:
            got = self._mats[("ones", channels)] = np.ones(channels, np.float32)
            got.flags.writeable = False
        return got

    def dequant_basis(self, channels: int) -> np.ndarray:
        return self.inverse(channels)

    def matrices(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """``(forward, inverse)``, float32 ``[heads, d, d]``: ``y = (x - mean) F`` per
        head (the encoder's), and ``x = y M + mean``, ``M = U^T diag(m)`` (the
        decoder's). ``F`` is ``M``'s inverse computed in float64, so an unquantized ``y``
        comes back to ``x`` up to float32 rounding although the stored basis is float16;
        a basis that has none (a crafted codebook) is a CodebookError for the encoder
        only: decoding needs ``M`` alone."""
        inv = self.inverse(channels)
        fwd = self._mats.get(("forward", channels))
        if fwd is None:
            try:
                fwd = np.linalg.inv(inv.astype(np.float64))
            except np.linalg.LinAlgError:
                fwd = None
            if fwd is None or not np.isfinite(fwd).all():
                raise CodebookError(f"codebook {self.codebook[:16]}: basis {self.index} "
                                    "cannot be inverted, so nothing can be coded with it")
            fwd = self._mats[("forward", channels)] = fwd.astype(np.float32)
            fwd.flags.writeable = False
        return fwd, inv

    def inverse(self, channels: int) -> np.ndarray:
        """The decoder's ``M`` (see :meth:`matrices`), float32 ``[heads, d, d]``."""
        got = self._mats.get(channels)
        if got is None:
            book = codebook.get(self.codebook)
            u = book.basis(self.index)
            heads = book.heads
            if self.head is not None:
                if self.head >= heads:
                    raise CodebookError(f"codebook {self.codebook[:16]} has {heads} heads; a "
                                        f"stream asks for head {self.head}")
                u, heads = u[self.head:self.head + 1], 1
            if heads * book.head_dim != channels:
                raise CodebookError(
                    f"codebook {self.codebook[:16]} holds bases of {heads} heads x "
                    f"{book.head_dim}; this stream has {channels} channels (another model?)")
            m = self.head_mult_array(channels).reshape(heads, 1, book.head_dim)
            got = np.ascontiguousarray(np.transpose(u, (0, 2, 1)) * m, dtype=np.float32)
            got.flags.writeable = False
            self._mats[channels] = got
        return got

    def quantize(self, x, params, step_mult=None):
        _, code = Uniform.token_codes([self], x[None], [params], [step_mult],
                                      center=self.rms == "centered")
        xc = x[None] - torch.from_numpy(params["mean"]).float()
        fwd, _ = self.matrices(x.shape[1])
        h, d = fwd.shape[0], fwd.shape[1]
        y = torch.bmm(xc[0].reshape(-1, h, d).transpose(0, 1), torch.tensor(fwd))
        y = y.transpose(0, 1).reshape(x.shape)
        code = self.unclipped(code[0], y.abs().amax(dim=1))[None]
        y = np.ascontiguousarray(y[None].numpy(), dtype=np.float32)
        sym = native().quantize_token(y, code.numpy(), STEP_GRID,
                                       self.dequant_mult(x.shape[1])[None], [self.r], 0)
        return sym[0], None

    def unclipped(self, code: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Step codes ``[T]`` made coarser where a token's largest component ``peak``
        would fall outside the quantizer's range: the first components hold most of a
        vector's energy, so a fine step (finer rate control, an attended token) could
        clip them, which costs far more than a coarser step for that token. The code is
        in the payload; decoders need nothing."""
        grid = torch.from_numpy(STEP_GRID)
        code = code.long()
        # Code 0 (a token whose RMS is 0) codes zeros; centered, its components are not.
        fit = (torch.ceil(8 * torch.log2(peak.clamp_min(1e-30) / self.r)) + 128).clamp(1, 255)
        code = torch.where((code == 0) & (peak > 0), fit.long(), code)
        for _ in range(2):  # once more where the grid's rounding left it a hair short
            over = (code > 0) & (peak > self.r * grid[code])
            if not bool(over.any()):
                break
            need = torch.ceil(8 * torch.log2(peak / (self.r * grid[code])))
            code = torch.where(over, (code + need.clamp_min(1).long()).clamp(1, 255), code)
        return code.to(torch.uint8)

    def dequantize(self, symbols, params, side):
        """Through the native dequantizer (the same operations, in the same order, as
        every decode path: one implementation)."""
        c = symbols.shape[1] - 1
        inv = self.inverse(c)
        h, d = inv.shape[0], inv.shape[1]
        sym = np.ascontiguousarray(symbols.numpy(), dtype=np.uint8)
        out = np.empty((h, sym.shape[0], d), dtype=np.float32)
        mean = np.ascontiguousarray(params["mean"], dtype=np.float32)
        err = native().dequant_symbols(sym, (STEP_GRID, self.dequant_mult(c), self.r, h, out,
                                              None, None, mean, 0, inv))
        if err:
            raise CorruptError(err)
        return torch.from_numpy(out).permute(1, 0, 2).reshape(sym.shape[0], c)


register_quantizer("klt", KLT)
