"""Reading .kvc files: open any source lazily, plan a decode (which payload items, which
tables, where each stream lands), and run it natively straight into caller buffers."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..core import tables
from ..core.kvcache import KVCache
from ..core.quant import STEP_GRID, Uniform
from ..core.streams import KINDS, unflatten
from ..core.transforms import check_positions, model_ropes, rope, rope_tables, shift
from ..errors import ConfigError, CorruptError, FormatError, KVCodecError, ShapeError
from .container import Reader, StreamBuffer
from .evicted import EvictedReader
from .spec import DTYPES, head_rows


def decode(source, *, dtype: torch.dtype | None = None, threads: int = 0) -> KVCache:
    """Decode a whole .kvc file (path, bytes or binary file object) into a :class:`KVCache`."""
    with open(source) as f:
        return f.decode(dtype=dtype, threads=threads)


def open(source) -> "KVCFile":  # noqa: A001 - mirrors builtins.open on purpose
    """Open a .kvc file lazily for random access by chunk and layer.

    ``source`` is a path, bytes, a seekable binary file object, or any readable stream
    (a socket file, a pipe, a rate-limited reader): with a stream, the header is parsed
    as soon as it arrives and chunks decode while later bytes are still in flight
    (see :meth:`KVCFile.iter_chunks`).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            f = path.open("rb")
        except OSError as exc:
            raise KVCodecError(f"cannot open {path}: {exc.strerror}") from None
        try:
            return KVCFile(Reader(f, str(path)))
        except BaseException:
            f.close()
            raise
    if isinstance(source, (bytes, bytearray, memoryview)):
        return KVCFile(Reader(source))
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        seekable = getattr(source, "seekable", None)
        if hasattr(source, "seek") and (seekable is None or seekable()):
            return KVCFile(Reader(source, name))
        return KVCFile(Reader(StreamBuffer(source), name))
    raise KVCodecError(f"cannot open a {type(source).__name__}; give a path, bytes or a "
                       "readable (seekable or streaming) file object")


