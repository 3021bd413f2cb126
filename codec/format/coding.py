"""Coding one cache's streams: quantize, build each stream's tables, rANS-code it chunk
by chunk, and collect what the file's sections hold (parameters, tables, sink rows)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import tables
from ..core.kvcache import KEPT_IMPORTANCE, KVCache
from ..core.quant import fit_stream, to_fp16
from ..core.streams import KINDS, step_multipliers, stream_input
from ..core.transforms import rope_tables
from ..errors import ConfigError, ShapeError
from .kept import chunk_bounds
from .spec import head_rows

# Elements of one batch of layers quantized together (float32: 16 MiB).
_BATCH_ELEMENTS = 1 << 22


@dataclass
class StreamCoder:
    """Codes one cache's streams with a resolved config: per-layer quantizers ``quant``
    (``{(layer, kind): Quantizer}``; for evicted caches a callable ``(layer, kind, head)
    -> Quantizer``) and key ``ropes``, collecting each stream's parameters, tables and
    sink rows in file order; :meth:`dense` and :meth:`evicted` return the payload items
    ``(side bytes, blob)`` in file order."""

    cfg: dict
    quant: object
    ropes: list
    chunk: int
    n_sink: int
    importance: torch.Tensor | None
    offset: int
    threads: int
    params: list = field(default_factory=list)
    # Per stream, its tables as tables.pack_levels packs them: the rows' spans, then codes.
    spans: list = field(default_factory=list)
    codes: list = field(default_factory=list)
    sinks: list = field(default_factory=list)
    # Per stream, what its tables are built from: (symbols, table alphabet, groups).
    pending: list = field(default_factory=list)
    # Whether the file's streams were coded with shared tables (dense()).
    shared: bool = False

    def tables_section(self) -> bytes:
        """The packed level tables of every stream (:func:`tables.pack_levels` of all
        their rows, in file order), before zstd."""
        return b"".join(self.spans) + b"".join(self.codes)

    def _record(self, q, symbols: np.ndarray, params: dict, sink_rows: bytes,
                channels: int) -> None:
        """Record one stream's sink rows and parameters, and queue its tables."""
        self.sinks.append(sink_rows)
        for name in q.param_names:
            self.params.append(params[name].astype("<f2").tobytes())
        self.pending.append((symbols, q.table_alphabet, q.table_groups(channels)))

    def _build_tables(self) -> list:
        """Build the queued streams' tables (natively, in parallel, GIL released): records
        their packed levels and returns their frequencies, in stream order."""
        built = tables.stream_tables(self.pending, self.threads)
        self.pending = []
        for _, spans, codes in built:
            self.spans.append(spans)
            self.codes.append(codes)
        return [freqs for freqs, _, _ in built]

    def _stream(self, q, x: torch.Tensor, layer: int, where: str, importance,
                sinks: np.ndarray) -> tuple:
        """Quantize one stream ``x [rows, C]`` of ``layer`` (``where`` names it) whose
        first ``len(sinks)`` rows are attention sinks, kept in fp16 as the given rows of
        its sink section (``importance``: ``[layers, rows]``, the attention of its rows);
        records its sink rows and parameters, queues its tables and returns ``(symbols,
        side)``."""
        if not torch.isfinite(x).all():
            raise ShapeError(f"{where} contain NaN or infinity")
        sink_rows = np.zeros((self.n_sink, x.shape[1]), dtype="<f2")
        sink_rows[sinks] = to_fp16(x[:len(sinks)]).numpy()
        # A head that keeps no token still records parameters (of one zero row).
        params = fit_stream(q, x, len(sinks))
        symbols, side = q.quantize(
            x, params, step_multipliers(self.cfg, importance, layer, len(sinks)))
        self._record(q, symbols, params, sink_rows.tobytes(), x.shape[1])
        return symbols, side

    def _dense_streams(self, kv: KVCache, starts: list) -> list:
        """``(symbols, side)`` of every (layer, kind) stream of a dense cache, in file
        order, with the layers of equal span quantized together (a few calls per chunk
        instead of dozens per stream: bit for bit what quantizing each stream alone
        gives, which :meth:`_stream` does for evicted caches)."""
        n_layers, n = kv.num_layers, kv.num_tokens
        c = kv.num_kv_heads * kv.head_dim
        for layer in range(n_layers):  # what rope() would refuse, before any work
            r = self.ropes[layer]
            if r is not None and r.rotary_dim > kv.head_dim:
                raise ConfigError(f"a rotary dim of {r.rotary_dim} does not fit head_dim "
                                  f"{kv.head_dim}")
        done = {}  # (layer, kind) -> (symbols, side, params, sink rows)
        for s0, layers in _layer_batches(starts, n, c):
            t = n - s0
            n_snk = min(max(0, self.n_sink - s0), t)
            imp = None if self.importance is None else self.importance[:, s0:]
            # Keys and values of a layer share their tokens' step multipliers.
            mults = [step_multipliers(self.cfg, imp, layer, n_snk) for layer in layers]
            for kind, src in zip(KINDS, (kv.keys, kv.values)):
                x, finite = self._inputs(src, layers, kind, self.offset + s0, t, c)
                if not finite:
                    bad = next(layer for layer in layers
                               if not torch.isfinite(src[layer]).all())
                    raise ShapeError(f"{kind}s of layer {bad} contain NaN or infinity")
                sink = to_fp16(x[:, :n_snk]).numpy()
                qk = [self.quant[layer, kind] for layer in layers]
                params = [fit_stream(q, x[i], n_snk) for i, q in enumerate(qk)]
                by_key = {}
                for i, q in enumerate(qk):
                    key = q.batch_key()
                    by_key.setdefault(("alone", i) if key is None else key, []).append(i)
                coded = [None] * len(qk)
                for idx in by_key.values():
                    xs = x if len(idx) == len(qk) else x[idx]
                    got = qk[idx[0]].quantize_layers(
                        [qk[i] for i in idx], xs, [params[i] for i in idx],
                        [mults[i] for i in idx], self.threads)
                    for i, r in zip(idx, got):
                        coded[i] = r
                for i, layer in enumerate(layers):
                    rows = np.zeros((self.n_sink, c), dtype="<f2")
                    rows[:n_snk] = sink[i]
                    done[layer, kind] = (*coded[i], params[i], rows.tobytes())
        out = []
        for layer in range(n_layers):
            for kind in KINDS:
                symbols, side, params, sink_rows = done[layer, kind]
                self._record(self.quant[layer, kind], symbols, params, sink_rows, c)
                out.append((symbols, side))
        return out

    def _inputs(self, src: list, layers: list, kind: str, offset: int, t: int,
                c: int) -> tuple:
        """``(x, finite)``: float32 ``[len(layers), t, c]``, :func:`stream_input` of each
        of ``layers`` bit for bit (keys un-rotated), and whether all of it is finite."""
        heads = [src[layer].detach()[0] for layer in layers]  # [H, t, D] each
        if all(h.dtype == torch.float32 and h.device.type == "cpu" for h in heads):
            # Read in place (a token slice too): rows and channels must be contiguous.
            heads = [h if h.stride(2) == 1 and h.stride(1) == h.shape[2] else h.contiguous()
                     for h in heads]
        else:
            heads = list(torch.stack([h.to("cpu") for h in heads]).float())
        xs = [h.numpy() for h in heads]
        out = np.empty((len(layers), t, c), dtype=np.float32)
        by_rope = {}
        for i, layer in enumerate(layers):
            by_rope.setdefault(self.ropes[layer] if kind == "key" else None, []).append(i)
        finite = True
        for r, idx in by_rope.items():
            cos = sin = None
            divisor = 1.0
            if r is not None:
                cos, sin = (a.numpy() for a in rope_tables(offset, t, r))
                divisor = r.scaling * r.scaling
            finite &= tables.native().stream_inputs([xs[i] for i in idx], out, idx, cos, sin,
                                                    divisor, self.threads)
        return torch.from_numpy(out), finite

    def levels(self, kv: KVCache) -> list:
        """The level tables (uint8 ``[rows, table alphabet]``) a dense cache's streams
        would be coded with, in file order (what shared tables are built from)."""
        n = kv.num_tokens
        self._dense_streams(kv, [n - t for t in kv.layer_tokens])
        alphabets = [alphabet for _, alphabet, _ in self.pending]
        self._build_tables()
        rows = [len(s) // 2 for s in self.spans]
        return tables.split_levels(self.tables_section(), list(zip(rows, alphabets)))

    def dense(self, kv: KVCache, shared=None) -> list:
        """Payload items ``(side bytes, blob)`` of a dense cache, chunk by chunk, one per
        (layer, kind) stream in each: the layer's tokens ``[T_l, kv_heads * head_dim]``.
        ``shared`` (:class:`~kvcodec.format.shared.SharedTables`) codes every stream
        with those tables instead of the cache's own where they fit it."""
        n, chunk = kv.num_tokens, self.chunk
        spans = kv.layer_tokens
        starts = [n - t for t in spans]  # each layer holds the last spans[l] positions
        streams = self._dense_streams(kv, starts)
        freqs = self._build_tables()
        if shared is not None and shared.fits(freqs, [spans[s // len(KINDS)]
                                                      for s in range(len(freqs))]):
            self.spans, self.codes, freqs = list(shared.spans), list(shared.codes), shared.freqs
            self.shared = True
        jobs, sides, first_chunk = [], [], []
        for s, ((symbols, side), f) in enumerate(zip(streams, freqs)):
            layer = s // len(KINDS)
            s0 = starts[layer]
            head = head_rows(s0, spans[layer], chunk)
            parts = [symbols[:head], symbols[head:]] if head else [symbols]
            jobs += [(np.ascontiguousarray(p), f) for p in parts if len(p)]
            first_chunk.append((s0 // chunk, sum(1 for p in parts if len(p))))
            sides.append(side)
        coded = iter(tables.native().encode_many(jobs, chunk, self.threads))
        blobs = []  # per stream: {chunk: blob}
        for c0, n_jobs in first_chunk:
            own = [b for _ in range(n_jobs) for b in next(coded)]
            blobs.append(dict(zip(range(c0, c0 + len(own)), own)))
        items = []
        for c in range((n + chunk - 1) // chunk):
            for s, side in enumerate(sides):
                s0 = starts[s // len(KINDS)]
                rows = slice(max(0, c * chunk - s0), max(0, min(n, (c + 1) * chunk) - s0))
                items.append((_side_bytes(side, rows), blobs[s].get(c, b"")))
        return items

    def evicted(self, kv: KVCache) -> list:
        """Payload items ``(side bytes, blob)`` of an evicted cache, chunk by chunk, one
        per (layer, kind, head) stream in each: the head's kept rows ``[n, head_dim]``
        at positions in that chunk, each chunk's rows coded as a job of its own."""
        h, chunk = kv.num_kv_heads, self.chunk
        n_chunks = (kv.num_tokens + chunk - 1) // chunk
        streams = []  # (symbols, row bounds per chunk, side)
        per_head = _kept_importance(kv)
        for layer, kept in enumerate(kv.kept):
            for kind, src in zip(KINDS, (kv.keys, kv.values)):
                for head in range(h):
                    pos = kept[head][kept[head] >= 0]
                    q = self.quant(layer, kind, head)
                    rope_here = self.ropes[layer] if kind == "key" else None
                    x = stream_input(src[layer][:, head:head + 1, :len(pos)], kind, rope_here,
                                     self.offset + pos)
                    imp = None if self.importance is None else self.importance[:, pos]
                    if per_head is not None:  # [layers, rows]: only this layer's row is read
                        imp = per_head[layer][head, :len(pos)].expand(kv.num_layers, -1)
                    symbols, side = self._stream(
                        q, x, layer, f"head {head} {kind}s of layer {layer}", imp,
                        pos[pos < self.n_sink].numpy())
                    streams.append((symbols, chunk_bounds(pos.numpy(), chunk, n_chunks), side))
        jobs = []
        for (symbols, bounds, _), freqs in zip(streams, self._build_tables()):
            jobs += [(np.ascontiguousarray(symbols[a:b]), freqs)
                     for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        coded = iter(tables.native().encode_many(jobs, chunk, self.threads))
        per_stream = []  # per stream: per chunk (side bytes, blob)
        for _, bounds, side in streams:
            per_stream.append([(_side_bytes(side, slice(a, b)), next(coded)[0] if b > a else b"")
                               for a, b in zip(bounds[:-1], bounds[1:])])
        return [items[c] for c in range(n_chunks) for items in per_stream]


def _kept_importance(kv: KVCache):
    """The evicted cache's per-head importance (``extra[KEPT_IMPORTANCE]``), checked
    against its ``kept`` layout, or None."""
    got = kv.extra.get(KEPT_IMPORTANCE)
    if got is None:
        return None
    got = [torch.as_tensor(g, dtype=torch.float32) for g in got]
    if len(got) != kv.num_layers or any(g.shape != k.shape for g, k in zip(got, kv.kept)):
        raise ShapeError(f"extra[{KEPT_IMPORTANCE!r}] must hold one [kv_heads, slots] tensor "
                         "per layer, shaped as the cache's kept positions")
    return got


def _layer_batches(starts: list, n: int, channels: int) -> list:
    """``(start, layers)``: the layers of each distinct start position (equal spans), in
    batches of at most :data:`_BATCH_ELEMENTS` elements."""
    by_start = {}
    for layer, s0 in enumerate(starts):
        by_start.setdefault(s0, []).append(layer)
    out = []
    for s0, layers in by_start.items():
        per = max(1, _BATCH_ELEMENTS // max(1, (n - s0) * channels))
        out += [(s0, layers[i:i + per]) for i in range(0, len(layers), per)]
    return out


def _side_bytes(side, rows: slice) -> bytes:
    return b"" if side is None else side[rows].astype("<f2").tobytes()
