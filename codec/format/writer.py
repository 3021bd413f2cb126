"""Writing .kvc files: quantize each stream, build its tables, code it chunk by chunk."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _version
from ..core import tables
from ..core.config import MAX_CHUNK_TOKENS, load_config, resolve_layers
from ..core.kvcache import KVCache
from ..core.quant import make_quantizer
from ..core.streams import KINDS, stream_input, step_multipliers
from ..core.transforms import applied_key_transform, layer_ropes, rope_tables
from ..errors import ConfigError, ShapeError
from . import container
from .container import atomic_write, crc32
from .kept import chunk_bounds, head_spec, pack_kept
from .spec import (INDEX_ENTRY, MAX_ANCHOR_TOKENS, check_geometry, check_kept_geometry,
                   coder_info, head_rows)

# Level 12 is within 0.05% of 19 on the tables and 7x faster to write.
_zstd_level = 12


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=_zstd_level, write_checksum=True).compress(data)


@functools.lru_cache(maxsize=16)
def _zstd_config(data: bytes, level: int) -> bytes:
    """:func:`_zstd` of a config section, remembered: a store's chunks all carry the same
    config, and zstd gives the same bytes for the same input and level."""
    return _zstd(data)


def encode(kv, path=None, *, config="default", chunk_tokens: int | None = None,
           threads: int = 0, token_ids=None, model: dict | None = None,
           position_offset: int | None = None, importance=None, anchor=None) -> bytes:
    """Compress a KV cache into .kvc bytes.

    Parameters
    ----------
    kv : KVCache, transformers DynamicCache, or list of (key, value) pairs
        Per layer, keys and values ``[1, kv_heads, tokens, head_dim]`` (fp16, bf16 or fp32).
        An evicted cache (``kv.kept``, each head keeping its own tokens) is written as
        format version 4 with only its kept tokens coded (:mod:`kvcodec.format.kept`);
        others as version 3.
    path : str or Path, optional
        Also write the result there, crash-safely (temp file + fsync + rename).
    config : str, Path or dict
        Codec config name (``"default"``, ``"cachegen"``), JSON path, or dict.
        ``"default"`` is the model's calibrated config where one exists for its
        fingerprint, else the model-free default (see :func:`kvcodec.load_config`).
    chunk_tokens : int, optional
        Tokens per independently decodable chunk (default: the config's, else 256).
    threads : int
        Coder threads; 0 = all cores.
    token_ids, model : optional
        Token ids and model fingerprint to record, overriding those carried by ``kv``.
    position_offset : int, optional
        Position of the cache's first token (for configs that strip RoPE from keys);
        default ``len(anchor)`` for an anchored chunk, else 0.
    anchor : list of int, optional
        Token ids of the fixed prefix a position-independent chunk was computed behind
        (default ``kv.extra["anchor"]``, which ``capture_kv(..., anchor=...)`` sets);
        recorded so that :mod:`kvcodec.blend` refuses a chunk made behind another one.
    importance : Tensor, optional
        ``[layers, tokens]`` attention importance, overriding ``kv.importance`` (which
        :func:`kvcodec.capture_kv` fills in). Configs with ``token_importance`` give
        attended tokens finer steps; without importance every token gets the config's
        step. The decoder needs nothing: the steps are coded in the payload.

    Returns
    -------
    bytes
        The .kvc file contents.
    """
    kv = _as_kvcache(kv)
    model = kv.model if model is None else model
    # A dict is only read here (and validated): no copy of it, which a calibrated config's
    # size makes cost more than a small chunk's coding.
    cfg = load_config(config, copy_dict=False, model=model)
    chunk = int(chunk_tokens or cfg.get("chunk_tokens", 256))
    if not 1 <= chunk <= MAX_CHUNK_TOKENS:
        raise ConfigError(f"chunk_tokens must be in [1, {MAX_CHUNK_TOKENS}], got {chunk}")
    token_ids = kv.token_ids if token_ids is None else list(token_ids)
    anchor = kv.extra.get("anchor") if anchor is None else anchor
    if anchor is not None:
        anchor = [int(t) for t in anchor]
        if not 1 <= len(anchor) <= MAX_ANCHOR_TOKENS or min(anchor) < 0 or max(anchor) >= 1 << 32:
            raise ShapeError(f"an anchor must be 1..{MAX_ANCHOR_TOKENS} token ids in [0, 2**32)")
    if position_offset is None:
        position_offset = len(anchor) if anchor else 0
    n_layers, h, d, n = kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.num_tokens
    check_geometry(n_layers, n, h * d)
    if token_ids is not None and len(token_ids) != n:
        raise ShapeError(f"{len(token_ids)} token ids for a cache of {n} tokens")
    if kv.evicted:
        check_kept_geometry(n_layers, h, n)
    spans = [n] * n_layers if kv.evicted else kv.layer_tokens
    if min(spans) == 0:
        raise ShapeError(f"layer {spans.index(0)} holds no tokens; a file needs every layer")
    specs = resolve_layers(cfg, n_layers)
    xform, cfg = applied_key_transform(cfg, model, n_layers, position_offset, n)
    n_sink = min(cfg.get("sink_tokens", 0), n)
    importance = kv.importance if importance is None else torch.as_tensor(importance)
    if importance is not None and tuple(importance.shape) != (n_layers, n):
        raise ShapeError(f"importance has shape {tuple(importance.shape)}; expected "
                         f"[layers, tokens] = [{n_layers}, {n}]")
    coder = _Coder(cfg, specs, layer_ropes(xform, n_layers, d), chunk, n_sink, importance,
                   position_offset, threads)
    index, payload = _payload(coder.evicted(kv) if kv.evicted else coder.dense(kv))
    header = {
        "format": "kvc",
        "created_by": f"kvcodec {_version.__version__}",
        "model": model,
        "num_layers": n_layers, "num_kv_heads": h, "head_dim": d, "num_tokens": n,
        "layer_tokens": spans,
        "dtype": str(kv.dtype).replace("torch.", ""),
        "chunk_tokens": chunk,
        "has_token_ids": token_ids is not None,
        "key_transform": xform,
        "position_offset": int(position_offset),
        "anchor": anchor,
        "sink_tokens": n_sink,
        "coder": coder_info(),
    }
    ids = np.asarray([] if token_ids is None else token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ShapeError("token ids must be in [0, 2**32)")
    sections = [
        ("config", _zstd_config(json.dumps(cfg, separators=(",", ":")).encode(), _zstd_level),
         True),
        ("tokens", _zstd(ids.astype("<u4").tobytes()), True),
        ("index", index, True),
        ("params", _zstd(b"".join(coder.params)), True),
        ("tables", _zstd(coder.tables_section()), True),
        ("sinks", b"".join(coder.sinks), True),
        ("payload", payload, False),
    ]
    version = container.DENSE_VERSION
    if kv.evicted:  # version 4: only evicted files need it
        header["evicted"] = True
        sections.insert(2, ("kept", _zstd(pack_kept(kv.kept, n)), True))
        version = container.FORMAT_VERSION
    data = container.build(header, sections, version)
    if path is not None:
        atomic_write(path, data)
    return data


@dataclass
class _Coder:
    """Codes one cache's streams with a resolved config: per-layer quantizer ``specs``
    and key ``ropes``, collecting each stream's parameters, tables and sink rows in file
    order; :meth:`dense` and :meth:`evicted` return the payload items."""

    cfg: dict
    specs: dict
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
        sink_rows[sinks] = x[:len(sinks)].half().numpy()
        # A head that keeps no token still records parameters (of one zero row).
        params = q.fit(x if len(x) else torch.zeros(1, x.shape[1]))
        symbols, side = q.quantize(
            x, params, step_multipliers(self.cfg, importance, layer, len(sinks)))
        self._record(q, symbols, params, sink_rows.tobytes(), x.shape[1])
        return symbols, side

    def _dense_streams(self, kv: KVCache, starts: list) -> list:
        """``(symbols, side)`` of every (layer, kind) stream of a dense cache in file
        order, one stream at a time through :meth:`_stream`."""
        out = []
        for layer in range(kv.num_layers):
            s0 = starts[layer]
            for kind, src in zip(KINDS, (kv.keys, kv.values)):
                q = make_quantizer(self.specs[kind][layer], kv.dtype)
                rope_here = self.ropes[layer] if kind == "key" else None
                x = stream_input(src[layer], kind, rope_here, self.offset + s0)
                sinks = np.arange(min(max(0, self.n_sink - s0), len(x)))
                imp = None if self.importance is None else self.importance[:, s0:]
                out.append(self._stream(q, x, layer, f"{kind}s of layer {layer}", imp, sinks))
        return out

    def _dense_batched(self, kv: KVCache, starts: list) -> list | None:
        """What :meth:`_dense_streams` returns and records, bit for bit, with the layers
        of equal span quantized together (a few calls per chunk instead of dozens per
        stream). None, with nothing recorded, where a stream would raise (a rotary dim
        over head_dim, a non-finite value, a ``head_scale`` that does not divide the
        channels): the stream-by-stream loop then raises that error in its order."""
        n_layers, n = kv.num_layers, kv.num_tokens
        c = kv.num_kv_heads * kv.head_dim
        try:
            qs = {kind: [make_quantizer(self.specs[kind][layer], kv.dtype)
                         for layer in range(n_layers)] for kind in KINDS}
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
                        return None
                    sink = x[:, :n_snk].half().numpy()
                    qk = [qs[kind][layer] for layer in layers]
                    params = [q.fit(x[i]) for i, q in enumerate(qk)]
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
        except (ConfigError, ShapeError):
            return None
        out = []
        for layer in range(n_layers):
            for kind in KINDS:
                symbols, side, params, sink_rows = done[layer, kind]
                self._record(qs[kind][layer], symbols, params, sink_rows, c)
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
                if r.rotary_dim > heads[0].shape[2]:
                    raise ConfigError("the rotary dim does not fit head_dim")  # rope() says it
                cos, sin = (a.numpy() for a in rope_tables(offset, t, r))
                divisor = r.scaling * r.scaling
            finite &= tables.native().stream_inputs([xs[i] for i in idx], out, idx, cos, sin,
                                                    divisor, self.threads)
        return torch.from_numpy(out), finite

    def dense(self, kv: KVCache) -> list:
        """Payload items ``(side bytes, blob)`` of a dense cache, chunk by chunk, one per
        (layer, kind) stream in each: the layer's tokens ``[T_l, kv_heads * head_dim]``."""
        n, chunk = kv.num_tokens, self.chunk
        spans = kv.layer_tokens
        starts = [n - t for t in spans]  # each layer holds the last spans[l] positions
        streams = self._dense_batched(kv, starts)
        if streams is None:
            streams = self._dense_streams(kv, starts)
        freqs = self._build_tables()
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
        h, d, chunk = kv.num_kv_heads, kv.head_dim, self.chunk
        n_chunks = (kv.num_tokens + chunk - 1) // chunk
        streams = []  # (symbols, row bounds per chunk, side)
        for layer, kept in enumerate(kv.kept):
            for kind, src in zip(KINDS, (kv.keys, kv.values)):
                for head in range(h):
                    pos = kept[head][kept[head] >= 0]
                    q = make_quantizer(head_spec(self.specs[kind][layer], head, h, d), kv.dtype)
                    rope_here = self.ropes[layer] if kind == "key" else None
                    x = stream_input(src[layer][:, head:head + 1, :len(pos)], kind, rope_here,
                                     self.offset + pos)
                    imp = None if self.importance is None else self.importance[:, pos]
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


# Elements of one batch of layers quantized together (float32: 16 MiB).
_BATCH_ELEMENTS = 1 << 22


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


def _payload(items: list) -> tuple:
    """``(index, payload)`` bytes of payload items ``(side bytes, blob)`` in file order,
    each indexed with its offset, sizes and CRC."""
    index, payload, offset = [], [], 0
    for side_bytes, blob in items:
        item = side_bytes + blob
        index.append(INDEX_ENTRY.pack(offset, len(side_bytes), len(blob), crc32(item)))
        payload.append(item)
        offset += len(item)
    return b"".join(index), b"".join(payload)


def _as_kvcache(kv) -> KVCache:
    if isinstance(kv, KVCache):
        return kv
    if hasattr(kv, "layers"):  # a transformers Cache
        return KVCache.from_dynamic_cache(kv)
    if isinstance(kv, (list, tuple)):
        try:
            keys, values = [p[0] for p in kv], [p[1] for p in kv]
        except (TypeError, IndexError):
            raise ShapeError("expected a list of (key, value) tensor pairs") from None
        return KVCache(keys, values)
    raise ShapeError(f"cannot encode a {type(kv).__name__}; pass a KVCache, DynamicCache "
                     "or list of (key, value) pairs")