class KVCFile(EvictedReader):
    """A parsed .kvc file: header fields are checked on open (:class:`FileHeader`),
    sections are read lazily (:class:`SectionReader`); this class plans and runs decodes
    (of evicted files: :class:`EvictedReader`).
    """

    # A read step (128 KiB) of a stream that takes longer than this waited for the source.
    STALL_S = 1e-3

    def _dense_only(self, method: str) -> None:
        if self.evicted:
            raise FormatError(f"{self._r.name} holds an evicted cache (each head keeps its "
                              f"own tokens), which {method} cannot lay out as dense "
                              "[1, kv_heads, tokens, head_dim] tensors; decode it with "
                              "decode()")

    def _fused_dequant(self, q, layer_rope, pos: int, dst: torch.Tensor, base: int):
        """The native dequantizer's arguments for per-token-step uniform streams (the
        shipped default) decoding into ``dst`` (tokens from position ``pos``), or None
        where there is no fused path (other quantizers, partial rotary dims). It writes
        straight into ``dst`` when that is a float32 CPU view with contiguous tokens;
        otherwise into a scratch array that is cast into ``dst`` afterwards. Keys are
        rotated to positions from ``base + pos``."""
        d = self.head_dim
        if not (isinstance(q, Uniform) and q.scale == "token") or (
                layer_rope is not None and layer_rope.rotary_dim != d):
            return None
        rows = dst.shape[2]
        if (dst.dtype == torch.float32 and dst.device.type == "cpu" and dst.stride(3) == 1
                and dst.stride(2) == d):
            out = dst[0].numpy()
        else:
            out = np.empty((self.num_kv_heads, rows, d), dtype=np.float32)
        cos = sin = None
        if layer_rope is not None:
            cos, sin = self._rope_arrays(base + pos, rows, layer_rope)
        mult = self._mults.get(id(q))  # the file's quantizers live as long as it does
        if mult is None:
            mult = self._mults[id(q)] = q._head_mult(self.channels).numpy()
        return (STEP_GRID, mult, q.r, self.num_kv_heads, out, cos, sin)

    def _rope_arrays(self, pos: int, rows: int, layer_rope):
        """cos/sin of positions ``pos ..`` as NumPy arrays, shared by the layers that
        have the same RoPE (a chunk's decode asks once per layer)."""
        key = (pos, rows, layer_rope)
        got = self._ropes_np.get(key)
        if got is None:
            if len(self._ropes_np) > 64:
                self._ropes_np.clear()
            c, s = rope_tables(pos, rows, layer_rope)
            got = self._ropes_np[key] = (c.numpy(), s.numpy())
        return got

    def _pieces(self, layer: int, chunks: range) -> list:
        """How a layer's part of ``chunks`` splits into native decode jobs: ``(chunk
        range, first row, rows)``, split as the writer coded it (:func:`head_rows`)."""
        first, rows = self._layer_span(layer, chunks)
        if rows == 0:
            return []
        c0, pieces = first // self.chunk_tokens, []
        head = head_rows(first, rows, self.chunk_tokens)
        if head:
            pieces.append((range(c0, c0 + 1), 0, head))
            c0 += 1
        if head < rows:
            pieces.append((range(c0, chunks[-1] + 1), head, rows - head))
        return pieces

    def _prepare(self, dst: dict, chunks: range, position_offset: int | None = None,
                 items: dict | None = None) -> dict:
        """Read and verify the payload items of ``dst``'s layers over ``chunks`` (unless
        ``items`` holds them already: :meth:`_read_items`) and build the native decode
        jobs (the I/O half of a decode; :meth:`_execute` is the rest)."""
        base, shift = self._placement(position_offset)
        self._load_index()
        dtab = self._decode_tables()
        plan = []
        for l, pair in dst.items():
            first, rows = self._layer_span(l, chunks)
            shape = (1, self.num_kv_heads, rows, self.head_dim)
            for k, target in zip(KINDS, pair):
                if tuple(target.shape) != shape or target.dtype not in DTYPES.values():
                    raise ShapeError(f"destination of layer {l} {k}s is {target.dtype} "
                                     f"{tuple(target.shape)}; need a float {shape}")
                if rows:
                    plan.append((l, k, target, first, self._streams.index((l, k))))
        pieces = {l: self._pieces(l, chunks) for l in dst}
        if items is None:
            items = self._read_items([(c, s) for l, _, _, _, s in plan
                                      for prange, _, _ in pieces[l] for c in prange])
        jobs, owner, work = [], [], []
        for l, k, target, first, s in plan:
            q = self._quant[(l, k)]
            coded = self._coded(q)
            rope_here = self._ropes[l] if k == "key" else None
            sym, sides, fused = None, [], []
            for prange, r0, n in pieces[l]:
                got = [items[(c, s)] for c in prange]
                sides += [side for side, _ in got]
                view = target[:, :, r0:r0 + n]
                deq = self._fused_dequant(q, rope_here, first + r0, view, base)
                if deq is None and sym is None:
                    sym = np.empty((target.shape[2], coded), dtype=np.uint8)
                # A fused job keeps no symbols: the decoder dequantizes each chunk as it goes.
                out = (n, coded) if deq is not None else sym[r0:r0 + n]
                jobs.append(([blob for _, blob in got], dtab[(l, k)], out, deq))
                owner.append(len(work))
                fused.append((deq, view))
            work.append((l, k, target, sym, fused, b"".join(sides), first))
        return {"jobs": jobs, "owner": owner, "work": work, "base": base, "shift": shift}

    def _placement(self, position_offset: int | None) -> tuple:
        """``(base, shift)`` for decoding with the first token at ``position_offset``:
        coded keys are rotated at positions from ``base``; ``shift`` is ``(ropes,
        delta)`` when keys coded post-RoPE must then be turned by ``delta`` positions."""
        if position_offset is None or position_offset == self.position_offset:
            return self.position_offset, None
        if not isinstance(position_offset, int) or isinstance(position_offset, bool):
            raise ShapeError(f"position_offset must be an integer, got {position_offset!r:.40}")
        if self.key_transform is not None:  # keys are coded pre-RoPE: rotate them there
            check_positions(self.key_transform, position_offset, self.num_tokens)
            return position_offset, None
        try:
            ropes = model_ropes(self.model, self.num_layers, self.head_dim)
        except ConfigError as exc:
            raise FormatError(f"{self._r.name}: its keys were coded with their rotary "
                              f"embedding and cannot be moved to another position: {exc}") from None
        return self.position_offset, (ropes, position_offset - self.position_offset)

    def _execute(self, prep: dict, threads: int = 0) -> None:
        """Decode prepared jobs (the GIL is released) and finish them into their targets."""
        self._finish(prep, threads)
        if prep["shift"] is not None:
            ropes, delta = prep["shift"]
            for l, k, target, *_ in prep["work"]:
                if k == "key" and ropes[l] is not None:
                    target.copy_(shift(target, ropes[l], delta))

    def _finish(self, prep: dict, threads: int) -> None:
        base = prep["base"]
        errors = tables.native().decode_many(prep["jobs"], self.chunk_tokens, threads)
        for err, w in zip(errors, prep["owner"]):
            if err is not None:
                l, k = prep["work"][w][:2]
                raise CorruptError(f"{self._r.name}: layer {l} {k}s: {err}")
        h, d = self.num_kv_heads, self.head_dim
        sink_keys = {}  # (rope, position, rows) -> [(target, sink rows)]: rotated together
        for l, k, target, sym, fused, side, first in prep["work"]:
            q = self._quant[(l, k)]
            rope_here = self._ropes[l] if k == "key" else None
            rows = target.shape[2]
            # Rows that are attention sinks come from the fp16 sinks section.
            n_sink = max(0, min(self.sink_tokens, first + rows) - first)
            if n_sink:
                at = first - self._starts[l]
                sinks = self._load_sinks()[self._streams.index((l, k)), at:at + n_sink]
            if fused[0][0] is not None:
                # Decoded, dequantized and re-rotated natively; only sink rows remain.
                for deq, view in fused:
                    if deq[4].base is None:  # a scratch array (else a view of `view`)
                        view.copy_(torch.from_numpy(deq[4]).unsqueeze(0))
                if n_sink and rope_here is not None:
                    sink_keys.setdefault((rope_here, base + first, n_sink), []).append((target, sinks))
                elif n_sink:
                    target[:, :, :n_sink] = unflatten(sinks.clone(), h, d)
                continue
            if q.alphabet < q.table_alphabet and sym[:, :self.channels].max(initial=0) >= q.alphabet:
                raise CorruptError(f"{self._r.name}: layer {l} {k}s decode to symbols outside "
                                   "the quantizer's range; the header does not match the data")
            side = (np.frombuffer(side, dtype="<f2").reshape(-1, q.side_per_token)
                    if q.side_per_token else None)
            x = q.dequantize(torch.from_numpy(sym), self._params[(l, k)], side)
            if n_sink:
                x[:n_sink] = sinks
            t = unflatten(x, h, d)
            if rope_here is not None:
                t = rope(t, rope_here, base + first)
            target.copy_(t)
        for (r, pos, n_sink), pairs in sink_keys.items():
            st = rope(torch.stack([unflatten(sinks, h, d)[0] for _, sinks in pairs], 1), r, pos)
            for i, (target, _) in enumerate(pairs):
                target[:, :, :n_sink] = st[:, i]

    def decode_into(self, dst: dict, chunks=None, *, threads: int = 0,
                    position_offset: int | None = None) -> None:
        """Decode layers straight into caller-owned tensors (no intermediate copies).

        Parameters
        ----------
        dst : dict
            ``{layer: (keys, values)}``, each a float tensor ``[1, kv_heads, tokens,
            head_dim]`` where tokens covers ``chunks``. Views of larger buffers are fine
            (e.g. ``buf[:, :, :n]`` of a cache preallocated with room for a prompt); with
            float32 targets whose tokens are contiguous the native decoder writes into
            them directly, other dtypes are cast into place.
        position_offset : int, optional
            Place the cache's first token at this position instead of where it was
            computed: keys come out rotated for their new positions (what
            :mod:`kvcodec.blend` does with position-independent chunks). Exact for
            files coded pre-RoPE (``rope_strip``); other files are turned by the
            position difference with the RoPE their model fingerprint records.
        """
        self._dense_only("decode_into")
        self._check_layers(dst.keys())
        self._execute(self._prepare(dst, self._chunk_range(chunks), position_offset), threads)

    def decode_layers(self, layers=None, chunks=None, *, dtype=None, threads: int = 0,
                      position_offset: int | None = None):
        """Decode chosen layers over a contiguous chunk range.

        Returns
        -------
        dict
            ``{layer: (keys, values)}``, each ``[1, kv_heads, tokens, head_dim]`` where
            tokens are what the layer holds within ``chunks`` (all chunks by default):
            every token, or for a sliding-window layer the part of its span there.
        """
        self._dense_only("decode_layers")
        chunks = self._chunk_range(chunks)
        layers = self._check_layers(layers)
        dst = {l: self._empty_layer(l, chunks, dtype or self.dtype) for l in layers}
        self.decode_into(dst, chunks, threads=threads, position_offset=position_offset)
        return dst

    def _empty_layer(self, layer: int, chunks: range, dtype) -> tuple:
        shape = (1, self.num_kv_heads, self._layer_span(layer, chunks)[1], self.head_dim)
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)

    @property
    def streaming(self) -> bool:
        """True when the source is a forward-only stream (bytes arrive as they are read)."""
        return self._r.streaming

    def iter_chunks(self, chunks=None, *, out: KVCache | None = None, dtype=None,
                    threads: int = 0):
        """Decode chunk by chunk, in file order, into preallocated tensors.

        This thread reads chunks' bytes as the source delivers them while a decode runs
        (native code, all threads, without the GIL); each decode takes every chunk that
        has arrived since the previous one was started. Over a slow stream that is one
        chunk at a time, decoding while the next is on the wire, and what remains after
        the last byte is the last chunk's decode; over a file or a fast link it is few,
        large decodes, about as fast as :meth:`decode`. Yields ``(chunk, t0, t1)`` once
        tokens ``[t0, t1)`` of every layer are in ``out``; if the source fails or ends
        early, the chunks that arrived are decoded and yielded before the error is
        raised.

        Parameters
        ----------
        out : KVCache, optional
            Destination, ``[1, kv_heads, tokens, head_dim]`` per layer, tokens being what
            the layer holds within the chunk range (as :meth:`decode_layers` sizes them);
            views of larger buffers are fine (allocated when omitted; read it from
            ``self.last_out``).
        """
        from concurrent.futures import ThreadPoolExecutor

        self._dense_only("iter_chunks")
        chunks = self._chunk_range(chunks)
        base, total = self._span(chunks)
        spans = [self._layer_span(l, chunks) for l in range(self.num_layers)]
        if out is None:
            pairs = [self._empty_layer(l, chunks, dtype or self.dtype)
                     for l in range(self.num_layers)]
            out = KVCache([k for k, _ in pairs], [v for _, v in pairs], length=total)
        elif out.layer_tokens != [n for _, n in spans]:
            raise ShapeError(f"out holds {out.layer_tokens} tokens per layer; need "
                             f"{[n for _, n in spans]}")
        self.last_out = out
        self._load_index()
        self._decode_tables()
        if self.sink_tokens:
            self._load_sinks()
        n = len(self._streams)

        def arrive(c: int) -> dict:
            """Chunk ``c``'s payload items, read and checked (while a decode runs)."""
            return self._read_items([(c, s) for s in range(n)],
                                    {(c * n, c * n + n - 1): self._read_run(c * n, c * n + n - 1)})

        def start(pool, arrived: list):
            """Plan the chunks in ``arrived`` and start their decode."""
            run = range(arrived[0][0], arrived[-1][0] + 1)
            items = {k: v for _, part in arrived for k, v in part.items()}
            dst = {}
            for l, (first, _) in enumerate(spans):
                at, rows = self._layer_span(l, run)
                if rows:
                    r0 = at - first
                    dst[l] = (out.keys[l][:, :, r0:r0 + rows], out.values[l][:, :, r0:r0 + rows])
            return run, pool.submit(self._execute, self._prepare(dst, run, items=items), threads)

        def finish(pending):
            run, future = pending
            future.result()  # a decode error is raised here
            for c in run:
                t0 = c * self.chunk_tokens - base
                yield c, t0, min(self.num_tokens - base, t0 + self.chunk_tokens)

        off, side, blob, _ = self._item_lists()
        payload = self._r.section_offset("payload")
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-decode") as pool:
            # Decoding starts once the source has made this thread wait: until then the
            # bytes are there already, and one large decode beats a first chunk decoded
            # alone while this thread copies the rest (the whole-file case, or a link
            # faster than the decoder).
            pending, arrived, failed, waited = None, [], None, False
            for c in chunks:
                last = c * n + n - 1
                end = payload + off[last] + side[last] + blob[last]
                try:
                    # A stream's bytes come a step at a time, so that a finished decode
                    # is followed at once by one of the chunks that arrived meanwhile.
                    while True:
                        t = time.perf_counter()
                        got = self._r.fill(end)
                        waited = waited or time.perf_counter() - t > self.STALL_S
                        if got:
                            break
                        if pending is not None and pending[1].done():
                            yield from finish(pending)
                            pending = None
                            if arrived:
                                pending, arrived = start(pool, arrived), []
                    arrived.append((c, arrive(c)))
                except KVCodecError as exc:  # decode what did arrive, then raise
                    failed = exc
                    break
                if pending is not None and pending[1].done():
                    yield from finish(pending)
                    pending = None
                if pending is None and waited:
                    pending, arrived = start(pool, arrived), []
            while pending is not None or arrived:
                if pending is not None:
                    yield from finish(pending)
                    pending = None
                if arrived:
                    pending, arrived = start(pool, arrived), []
            if failed is not None:
                raise failed

    def decode(self, chunks=None, *, dtype=None, threads: int = 0,
               position_offset: int | None = None) -> KVCache:
        """Decode every layer over ``chunks`` (default all) into a :class:`KVCache`
        (``position_offset``: see :meth:`decode_into`).

        An evicted file decodes to an evicted cache: the tokens each head keeps within
        the chunks' token span ``[t0, t1)``, ``kept`` positions relative to ``t0``,
        ``length = t1 - t0``."""
        chunks = self._chunk_range(chunks)
        if self.evicted:
            return self._decode_evicted(chunks, dtype, threads,
                                        *self._placement(position_offset))
        layers = self.decode_layers(None, chunks, dtype=dtype, threads=threads,
                                    position_offset=position_offset)
        t0, n = self._span(chunks)
        ids = None if self.token_ids is None else self.token_ids[t0:t0 + n]
        return KVCache([layers[l][0] for l in range(self.num_layers)],
                       [layers[l][1] for l in range(self.num_layers)], ids, self.model,
                       length=n)

