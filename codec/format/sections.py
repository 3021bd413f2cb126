"""A .kvc file's sections, read lazily and checked before use: the chunk index, the
quantizer parameters and probability tables, the fp16 sink rows, and payload items
(each verified against its CRC as it is read)."""
from __future__ import annotations

import numpy as np
import torch

from ..core import tables
from ..core.quant import MAX_ALPHABET
from ..core.streams import KINDS
from ..errors import CorruptError, FormatError
from .container import Reader
from .bounded import read_zstd
from .header import FileHeader
from .kept import chunk_rows
from .spec import INDEX_ENTRY
from .table_cache import TABLES, BuiltTables


# Index layouts (rows and coded columns of every item) -> each item's largest blob.
_LIMITS: dict = {}


class SectionSource:
    """The sections of a file whose header ``meta`` (a :class:`FileHeader`) is checked,
    read from ``source`` on first use and verified: everything a decode plan needs."""

    # Needed items closer than this in the payload are read together, with what lies between.
    READ_GAP = 1 << 18

    def __init__(self, meta: FileHeader, source: Reader, shared=None):
        self.meta, self.source = meta, source
        # digest -> SharedTables, for a file coded with its store's tables (format v6).
        self.shared = shared
        self._sinks = self._sink_rows = self._index = self._items = self._checks = None
        self._params = self._param_rows = self._levels = self._freqs = None
        self._built = self._dtables = None
        self._blobs = {}    # chunk -> its checked blobs (chunk_blobs)
        self.chunk_rows = None  # evicted files: rows each (layer, head) keeps per chunk

    def sinks(self) -> torch.Tensor:
        """fp16 sink rows as float32 ``[streams, sink_tokens, stream channels]``: row
        ``i`` of a stream is its layer's ``i``-th held token, in an evicted file position
        ``i`` (zero where that is not an attention sink, or not kept)."""
        if self._sinks is None:
            self._sinks = torch.from_numpy(self.sink_rows().copy()).float()
        return self._sinks

    def sink_rows(self) -> np.ndarray:
        """The sink rows as the file holds them: float16 ``[streams, sink_tokens,
        stream channels]`` (read-only)."""
        if self._sink_rows is None:
            m = self.meta
            raw = self.source.read_section("sinks")
            n = m.sink_tokens * m.stream_channels
            if len(raw) != 2 * n * len(m.streams):
                raise CorruptError(f"{m.name}: sinks section has the wrong size")
            rows = np.frombuffer(raw, dtype="<f2").reshape(
                len(m.streams), m.sink_tokens, m.stream_channels)
            if np.isnan(rows).any():  # encoders refuse NaN input: only a crafted file
                raise CorruptError(f"{m.name}: sinks section holds NaN")
            self._sink_rows = rows
        return self._sink_rows

    def index(self) -> np.ndarray:
        """The chunk index, one record (``off``, ``side``, ``blob``, ``crc``) per payload
        item, chunk-major: checked to tile the payload and to be within the coder's
        bounds for each item's rows and columns."""
        if self._index is not None:
            return self._index
        m = self.meta
        n_items = m.num_chunks * len(m.streams)
        raw = self.source.read_section("index")
        if len(raw) != n_items * INDEX_ENTRY.size:
            raise CorruptError(f"{m.name}: index has {len(raw)} bytes, expected "
                               f"{n_items * INDEX_ENTRY.size}")
        idx = np.frombuffer(raw, dtype=np.dtype([("off", "<u8"), ("side", "<u4"),
                                                  ("blob", "<u4"), ("crc", "<u4")]))
        ends = idx["off"] + idx["side"].astype(np.uint64) + idx["blob"]
        _, payload_len = self.source.section_bounds("payload")
        if n_items and (idx["off"][0] != 0 or np.any(idx["off"][1:] != ends[:-1])
                        or int(ends[-1]) != payload_len):
            raise CorruptError(f"{m.name}: index entries do not tile the payload")
        side, limit = self._item_bounds()
        bad = np.flatnonzero(idx["side"] != side)
        if bad.size:
            raise CorruptError(f"{m.name}: chunk {bad[0] // len(m.streams)} side "
                               "information has the wrong size")
        bad = np.flatnonzero(idx["blob"] > limit)
        if bad.size:
            raise CorruptError(f"{m.name}: chunk {bad[0] // len(m.streams)} blob is "
                               "larger than possible")
        self._index = idx
        return idx

    def _item_bounds(self) -> tuple:
        """Per payload item, its side information's size and its blob's largest: set by
        the rows and columns it codes, of which few pairs occur; the same in every entry
        of a store, so kept per layout (with the header's shared quantizers where the
        file is dense: those of one config and geometry, which set everything but the
        layer spans)."""
        m = self.meta
        key = ("item bounds", m.stream_channels, m.num_tokens, m.chunk_tokens, tuple(m.starts))
        got = m.shared_parse.get(key) if not m.evicted else None
        if got is not None:
            return got
        rows = self._item_rows().ravel()
        quant = [m.quant[s] for s in m.streams]
        side = rows * np.tile([2 * q.side_per_token for q in quant], m.num_chunks)
        cols = np.tile([m.coded_columns(q) for q in quant], m.num_chunks)
        lkey = (rows.tobytes(), cols.tobytes())
        limit = _LIMITS.get(lkey)
        if limit is None:
            pairs, inverse = np.unique(np.stack([rows, cols]), axis=1, return_inverse=True)
            nat = tables.native()
            limit = np.array([nat.max_encoded_size(int(r), int(c)) if r else 0
                              for r, c in pairs.T], dtype=np.int64)[inverse.ravel()]
            if len(_LIMITS) >= 64:
                _LIMITS.clear()
            _LIMITS[lkey] = limit
        if not m.evicted:
            if len(m.shared_parse) >= 64:  # layouts of many document lengths
                for k in [k for k in list(m.shared_parse) if k[0] == "item bounds"]:
                    m.shared_parse.pop(k, None)  # list(): other threads may add keys
            m.shared_parse[key] = (side, limit)
        return side, limit

    def _item_rows(self) -> np.ndarray:
        """int64 ``[chunks, streams]``: the rows each payload item codes (called once the
        index, which is larger, is known to be in the file)."""
        m = self.meta
        if m.evicted:  # streams (layer, kind, head): that head's kept rows
            # Rows each (layer, head) keeps in each chunk, [layers, heads, chunks].
            self.chunk_rows = chunk_rows(m.kept, m.num_tokens, m.chunk_tokens)
            per_layer = np.repeat(self.chunk_rows, len(KINDS), axis=0)  # [layers * kinds, ...]
            return per_layer.reshape(len(m.streams), m.num_chunks).T
        # FileHeader.layer_span of each chunk, for every stream at once.
        t0 = np.arange(m.num_chunks, dtype=np.int64)[:, None] * m.chunk_tokens
        t1 = np.minimum(t0 + m.chunk_tokens, m.num_tokens)
        starts = np.array([m.starts[l] for l, _ in m.streams], dtype=np.int64)
        return np.maximum(0, t1 - np.maximum(t0, starts))

    def params(self) -> dict:
        """Per stream, its quantizer's per-file parameters (float16 ``[channels]`` each)."""
        if self._params is None:
            m, rows = self.meta, self.param_rows()
            self._params = {s: {name: rows[at + j]
                                for j, name in enumerate(m.quant[s].param_names)}
                            for s, at in zip(m.streams, self._layout()[3])}
        return self._params

    def param_rows(self) -> np.ndarray:
        """Every stream's parameters as rows of one float16 ``[rows, channels]`` array
        (:meth:`param_row` says where each is)."""
        self._load_tables()
        return self._param_rows

    def param_row(self, stream: tuple, name: str) -> int:
        """The row of :meth:`param_rows` that holds ``stream``'s parameter ``name``."""
        m = self.meta
        return (self._layout()[3][m.stream_index[stream]]
                + m.quant[stream].param_names.index(name))

    def frequencies(self) -> dict:
        """Per stream, its probability tables as exact integer frequencies (what both the
        CPU and the GPU coders build their decode tables from)."""
        self._load_tables()
        return self._freqs

    def _load_tables(self):
        if self._levels is not None:
            return
        m = self.meta
        c = m.stream_channels
        psizes, lrows, alphabets, _ = self._layout()
        praw = read_zstd(self.source, "params", sum(psizes))
        # Packed tables: 2 span bytes per row plus at most one code per symbol.
        if m.shared_tables is not None:
            built = self._shared_tables(tuple(zip(lrows, alphabets)))
        else:
            lraw = read_zstd(self.source, "tables", sum(lrows) * (2 + MAX_ALPHABET),
                             exact=False)
            key = TABLES.key(lraw, (tuple(lrows), alphabets))
            built = TABLES.get(key)  # these very bytes, read this way, were checked before
            if built is None:
                built = TABLES.put(key, self._build(lraw, lrows, alphabets))
        rows = np.frombuffer(praw, dtype="<f2").astype(np.float16).reshape(-1, c)
        if not np.isfinite(rows).all():  # encoders clamp them to float16's range
            raise CorruptError(f"{m.name}: params section holds NaN or infinity")
        self._param_rows = rows
        self._built = built
        self._levels = dict(zip(m.streams, built.levels))
        self._freqs = dict(zip(m.streams, built.freqs))

    def _layout(self) -> tuple:
        """Per stream: the bytes of its parameters, its table's rows, its alphabet, its
        first row of parameters; the same for every file of one config and geometry
        (every entry of a store), so kept with the quantizers its header shares with
        them, not built per file."""
        m = self.meta
        key = ("tables layout", m.stream_channels)
        got = m.shared_parse.get(key) if not m.evicted else None
        if got is None:
            qs = [m.quant[s] for s in m.streams]
            counts = [len(q.param_names) for q in qs]
            got = ([n * m.stream_channels * 2 for n in counts],
                   [m.coded_columns(q) for q in qs], tuple(q.table_alphabet for q in qs),
                   np.cumsum([0] + counts[:-1]).tolist())
            if not m.evicted:
                m.shared_parse[key] = got
        return got

    def _shared_tables(self, layout: tuple) -> BuiltTables:
        """The tables of a file coded with shared ones (format v6), from ``shared``."""
        m = self.meta
        if self.shared is None:
            raise FormatError(f"{m.name} is a store entry coded with its store's shared "
                              f"tables ({m.shared_tables[:12]}...), which it does not hold; "
                              "read it through its store (ChunkStore.open_entry)")
        key = (m.shared_tables, layout)
        built = TABLES.get(key)
        if built is not None:
            return built
        got = self.shared(m.shared_tables)
        if got.digest != m.shared_tables or got.layout != layout:
            raise CorruptError(f"{m.name}: its store's shared tables {m.shared_tables[:12]}"
                               "... do not fit its streams")
        return TABLES.put(key, BuiltTables(got.levels, got.freqs))

    def _build(self, lraw: bytes, lrows: list, alphabets: tuple) -> BuiltTables:
        """Levels and frequencies of the packed tables ``lraw`` (``lrows`` rows per
        stream, each over its stream's alphabet), checked: every row valid, no symbol
        past its stream's alphabet."""
        m = self.meta
        try:
            levels = tables.split_levels(lraw, list(zip(lrows, alphabets)))
        except tables.AlphabetError as exc:
            raise CorruptError(f"{m.name}: a table of {m.stream_name(exc.stream)} has "
                               "symbols outside its quantizer's alphabet") from None
        except ValueError as exc:
            raise CorruptError(f"{m.name}: invalid probability tables: {exc}") from None
        # Built once per distinct table section, not per decoded chunk (nor per file).
        return BuiltTables(levels, tables.native().normalize_many(levels))

    def decode_tables(self) -> dict:
        """Native decode tables of every stream, built once per file (in parallel)."""
        if self._dtables is None:
            self._load_tables()
            self._dtables = dict(zip(self.meta.streams, self._built.decode_tables()))
        return self._dtables

    def read_item(self, chunk: int, stream: int):
        """``(side bytes, blob memoryview)`` of one payload item, checksum verified."""
        return self.read_items([(chunk, stream)])[chunk, stream]

    def read_items(self, keys, runs: dict | None = None) -> dict:
        """``{(chunk, stream): (side bytes, blob memoryview)}`` for payload items ``keys``,
        checksums verified: each run of items that lie close together in the payload is
        one read (a whole chunk, or the whole payload, is one), unless ``runs`` already
        holds it (``{(first item, last item): bytes}`` from :meth:`read_run`)."""
        off, side, blob, crc = self.item_lists()
        n_streams = len(self.meta.streams)
        at = sorted({c * n_streams + s for c, s in keys})
        out, i = {}, 0
        while i < len(at):
            j = i + 1
            while j < len(at) and (off[at[j]] - off[at[j - 1]] - side[at[j - 1]]
                                   - blob[at[j - 1]] <= self.READ_GAP):
                j += 1
            got = (runs or {}).get((at[i], at[j - 1]))
            buf = memoryview(got if got is not None else self.read_run(at[i], at[j - 1]))
            start = off[at[i]]
            self._check(buf, start, at[i:j])
            for p in at[i:j]:
                o = off[p] - start
                out[divmod(p, n_streams)] = (bytes(buf[o:o + side[p]]),
                                             buf[o + side[p]:o + side[p] + blob[p]])
            i = j
        return out

    def read_span(self, chunks) -> tuple:
        """Every item of the consecutive ``chunks`` in one read, checksums verified:
        ``(data, items)`` with ``items[(chunk, stream)] = (side bytes, blob start, blob
        size)``, the blob at ``data[start:start + size]``: one buffer to hand on whole
        (the GPU decoder uploads it as it is)."""
        n_streams = len(self.meta.streams)
        first, last = chunks[0] * n_streams, (chunks[-1] + 1) * n_streams - 1
        data = self._checked_run(first, last)
        off, side, blob, _ = self.item_lists()
        items = {}
        for p in range(first, last + 1):
            o = off[p] - off[first]
            items[divmod(p, n_streams)] = (bytes(data[o:o + side[p]]), o + side[p], blob[p])
        return data, items

    def chunk_blobs(self, chunk: int) -> list:
        """Every stream's blob of ``chunk`` (memoryviews, in stream order), read in one
        piece and checked as :meth:`read_items` checks them, without its dict; kept, so
        that the plans of a vLLM step's layer groups read and check an entry once."""
        got = self._blobs.get(chunk)
        if got is None:
            got = self._blobs[chunk] = self._read_blobs(chunk)
        return got

    def _read_blobs(self, chunk: int) -> list:
        n = len(self.meta.streams)
        first = chunk * n
        buf = self._checked_run(first, first + n - 1)
        off, side, blob, _ = self.item_lists()
        at = off[first]
        return [buf[o + s - at:o + s + b - at]
                for o, s, b in zip(off[first:first + n], side[first:first + n],
                                   blob[first:first + n])]

    def _checked_run(self, first: int, last: int) -> memoryview:
        """Payload items ``first`` to ``last`` in one read, every checksum verified."""
        data = memoryview(self.read_run(first, last))
        self._check(data, self.item_lists()[0][first], range(first, last + 1))
        return data

    def _check(self, buf, start: int, items) -> None:
        """Payload items ``items`` (ascending), read into ``buf`` from payload offset
        ``start``: each there whole and with its checksum, in one native call (one
        ``crc32`` per item from Python cost more than the checksums); a CorruptError
        names the first that is not. Consecutive items (a run, as a stream's reads
        check them) take views of the index's columns: a field of the structured index
        gathered by a list of items cost more than their checksums (~60 us a call)."""
        if not len(items):
            return
        if self._checks is None:
            idx = self.index()
            self._checks = (np.ascontiguousarray(idx["off"]),
                            idx["side"].astype(np.uint64) + idx["blob"],
                            np.ascontiguousarray(idx["crc"]))
        off, size, crc = self._checks
        a, b = items[0], items[-1] + 1
        at = slice(a, b) if b - a == len(items) else np.asarray(items, dtype=np.int64)
        bad = tables.native().crc32_items(buf, off[at] - np.uint64(start), size[at], crc[at])
        if bad >= 0:
            p, n_streams = items[bad], len(self.meta.streams)
            raise CorruptError(f"{self.meta.name}: checksum mismatch in chunk {p // n_streams}, "
                               f"{self.meta.stream_name(p % n_streams)}; the file is damaged")

    def read_run(self, first: int, last: int) -> bytes:
        """The payload bytes from item ``first`` to the end of item ``last`` (one read, a
        view where the file is held in bytes; not yet verified: :meth:`read_items` checks
        them)."""
        off, side, blob, _ = self.item_lists()
        return self.source.read_range("payload", off[first],
                                      off[last] + side[last] + blob[last] - off[first], True)

    def item_lists(self) -> tuple:
        """The index as lists (per-item lookups in plain Python): offsets, side sizes,
        blob sizes, checksums."""
        if self._items is None:
            idx = self.index()
            self._items = (idx["off"].tolist(), idx["side"].tolist(), idx["blob"].tolist(),
                           idx["crc"].tolist())
        return self._items
