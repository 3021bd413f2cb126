"""Probability tables: data built by one integer-exact function, used by every coder.

The encoder measures each channel's symbol histogram over the whole file and stores it
as *levels*: one byte per symbol, 0 for an absent symbol, else a quarter-octave log2
probability relative to the channel's most frequent symbol (63); this encoder uses
half-octave steps. The native function
``normalize_freqs`` turns levels into frequencies summing to ``2**PROB_BITS`` with
integer arithmetic only, so the CPU and CUDA coders derive bit-identical tables from
the same bytes. Levels cost about 3 bits per occurring symbol after zstd, against ~16
for the raw 16-bit frequencies released CacheGen ships with every chunk.
"""
from __future__ import annotations

import numpy as np

from ..errors import BackendError, ConfigError
from .checks import is_int

# Symbols a table covers at most (a quantizer's alphabet: ``kvcodec.core.quant``).
MAX_ALPHABET = 256
MAX_LEVEL = 63
LEVELS_PER_OCTAVE = 4


def native():
    try:
        from .. import _native
    except ImportError as exc:
        raise BackendError(
            f"the native coder is not built ({exc}); run `pip install -e .` in the kvcodec "
            "checkout (needs a C++17 compiler, cmake and ninja)") from None
    return _native


def threads(n) -> int:
    """A thread count for the native coder: an integer (0 or less: one per core; more
    than 4,096 is 4,096), else a ConfigError (a string or a float was pybind11's
    TypeError, 2**31 too)."""
    if not is_int(n):
        raise ConfigError(f"threads must be an integer (0: one per core), got {n!r:.40}")
    return max(0, min(n, 4096))


def channel_counts(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Histogram per channel: ``symbols [T, C] uint8`` -> ``int64 [C, alphabet]``."""
    t, c = symbols.shape
    flat = symbols.astype(np.int64) + np.arange(c, dtype=np.int64)[None, :] * alphabet
    return np.bincount(flat.ravel(), minlength=c * alphabet).reshape(c, alphabet)


def levels_from_counts(counts: np.ndarray) -> np.ndarray:
    """Quarter-octave log levels ``uint8 [N, A]``; 0 exactly where a count is 0.

    A row of all zeros (a channel with no tokens) gets level 63 on symbol 0 so that it
    still forms a valid table.
    """
    counts = np.asarray(counts, dtype=np.float64)
    peak = counts.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.log2(counts / np.where(peak > 0, peak, 1.0))
    # The format resolves quarter octaves, but the encoder uses every other level: the
    # coding loss is ~0.3% while the tables, which dominate side information, shrink ~25%.
    lv = np.clip(MAX_LEVEL + 2 * np.round(LEVELS_PER_OCTAVE / 2 * rel), 1, MAX_LEVEL)
    lv = np.where(counts > 0, lv, 0).astype(np.uint8)
    empty = peak[:, 0] == 0
    lv[empty, 0] = MAX_LEVEL
    return lv


def freqs_from_levels(levels: np.ndarray) -> np.ndarray:
    """``uint16 [N, A]`` frequencies summing to ``2**PROB_BITS`` per row."""
    return native().normalize_freqs(np.ascontiguousarray(levels, dtype=np.uint8))


def stream_tables(items: list, threads: int = 0) -> list:
    """The writer's tables of many streams at once (native, in parallel, GIL released).

    ``items``: ``(symbols uint8 [T, C], alphabet, groups)`` per stream, ``groups`` as
    :meth:`~kvcodec.core.quant.Quantizer.table_groups` returns it (int64 ``[C]`` or None).
    Returns per stream ``(freqs uint16 [C, alphabet], spans, codes)``: exactly
    :func:`freqs_from_levels` of :func:`levels_from_counts` of the (pooled) histograms,
    and :func:`pack_levels` of those levels split in two, the rows' spans (``2 C`` bytes)
    and their codes.
    """
    return native().stream_tables(list(items), threads)


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical (order-0, per row) entropy of the histograms, in total bits."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(counts > 0, counts / np.where(n > 0, n, 1), 1.0)
    return float(-(counts * np.log2(p)).sum())


def pack_levels(levels: np.ndarray) -> bytes:
    """Compact form of level tables ``uint8 [N, A]`` (before zstd).

    Per row, the span ``[lo, hi]`` of present symbols (two bytes, all rows first), then
    for every row its span's codes, ``64 - level`` for a present symbol and 0 for an
    absent one. Spans are short and the codes smooth, so this zstd-compresses ~20%
    smaller than the raw rows.
    """
    lv = np.ascontiguousarray(levels, dtype=np.uint8)
    present = lv > 0
    lo = present.argmax(axis=1)
    hi = lv.shape[1] - 1 - present[:, ::-1].argmax(axis=1)
    spans = np.stack([lo, hi], axis=1).astype(np.uint8)
    codes = np.where(present, 64 - lv.astype(np.int16), 0).astype(np.uint8)
    cols = np.arange(lv.shape[1])
    in_span = (cols >= lo[:, None]) & (cols <= hi[:, None])
    return spans.tobytes() + codes[in_span].tobytes()  # row by row, each row's span


def unpack_levels(data: bytes, rows: int, alphabet: int) -> np.ndarray:
    """Inverse of :func:`pack_levels` (natively); raises ValueError on data that is not a
    valid packing of ``rows`` tables over ``alphabet`` symbols. Every row it returns has
    its span's ends present and levels in ``[0, MAX_LEVEL]``."""
    return native().unpack_levels(data, rows, alphabet)


class AlphabetError(ValueError):
    """A stream's table has a symbol past its alphabet (``stream``: the stream's index)."""

    def __init__(self, stream: int):
        super().__init__(f"stream {stream} has symbols outside its alphabet")
        self.stream = stream


def split_levels(data: bytes, layout) -> list:
    """Per stream, the levels (uint8 ``[rows, alphabet]``) of packed tables ``data``
    (:func:`pack_levels` of every stream's rows, in order) laid out as ``layout``
    (``(rows, alphabet)`` per stream). ValueError where ``data`` is not a valid packing;
    :class:`AlphabetError` where a stream's table has a symbol past its alphabet."""
    lall = unpack_levels(data, sum(r for r, _ in layout), MAX_ALPHABET)
    out, at = [], 0
    for i, (rows, alphabet) in enumerate(layout):
        lv = lall[at:at + rows]
        if lv[:, alphabet:].any():
            raise AlphabetError(i)
        out.append(np.ascontiguousarray(lv[:, :alphabet]))
        at += rows
    return out
