"""Evicted caches in a .kvc file (format version 4): the ``kept`` section and the
per-head streams.

An evicted cache (``KVCache.kept``, made by :mod:`kvcodec.evict`) holds, per layer and
KV head, its own subset of the ``T`` positions. Its header says ``"evicted": true`` and
its ``kept`` section records the subsets: per (layer, head), in that order, a bitmap of
the ``T`` positions (``np.packbits``, most significant bit first, each row padded to
whole bytes with zero bits), zstd-compressed.

Only kept tokens are coded: one stream per (layer, kind, head), the head's kept rows in
position order (``head_dim`` channels), with its own quantizer parameters and tables.
The chunk index stays by true position: chunk ``c`` of a stream holds its rows whose
positions lie in ``[c * chunk_tokens, (c + 1) * chunk_tokens)`` (maybe none), each coded
as a job of its own, so a chunk range still decodes the tokens of a token range.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError


def kept_bytes(layers: int, heads: int, length: int) -> int:
    """Size of the ``kept`` section before zstd."""
    return layers * heads * ((length + 7) // 8)


def pack_kept(kept: list, length: int) -> bytes:
    """The ``kept`` section (before zstd) of per-layer positions ``[kv_heads, slots]``
    (``KVCache.kept``: ascending, ``-1`` in unused slots) over ``length`` positions."""
    bits = np.zeros((len(kept), kept[0].shape[0], length), dtype=bool)
    for l, pos in enumerate(kept):
        head, slot = torch.nonzero(pos >= 0, as_tuple=True)
        bits[l, head.numpy(), pos[head, slot].numpy()] = True
    return np.packbits(bits, axis=-1).tobytes()


def unpack_kept(raw: bytes, layers: int, heads: int, length: int) -> np.ndarray:
    """The bitmap ``uint8 [layers, heads, ceil(length / 8)]`` of a ``kept`` section of
    :func:`kept_bytes` bytes; ValueError where a bit past ``length`` is set."""
    bitmap = np.frombuffer(raw, dtype=np.uint8).reshape(layers, heads, (length + 7) // 8)
    if length % 8 and np.any(bitmap[:, :, -1] & ((1 << (8 - length % 8)) - 1)):
        raise ValueError(f"positions past the cache's {length} tokens are marked kept")
    return bitmap


def kept_counts(bitmap: np.ndarray) -> np.ndarray:
    """int64 ``[layers, heads]``: the tokens each head keeps."""
    return np.stack([np.unpackbits(rows, axis=-1).sum(axis=-1, dtype=np.int64)
                     for rows in bitmap])


def chunk_rows(bitmap: np.ndarray, length: int, chunk: int) -> np.ndarray:
    """int64 ``[layers, heads, chunks]``: the tokens each head keeps in each chunk."""
    starts = np.arange(0, length, chunk)
    return np.stack([np.add.reduceat(np.unpackbits(rows, axis=-1, count=length), starts,
                                     axis=1, dtype=np.int64) for rows in bitmap])


def positions(bits: np.ndarray, length: int, lo: int, hi: int) -> np.ndarray:
    """Ascending int64 positions in ``[lo, hi)`` that one head's bitmap row keeps."""
    kept = np.unpackbits(bits, count=length)[lo:hi]
    return np.flatnonzero(kept) + lo


def chunk_bounds(pos: np.ndarray, chunk: int, n_chunks: int) -> np.ndarray:
    """Row bounds ``[n_chunks + 1]``: chunk ``c`` of ascending positions ``pos`` is rows
    ``bounds[c]:bounds[c + 1]``."""
    return np.searchsorted(pos, np.arange(n_chunks + 1, dtype=np.int64) * chunk)


def head_spec(spec: dict, head: int, heads: int, head_dim: int) -> dict:
    """The quantizer spec of one head's stream: ``head_scale`` (step multipliers spread
    over a layer's ``heads * head_dim`` channels, see :class:`~kvcodec.core.quant.Uniform`)
    cut to that head's channels, one value where they are alike (the calibrated configs'
    one per KV head). The multipliers are float32 either way, so they equal the dense
    layout's bit for bit. A ``klt`` stream's basis names the head it takes."""
    if spec.get("type") == "klt":  # its head's basis
        spec = dict(spec, basis=dict(spec.get("basis") or {}, head=head))
    scale = spec.get("head_scale")
    if scale is None:
        return spec
    channels = heads * head_dim
    if channels % len(scale):
        raise ConfigError(f"head_scale has {len(scale)} entries, which do not divide "
                          f"{channels} channels")
    mult = np.repeat(np.asarray(scale, dtype=np.float32), channels // len(scale))
    own = mult[head * head_dim:(head + 1) * head_dim]
    return dict(spec, head_scale=[float(own[0])] if np.all(own == own[0]) else own.tolist())
