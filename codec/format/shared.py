"""Probability tables shared by many files: what lets a store's entries decode without
building tables of their own.

A store cuts documents into small entries, and each entry carries its own tables; a
reader used to build them (normalize, then the native decode tables) once per entry,
which cost as much as decoding the entry's 256 tokens. The per-token step of the shipped
quantizers makes the symbol statistics of one model and config nearly the same in every
chunk, so a store keeps one :class:`SharedTables` per model, config and tenant, built
from the first document it stores (widened so that other text fits too), and codes
every entry with it when it fits (:meth:`SharedTables.fits`: every symbol the entry uses
is in them, and the entry is at most :data:`MAX_OVERHEAD` larger than with tables of its
own, which it no longer carries). Such an entry is format version 6: its header records
the tables' :func:`digest` instead of a tables section, and a reader needs its store to
resolve it (``kvcodec.open(..., tables=)``; :meth:`kvcodec.store.ChunkStore.open_entry`
does it). The reader's table cache (:class:`kvcodec.format.table_cache.TableCache`)
builds the decode tables of a digest once for all its entries.

The serialized form (a store object) is ``MAGIC``, a little-endian u32 length and a JSON
layout (rows and alphabet per stream), the zstd-compressed packed levels
(:func:`kvcodec.core.tables.pack_levels`), and a CRC-32 of everything before it. It is
read as untrusted input: any mismatch is a :class:`CorruptError`.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass

import numpy as np

from ..core import tables
from ..core.paths import loads_json
from ..core.quant import MAX_ALPHABET
from ..errors import CorruptError
from .bounded import unzstd, zstd
from .container import crc32

MAGIC = b"KVCTAB1\n"
#: How much larger (estimated) an entry may be with the shared tables than with its own:
#: it decodes without building tables, so a little size is worth it.
MAX_OVERHEAD = 0.02
#: What a file's own tables cost per present symbol, after zstd (measured: ~3 bits).
TABLE_BITS = 3
#: Symbols around each row's used span that the shared tables admit too (a fraction of
#: the span's width, at least 2): rarer values in other text still fit.
WIDEN = 0.5
# A serialized layout is small: at most this many bytes of JSON.
_MAX_LAYOUT = 1 << 20


#: What a :func:`digest` looks like (checked wherever one is read from outside).
DIGEST = re.compile(r"[0-9a-f]{40}")


def _max_rows(fp: dict) -> int:
    """The rows shared tables of the model ``fp`` can have: per stream its coded columns,
    at most 4 per channel (lossless fp32), and one."""
    return 2 * fp["num_layers"] * (4 * fp["num_kv_heads"] * fp["head_dim"] + 1)


def max_bytes(fp: dict) -> int:
    """The most bytes serialized tables of the model ``fp`` can take (zstd's worst case:
    the packed levels stored as they are, plus its frame), and at most 1 GiB (``fp`` may
    come from a header's claims)."""
    packed = _max_rows(fp) * (2 + MAX_ALPHABET)
    return min(1 << 30, len(MAGIC) + 4 + _MAX_LAYOUT + packed + packed // 128 + (1 << 10) + 4)


def digest(data: bytes) -> str:
    """The digest files record for serialized shared tables ``data``."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def widen(levels: np.ndarray) -> np.ndarray:
    """``levels`` (uint8 ``[rows, alphabet]``) with every symbol within each row's widened
    span present (absent ones at the lowest level, 1)."""
    lv = np.array(levels, dtype=np.uint8)
    present = lv > 0
    rows, alphabet = lv.shape
    if not rows:
        return lv
    lo = present.argmax(axis=1)
    hi = alphabet - 1 - present[:, ::-1].argmax(axis=1)
    margin = np.maximum(2, np.ceil(WIDEN * (hi - lo + 1))).astype(np.int64)
    cols = np.arange(alphabet)
    inside = (cols >= (lo - margin)[:, None]) & (cols <= (hi + margin)[:, None])
    lv[inside & ~present] = 1
    return lv


@dataclass
class SharedTables:
    """Tables of every stream of one geometry: ``layout`` ``((rows, alphabet), ...)``
    per stream in file order; ``spans`` and ``codes`` per stream, as
    :func:`~kvcodec.core.tables.pack_levels` packs them (what a file's tables section
    holds); ``freqs`` per stream (uint16 ``[rows, alphabet]``, what the coder uses)."""

    layout: tuple
    spans: list
    codes: list
    freqs: list
    levels: list
    data: bytes = b""    # the serialized form (:meth:`to_bytes`)
    digest: str = ""     # what files coded with these tables record: blake2b-160 of data

    def __post_init__(self):
        if not self.data:
            self.data = self.to_bytes()
        self.digest = digest(self.data)

    @classmethod
    def from_levels(cls, levels: list) -> "SharedTables":
        """Shared tables from measured levels per stream, widened (:func:`widen`)."""
        return cls._exact([widen(lv) for lv in levels])

    @classmethod
    def _exact(cls, levels: list, data: bytes = b"") -> "SharedTables":
        spans, codes = [], []
        for lv in levels:
            packed = tables.pack_levels(lv)
            spans.append(packed[:2 * lv.shape[0]])
            codes.append(packed[2 * lv.shape[0]:])
        return cls(tuple((lv.shape[0], lv.shape[1]) for lv in levels), spans, codes,
                   list(tables.native().normalize_many(levels)), levels, data)

    def fits(self, freqs: list, tokens: list) -> bool:
        """Whether a file whose own tables are ``freqs`` (per stream, each coding
        ``tokens`` symbols per row) is to use these instead: the same layout, every
        symbol it codes present here, and the file estimated at most
        :data:`MAX_OVERHEAD` larger than with its own tables (its payload grows by the
        cross-entropy of its own distribution coded with these tables; it no longer
        carries its tables, about :data:`TABLE_BITS` per present symbol)."""
        if tuple(f.shape for f in freqs) != self.layout:
            return False
        present, extra, payload, used = tables.native().table_fit(
            list(freqs), list(self.freqs), [float(n) for n in tokens])
        if not present:
            return False
        own_tables = TABLE_BITS * used + 16 * sum(f.shape[0] for f in freqs)
        return extra - own_tables <= MAX_OVERHEAD * (payload + own_tables)

    def to_bytes(self) -> bytes:
        layout = json.dumps({"layout": [list(x) for x in self.layout]}).encode()
        body = (MAGIC + struct.pack("<I", len(layout)) + layout
                + zstd(b"".join(self.spans) + b"".join(self.codes)))
        return body + struct.pack("<I", crc32(body))

    @classmethod
    def stored(cls, data: bytes, name: str, fp: dict, rel: str) -> "SharedTables":
        """The tables ``data`` a store holds as ``rel`` under their digest ``name``, for
        the model ``fp``: they hash to ``name`` and parse within the rows that model's
        tables can have; CorruptError otherwise."""
        if digest(data) != name:
            raise CorruptError(f"{rel}: checksum mismatch; the object is damaged")
        return cls.from_bytes(data, _max_rows(fp), rel)

    @classmethod
    def from_bytes(cls, data: bytes, max_rows: int, name: str = "shared tables"
                   ) -> "SharedTables":
        """Parse :meth:`to_bytes` output, checked (its CRC, its layout within ``max_rows``
        rows of at most 256 symbols, every table valid); CorruptError otherwise. Tables
        of another geometry parse, and then fit no file (:meth:`fits`)."""
        data = bytes(data)
        head = len(MAGIC) + 4
        if len(data) < head + 4 or not data.startswith(MAGIC):
            raise CorruptError(f"{name}: not a shared tables object")
        if crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
            raise CorruptError(f"{name}: checksum mismatch; the object is damaged")
        (n,) = struct.unpack("<I", data[len(MAGIC):head])
        if n > min(_MAX_LAYOUT, len(data) - head - 4):
            raise CorruptError(f"{name}: layout length {n} out of bounds")
        try:
            layout = tuple((int(r), int(a)) for r, a in loads_json(data[head:head + n])["layout"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptError(f"{name}: invalid layout ({exc})") from None
        rows = sum(r for r, _ in layout)
        if not layout or rows > max_rows or any(r < 0 or not 1 <= a <= MAX_ALPHABET
                                                for r, a in layout):
            raise CorruptError(f"{name}: layout out of bounds")
        raw = unzstd(data[head + n:-4], rows * (2 + MAX_ALPHABET), name)
        try:
            levels = tables.split_levels(raw, layout)
        except ValueError as exc:  # an invalid packing, or a symbol past an alphabet
            raise CorruptError(f"{name}: invalid tables: {exc}") from None
        return cls._exact(levels, data)
