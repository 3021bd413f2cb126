"""Reading .kvc files: :class:`KVCFile` composes a checked header (``meta``), lazily
verified sections (``sections``) and decode plans (:mod:`.plan`), which it builds for
caller buffers and runs natively."""
from __future__ import annotations

import numpy as np
import torch

from ..core.checks import check_position_offset
from ..core.kvcache import KVCache
from ..core.quant import STEP_GRID, Uniform
from ..core.streams import KINDS
from ..core.transforms import check_positions, model_ropes, rope_tables
from ..errors import ConfigError, FormatError, ShapeError
from .container import Reader, untrusted
from .evicted import plan_evicted
from .header import FileHeader
from .plan import DecodePlan, Dequant, Job, Target, execute, in_place, out_dtype
from .sections import SectionSource
from .spec import DTYPES, head_rows
from .streaming import ChunkStreamer


# Header fields a KVCFile answers directly (see FileHeader for what each is).
_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "num_tokens", "chunk_tokens",
           "num_chunks", "channels", "dtype", "token_ids", "model", "config",
           "layer_tokens", "evicted", "position_offset", "anchor", "key_transform",
           "sink_tokens", "size_bytes", "name", "shared_tables")


class KVCFile:
    """An open .kvc file.

    ``source`` reads the container (sections, ranges, a stream's bytes as they come);
    ``meta`` is its header, every field checked on open (:class:`FileHeader`; its fields
    are also attributes of the file: ``num_tokens``, ``layer_tokens``, ``model``, ...);
    ``sections`` reads the index, tables, sinks and payload items when first needed,
    verified (:class:`SectionSource`). :meth:`plan` turns a request (layers, chunks,
    destinations) into a :class:`~kvcodec.format.plan.DecodePlan`, which
    :func:`~kvcodec.format.plan.execute` runs; :meth:`decode_into`, :meth:`decode_layers`,
    :meth:`decode` and :meth:`iter_chunks` do both."""

    # What its opener knows of which bytes these are (a local entry's inode, size and
    # mtime, a remote one's CRC-32 and size): ChunkStore.quarantine moves only those.
    identity = None

    def __init__(self, source: Reader, tables=None):
        self.source = source
        with untrusted(source.name):
            self.meta = FileHeader(source)
        self.sections = SectionSource(self.meta, source, tables)
        self._streams = {}   # (layer, kind) -> what its plans share (_stream)
        self._ropes_np = {}  # (position, rows, rope) -> NumPy cos/sin

    @property
    def header(self) -> dict:
        """The header as the file's JSON holds it."""
        return self.source.header

    @property
    def streaming(self) -> bool:
        """True when the source is a forward-only stream (bytes arrive as they are read)."""
        return self.source.streaming

    def numel(self) -> int:
        return self.meta.numel()

    def kept_counts(self) -> torch.Tensor:
        return self.meta.kept_counts()

    def bits_per_element(self) -> float:
        return self.meta.bits_per_element()

    def summary(self) -> dict:
        return self.meta.summary()

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- planning ---------------------------------------------------------------------
    def _dense_only(self, method: str) -> None:
        if self.meta.evicted:
            raise FormatError(f"{self.meta.name} holds an evicted cache (each head keeps its "
                              f"own tokens), which {method} cannot lay out as dense "
                              "[1, kv_heads, tokens, head_dim] tensors; decode it with "
                              "decode()")

    def placement(self, position_offset: int | None) -> tuple:
        """``(base, turn)`` for decoding with the first token at ``position_offset``:
        coded keys are rotated at positions from ``base``; ``turn`` is ``(ropes,
        delta)`` when keys coded post-RoPE must then be turned by ``delta`` positions."""
        m = self.meta
        if position_offset is None:
            return m.position_offset, None
        position_offset = check_position_offset(position_offset, m.num_tokens)
        if position_offset == m.position_offset:
            return m.position_offset, None
        if m.key_transform is not None:  # keys are coded pre-RoPE: rotate them there
            check_positions(m.key_transform, position_offset, m.num_tokens)
            return position_offset, None
        try:
            ropes = model_ropes(m.model, m.num_layers, m.head_dim)
        except ConfigError as exc:
            raise FormatError(f"{m.name}: its keys were coded with their rotary embedding "
                              f"and cannot be moved to another position: {exc}") from None
        return m.position_offset, (ropes, position_offset - m.position_offset)

    def _stream(self, l: int, k: str) -> tuple:
        """What every plan of stream ``(l, k)`` shares, worked out once per file: its
        index, quantizer, coded columns, RoPE (keys), name, decode tables, parameters,
        and the fused path's constants (:meth:`_dequant`), None where there is no fused
        path (other quantizers than per-token-step uniform, partial rotary dims)."""
        got = self._streams.get((l, k))
        if got is None:
            m, sec = self.meta, self.sections
            q, params = m.quant[(l, k)], sec.params()[(l, k)]
            rope_here = m.ropes[l] if k == "key" else None
            hd, fused = m.num_kv_heads * m.head_dim, None
            if isinstance(q, Uniform) and q.scale == "token" and (
                    rope_here is None or rope_here.rotary_dim == m.head_dim):
                mean = (np.ascontiguousarray(params["mean"], dtype=np.float32)
                        if q.center else None)
                fused = (q.dequant_mult(hd), q.r, mean, q.dequant_basis(hd))
            got = self._streams[(l, k)] = (
                m.stream_index[(l, k)], q, m.coded_columns(q), rope_here,
                f"{m.name}: layer {l} {k}s", sec.decode_tables()[(l, k)], params, fused)
        return got

    def _dequant(self, fused: tuple, layer_rope, pos: int, rows: int,
                 out: np.ndarray | None) -> Dequant:
        """The fused-path spec (``fused``: a stream's constants, :meth:`_stream`) for
        ``rows`` rows from position ``pos``. It writes into ``out`` (``[heads, rows,
        head_dim]``, a NumPy view of the destination, :func:`~.plan.in_place`) where
        given; otherwise into a scratch array that :func:`~kvcodec.format.plan.finish`
        casts into the destination."""
        h, d = self.meta.num_kv_heads, self.meta.head_dim
        scratch = out is None
        if scratch:
            out = np.empty((h, rows, d), dtype=np.float32)
        cos = sin = None
        if layer_rope is not None:
            cos, sin = self.rope_arrays(pos, rows, layer_rope)
        mult, r, mean, basis = fused
        return Dequant(STEP_GRID, mult, r, h, out, cos, sin, scratch=scratch, add=mean,
                       basis=basis)

    def rope_arrays(self, pos: int, rows: int, layer_rope):
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
        first, rows = self.meta.layer_span(layer, chunks)
        if rows == 0:
            return []
        c0, pieces = first // self.meta.chunk_tokens, []
        head = head_rows(first, rows, self.meta.chunk_tokens)
        if head:
            pieces.append((range(c0, c0 + 1), 0, head))
            c0 += 1
        if head < rows:
            pieces.append((range(c0, chunks[-1] + 1), head, rows - head))
        return pieces

    def plan(self, dst: dict, chunks=None, *, position_offset: int | None = None,
             items: dict | None = None) -> DecodePlan:
        """The decode of layers ``dst`` over ``chunks`` (see :meth:`decode_into`) as a
        :class:`~kvcodec.format.plan.DecodePlan`: the payload items read and verified
        (unless ``items`` holds them: :meth:`SectionSource.read_items`), a native job per
        stream and run of chunks, a target per stream. Plans of several files
        concatenate (:meth:`DecodePlan.extend`) and run as one native call."""
        self._dense_only("plan")
        # The caller's request is checked outside untrusted(): a junk destination or chunk
        # request was a CorruptError, the file's damage (a store moves such entries aside).
        chunks = self.meta.chunk_range(chunks)
        if not isinstance(dst, dict) or not all(
                isinstance(p, (tuple, list)) and len(p) == 2
                and all(isinstance(t, torch.Tensor) for t in p) for p in dst.values()):
            raise ShapeError("dst must be {layer: (keys, values)} of tensors, got "
                             f"{type(dst).__name__} {str(dst)[:60]}")
        with untrusted(self.meta.name):
            return self._plan(dst, chunks, position_offset, items)

    def _plan(self, dst: dict, chunks, position_offset, items) -> DecodePlan:
        m, sec = self.meta, self.sections
        chunks = m.chunk_range(chunks)
        m.check_layers(dst.keys())
        base, turn = self.placement(position_offset)
        todo, h, d = [], m.num_kv_heads, m.head_dim
        for l, pair in dst.items():  # per layer: its rows and how they split into jobs
            first, rows = m.layer_span(l, chunks)
            for k, target in zip(KINDS, pair):
                if target.shape != (1, h, rows, d) or target.dtype not in _FLOATS:
                    raise ShapeError(f"destination of layer {l} {k}s is {target.dtype} "
                                     f"{tuple(target.shape)}; need a float {(1, h, rows, d)}")
            if rows:
                todo.append((l, pair, first, rows, self._pieces(l, chunks)))
        if items is None:
            items = sec.read_items([(c, self._stream(l, k)[0]) for l, _, _, _, pieces in todo
                                    for k in KINDS for prange, _, _ in pieces for c in prange])
        plan = DecodePlan(m.chunk_tokens)
        sinks = sec.sinks().numpy() if m.sink_tokens else None
        for l, pair, first, rows, pieces in todo:
            n_sink = max(0, min(m.sink_tokens, first + rows) - first)
            for k, target in zip(KINDS, pair):
                s, q, coded, rope_here, name, tab, params, fused = self._stream(l, k)
                t = Target(name, target, q, params, rope=rope_here, base=base, first=first)
                if turn is not None and k == "key" and turn[0][l] is not None:
                    t.turn = (turn[0][l], turn[1])
                if n_sink:
                    at = first - m.starts[l]
                    t.sinks = sinks[s, at:at + n_sink]
                arr = None if fused is None else in_place(target)
                jobs, sides = [], []
                for prange, r0, n in pieces:
                    got = [items[(c, s)] for c in prange]
                    sides += [side for side, _ in got]
                    blobs = [blob for _, blob in got]
                    if fused is None:  # symbols, dequantized by finish()
                        if t.symbols is None:
                            t.symbols = np.empty((rows, coded), dtype=np.uint8)
                        jobs.append(Job(blobs, tab, t.symbols[r0:r0 + n]))
                        continue
                    # A fused job keeps no symbols: the decoder dequantizes each chunk as
                    # it goes. The destination view matters only where it wrote a scratch.
                    deq = self._dequant(fused, rope_here, base + first + r0, n,
                                        None if arr is None else arr[:, r0:r0 + n])
                    if t.sinks is not None and r0 == 0 and t.turn is None and n_sink <= n:
                        deq.sinks = t.sinks  # the decoder writes them (rotated: keys)
                    jobs.append(Job(blobs, tab, (n, coded), deq))
                    t.fused.append((deq, None if arr is not None else target
                                    if n == rows else target[:, :, r0:r0 + n]))
                    t.rotated = deq.cos is not None
                t.side = b"".join(sides)
                plan.add(t, jobs)
        return plan

    # -- decoding ---------------------------------------------------------------------
    def decode_into(self, dst: dict, chunks=None, *, threads: int = 0,
                    position_offset: int | None = None) -> None:
        """Decode layers straight into caller-owned tensors (no intermediate copies).

        Parameters
        ----------
        dst : dict
            ``{layer: (keys, values)}``, each a float tensor ``[1, kv_heads, tokens,
            head_dim]`` where tokens covers ``chunks``. Views of larger buffers are fine
            (e.g. ``buf[:, :, :n]`` of a cache preallocated with room for a prompt); with
            float32 or bfloat16 targets whose channels are contiguous the native decoder
            writes into them directly (:func:`~.plan.in_place`), other dtypes are cast
            into place.
        position_offset : int, optional
            Place the cache's first token at this position instead of where it was
            computed: keys come out rotated for their new positions (what
            :mod:`kvcodec.blend` does with position-independent chunks). Exact for
            files coded pre-RoPE (``rope_strip``); other files are turned by the
            position difference with the RoPE their model fingerprint records.
        """
        execute(self.plan(dst, chunks, position_offset=position_offset), threads)

    def empty_layers(self, layers=None, chunks=None, dtype=None) -> dict:
        """``{layer: (keys, values)}`` of uninitialized tensors sized for ``chunks`` (all
        by default), as :meth:`decode_into` takes them."""
        chunks = self.meta.chunk_range(chunks)
        dtype = out_dtype(dtype, self.meta.dtype)
        out = {}
        for l in self.meta.check_layers(layers):
            shape = (1, self.meta.num_kv_heads, self.meta.layer_span(l, chunks)[1],
                     self.meta.head_dim)
            out[l] = (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
        return out

    def empty_cache(self, chunks=None, dtype=None) -> KVCache:
        """An uninitialized :class:`KVCache` sized for ``chunks``, for :meth:`iter_chunks`."""
        pairs = self.empty_layers(None, chunks, dtype)
        return KVCache([k for k, _ in pairs.values()], [v for _, v in pairs.values()],
                       length=self.meta.span(self.meta.chunk_range(chunks))[1])

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
        dst = self.empty_layers(layers, chunks, dtype)
        self.decode_into(dst, chunks, threads=threads, position_offset=position_offset)
        return dst

    def iter_chunks(self, chunks=None, *, out: KVCache | None = None, dtype=None,
                    threads: int = 0):
        """Decode chunk by chunk, in file order, into preallocated tensors, while the
        source delivers the bytes (:mod:`kvcodec.format.streaming`). Yields ``(chunk, t0,
        t1)`` once tokens ``[t0, t1)`` of every layer are in ``out``; if the source fails
        or ends early, the chunks that arrived are decoded and yielded before the error
        is raised.

        Parameters
        ----------
        out : KVCache, optional
            Destination, ``[1, kv_heads, tokens, head_dim]`` per layer, tokens being what
            the layer holds within the chunk range (:meth:`empty_cache` makes one; views of
            larger buffers are fine). Allocated when omitted.
        """
        self._dense_only("iter_chunks")
        chunks = self.meta.chunk_range(chunks)
        spans = [self.meta.layer_span(l, chunks)[1] for l in range(self.meta.num_layers)]
        if out is None:
            out = self.empty_cache(chunks, dtype)
        elif out.layer_tokens != spans:
            raise ShapeError(f"out holds {out.layer_tokens} tokens per layer; need {spans}")
        return iter(ChunkStreamer(self, chunks, out, threads))

    def decode(self, chunks=None, *, dtype=None, threads: int = 0,
               position_offset: int | None = None) -> KVCache:
        """Decode every layer over ``chunks`` (default all) into a :class:`KVCache`
        (``position_offset``: see :meth:`decode_into`).

        An evicted file decodes to an evicted cache: the tokens each head keeps within
        the chunks' token span ``[t0, t1)``, ``kept`` positions relative to ``t0``,
        ``length = t1 - t0``."""
        m = self.meta
        chunks = m.chunk_range(chunks)
        t0, n = m.span(chunks)
        ids = None if m.token_ids is None else m.token_ids[t0:t0 + n]
        if m.evicted:
            with untrusted(m.name):
                plan, keys, values, kept = plan_evicted(self, chunks, out_dtype(dtype, m.dtype),
                                                        *self.placement(position_offset))
            execute(plan, threads)
            return KVCache(keys, values, ids, m.model, length=n, kept=kept, anchor=m.anchor)
        layers = self.decode_layers(None, chunks, dtype=dtype, threads=threads,
                                    position_offset=position_offset)
        return KVCache([layers[l][0] for l in range(m.num_layers)],
                       [layers[l][1] for l in range(m.num_layers)], ids, m.model,
                       length=n, anchor=m.anchor)


_FLOATS = frozenset(DTYPES.values())


def _field(name):
    return property(lambda self: getattr(self.meta, name),
                    doc=f"The header's ``{name}`` (see :class:`FileHeader`).")


for _name in _FIELDS:
    setattr(KVCFile, _name, _field(_name))
