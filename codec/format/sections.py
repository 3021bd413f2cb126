"""A .kvc file's sections, read lazily and checked before use: the chunk index, the
quantizer parameters and probability tables, the fp16 sink rows, and payload items
(each verified against its CRC as it is read)."""
from __future__ import annotations

import numpy as np
import torch

from ..core import tables
from ..core.quant import MAX_ALPHABET
from ..errors import CorruptError
from .container import Reader, crc32
from .header import FileHeader
from .spec import INDEX_ENTRY


class SectionReader(FileHeader):
    """A checked header plus lazy, verified access to the sections it describes."""

    def __init__(self, reader: Reader):
        super().__init__(reader)
        self._sinks = None
        self._index = None
        self._params = None
        self._levels = None
        self._dtables = None

    def _load_sinks(self):
        """fp16 sink rows ``[streams, sink_tokens, channels]``: row ``i`` of a stream is
        its layer's ``i``-th held token (zero where that is not an attention sink)."""
        if self._sinks is None:
            raw = self._r.read_section("sinks")
            n = self.sink_tokens * self.channels
            if len(raw) != 2 * n * len(self._streams):
                raise CorruptError(f"{self._r.name}: sinks section has the wrong size")
            arr = np.frombuffer(raw, dtype="<f2").reshape(len(self._streams), self.sink_tokens,
                                                          self.channels)
            self._sinks = torch.from_numpy(arr.astype(np.float32))
        return self._sinks

    def _load_index(self):
        if self._index is not None:
            return self._index
        n_items = self.num_chunks * len(self._streams)
        raw = self._r.read_section("index")
        if len(raw) != n_items * INDEX_ENTRY.size:
            raise CorruptError(f"{self._r.name}: index has {len(raw)} bytes, expected "
                               f"{n_items * INDEX_ENTRY.size}")
        idx = np.frombuffer(raw, dtype=np.dtype([("off", "<u8"), ("side", "<u4"),
                                                  ("blob", "<u4"), ("crc", "<u4")]))
        ends = idx["off"] + idx["side"].astype(np.uint64) + idx["blob"]
        _, payload_len = self._r.section_bounds("payload")
        if n_items and (idx["off"][0] != 0 or np.any(idx["off"][1:] != ends[:-1])
                        or int(ends[-1]) != payload_len):
            raise CorruptError(f"{self._r.name}: index entries do not tile the payload")
        nat = tables.native()
        for i, entry in enumerate(idx):
            chunk, s = divmod(i, len(self._streams))
            layer = self._streams[s][0]
            rows = self._layer_span(layer, range(chunk, chunk + 1))[1]
            q = self._quant[self._streams[s]]
            if int(entry["side"]) != rows * q.side_per_token * 2:
                raise CorruptError(f"{self._r.name}: chunk {chunk} side information has the wrong size")
            limit = nat.max_encoded_size(rows, self._coded(q)) if rows else 0
            if int(entry["blob"]) > limit:
                raise CorruptError(f"{self._r.name}: chunk {chunk} blob is larger than possible")
        self._index = idx
        return idx

    def _load_tables(self):
        if self._levels is not None:
            return
        c = self.channels
        psizes = [len(self._quant[s].param_names) * c * 2 for s in self._streams]
        lrows = [self._coded(self._quant[s]) for s in self._streams]
        praw = self._unzstd("params", sum(psizes))
        # Packed tables: 2 span bytes per row plus at most one code per symbol.
        lraw = self._unzstd("tables", sum(lrows) * (2 + MAX_ALPHABET), exact=False)
        try:
            lall = tables.unpack_levels(lraw, sum(lrows), MAX_ALPHABET)
        except ValueError as exc:
            raise CorruptError(f"{self._r.name}: invalid probability tables: {exc}") from None
        params, levels, po, lo = {}, {}, 0, 0
        for s, ps, ls in zip(self._streams, psizes, lrows):
            q = self._quant[s]
            arr = np.frombuffer(praw, dtype="<f2", count=ps // 2, offset=po).reshape(-1, c)
            params[s] = {name: arr[i].astype(np.float16) for i, name in enumerate(q.param_names)}
            lv = lall[lo:lo + ls]
            if lv[:, q.table_alphabet:].any():
                raise CorruptError(f"{self._r.name}: a table of layer {s[0]} {s[1]}s has "
                                   "symbols outside its quantizer's alphabet")
            lv = np.ascontiguousarray(lv[:, :q.table_alphabet])
            if lv.max(initial=0) > tables.MAX_LEVEL or np.any(lv.max(axis=1) == 0):
                raise CorruptError(f"{self._r.name}: invalid probability table for layer {s[0]} {s[1]}s")
            levels[s] = lv
            po += ps
            lo += ls
        self._params, self._levels = params, levels
        # Tables are built once per file, not per decoded chunk.
        self._freqs = dict(zip(levels, tables.native().normalize_many(list(levels.values()))))

    def _read_item(self, chunk: int, stream: int):
        """``(side bytes, blob memoryview)`` of one payload item, checksum verified."""
        e = self._load_index()[chunk * len(self._streams) + stream]
        item = self._r.read_range("payload", int(e["off"]), int(e["side"]) + int(e["blob"]))
        if crc32(item) != int(e["crc"]):
            l, k = self._streams[stream]
            raise CorruptError(f"{self._r.name}: checksum mismatch in chunk {chunk}, "
                               f"layer {l} {k}s; the file is damaged")
        return item[:int(e["side"])], memoryview(item)[int(e["side"]):]

    def _decode_tables(self):
        """Native decode tables of every stream, built once per file (in parallel)."""
        if self._dtables is None:
            self._load_tables()
            built = tables.native().build_decode_tables([self._freqs[s] for s in self._streams])
            self._dtables = dict(zip(self._streams, built))
        return self._dtables
