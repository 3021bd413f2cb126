"""What a .kvc header and index hold, and the caps every reader and writer enforce.

The caps bound what an untrusted file can make a reader allocate; the writer refuses
caches over them, so every file it writes can be read back.
"""
from __future__ import annotations

import operator
import struct

import torch

from ..core import tables
from ..errors import ShapeError

INDEX_ENTRY = struct.Struct("<QIII")  # payload offset, side bytes, blob bytes, CRC-32
MAX_LAYERS = 4096
MAX_TOKENS = 1 << 24
MAX_CHANNELS = 65535
MAX_ELEMENTS = 1 << 34
MAX_CONFIG_BYTES = 16 << 20
MAX_ANCHOR_TOKENS = 1024  # the fixed prefix a position-independent chunk was computed behind
# An evicted file's kept bitmap (layers x heads x tokens bits, 128 MiB): every cache under
# MAX_ELEMENTS whose head_dim is 8 or more fits.
MAX_KEPT_BITS = 1 << 30
# An evicted file codes a stream per (layer, kind, head), and a reader builds one object
# per stream before reading anything else: 2 x 512 layers x 128 KV heads is far beyond
# any model.
MAX_EVICTED_STREAMS = 1 << 17
# Float dtypes a cache may have, by their header names.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def coder_info() -> dict:
    """The coder a file was written with; a reader decodes only its own."""
    nat = tables.native()
    return {"name": "rans32x16", "bitstream": int(nat.BITSTREAM_VERSION),
            "prob_bits": int(nat.PROB_BITS), "lanes": int(nat.LANES),
            "table_levels_per_octave": tables.LEVELS_PER_OCTAVE}


def check_geometry(n_layers: int, n_tokens: int, channels: int) -> None:
    """Raise ShapeError if a cache of this geometry is over the format caps."""
    if n_layers > MAX_LAYERS or n_tokens > MAX_TOKENS or channels > MAX_CHANNELS:
        raise ShapeError(
            f"{n_layers} layers x {n_tokens} tokens x {channels} channels exceeds the format "
            f"limits ({MAX_LAYERS} layers, {MAX_TOKENS} tokens, {MAX_CHANNELS} channels)")
    if 2 * n_layers * n_tokens * channels > MAX_ELEMENTS:
        raise ShapeError(f"a cache of more than {MAX_ELEMENTS} elements is over the format cap")


def check_kept_geometry(n_layers: int, heads: int, n_tokens: int) -> None:
    """Raise ShapeError if an evicted cache's kept bitmap would be over the format cap."""
    if n_layers * heads * n_tokens > MAX_KEPT_BITS:
        raise ShapeError(f"an evicted cache of {n_layers} layers x {heads} heads x {n_tokens} "
                         f"tokens is over the format cap of {MAX_KEPT_BITS} kept-position bits")
    if 2 * n_layers * heads > MAX_EVICTED_STREAMS:
        raise ShapeError(f"an evicted cache of {n_layers} layers x {heads} heads needs "
                         f"{2 * n_layers * heads} streams, over the format cap of "
                         f"{MAX_EVICTED_STREAMS}")


def head_rows(first: int, rows: int, chunk: int) -> int:
    """Rows of a span of ``rows`` tokens from position ``first`` that lie in the chunk it
    starts inside (0 when it starts on a chunk boundary). The coder's chunks start at
    multiples of ``chunk``, so a sliding window's span codes those rows as a job of their
    own, then whole chunks: the writer and the reader both split spans this way."""
    return min((-first) % chunk, rows)


def chunk_range(chunks, num_chunks: int) -> range:
    """The chunks a request names, as a non-empty range within ``0..num_chunks - 1``:
    None (all), an integer (numpy's too), a slice, a range or a contiguous increasing
    list of integers; anything else is a ShapeError (a string, a float or a numpy
    integer was a TypeError, and an empty slice said "range(1, 1) is outside 0..0")."""
    if chunks is None:
        return range(num_chunks)
    asked = chunks
    try:
        if isinstance(chunks, slice):
            chunks = range(num_chunks)[chunks]
        elif not isinstance(chunks, range):
            chunks = [operator.index(c) for c in (
                [chunks] if hasattr(chunks, "__index__") else chunks)]
            if not chunks or chunks != list(range(chunks[0], chunks[-1] + 1)):
                raise ShapeError("chunks must be a contiguous, increasing range")
            chunks = range(chunks[0], chunks[-1] + 1)
    except TypeError:
        raise ShapeError(f"chunks must be integers, a slice or a range, got "
                         f"{asked!r:.40}") from None
    if len(chunks) == 0 or chunks.step != 1 or chunks[0] < 0 or chunks[-1] >= num_chunks:
        raise ShapeError(f"chunks {asked!r:.60} are not a range within 0..{num_chunks - 1}")
    return chunks
