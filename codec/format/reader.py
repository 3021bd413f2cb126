"""Reading .kvc files: open any source lazily, plan a decode (which payload items, which
tables, where each stream lands), and run it natively straight into caller buffers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core import tables
from ..core.kvcache import KVCache
from ..core.quant import STEP_GRID, Uniform
from ..core.streams import KINDS, unflatten
from ..core.transforms import rope, rope_tables
from ..errors import CorruptError, KVCodecError, ShapeError
from .container import Reader, StreamBuffer
from .sections import SectionReader
from .spec import DTYPES


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


class KVCFile(SectionReader):
    """A parsed .kvc file: header fields are checked on open (:class:`FileHeader`),
    sections are read lazily (:class:`SectionReader`); this class plans and runs decodes.
    """

    def _fused_dequant(self, q, kind: str, t0: int, rows: int, dst: torch.Tensor):
        """The native dequantizer's arguments for per-token-step uniform streams (the
        shipped default), or None where the quantizer has no fused path. It writes
        straight into ``dst`` when that is a float32 CPU view with contiguous tokens;
        otherwise into a scratch array that is cast into ``dst`` afterwards."""
        if not (isinstance(q, Uniform) and q.scale == "token"):
            return None
        d = self.head_dim
        if (dst.dtype == torch.float32 and dst.device.type == "cpu" and dst.stride(3) == 1
                and dst.stride(2) == d):
            out = dst[0].numpy()
        else:
            out = np.empty((self.num_kv_heads, rows, d), dtype=np.float32)
        cos = sin = None
        if kind == "key" and self.key_transform:
            c, s = rope_tables(self.position_offset + t0, rows, d, self.key_transform["theta"])
            cos, sin = c.numpy(), s.numpy()
        mult = q._head_mult(self.channels).numpy()
        return (STEP_GRID, mult, q.r, self.num_kv_heads, out, cos, sin)


    def _prepare(self, dst: dict, chunks: range) -> dict:
        """Read and verify the payload items of ``dst``'s layers over ``chunks`` and build
        the native decode jobs (the I/O half of a decode; :meth:`_execute` is the rest)."""
        self._load_index()
        dtab = self._decode_tables()
        t0, rows = self._span(chunks)
        shape = (1, self.num_kv_heads, rows, self.head_dim)
        jobs, work = [], []
        for l, pair in dst.items():
            for k, target in zip(KINDS, pair):
                if tuple(target.shape) != shape or target.dtype not in DTYPES.values():
                    raise ShapeError(f"destination of layer {l} {k}s is {target.dtype} "
                                     f"{tuple(target.shape)}; need a float {shape}")
                s = self._streams.index((l, k))
                items = [self._read_item(c, s) for c in chunks]
                q = self._quant[(l, k)]
                out = np.empty((rows, self._coded(q)), dtype=np.uint8)
                deq = self._fused_dequant(q, k, t0, rows, target)
                jobs.append(([blob for _, blob in items], dtab[(l, k)], out, deq))
                work.append((l, k, target, out, deq, b"".join(side for side, _ in items)))
        return {"t0": t0, "rows": rows, "jobs": jobs, "work": work}

    def _execute(self, prep: dict, threads: int = 0) -> None:
        """Decode prepared jobs (the GIL is released) and finish them into their targets."""
        errors = tables.native().decode_many(prep["jobs"], self.chunk_tokens, threads)
        t0, rows = prep["t0"], prep["rows"]
        n_sink = max(0, min(self.sink_tokens - t0, rows))
        for err, (l, k, target, out, deq, side) in zip(errors, prep["work"]):
            if err is not None:
                raise CorruptError(f"{self._r.name}: layer {l} {k}s: {err}")
            q = self._quant[(l, k)]
            rope_here = k == "key" and self.key_transform
            if deq is not None:
                # Decoded, dequantized and re-rotated natively; only sink rows remain.
                if deq[4].ctypes.data != target.data_ptr():
                    target.copy_(torch.from_numpy(deq[4]).unsqueeze(0))
                if n_sink:
                    x = self._load_sinks()[self._streams.index((l, k)), t0:t0 + n_sink].clone()
                    st = unflatten(x, self.num_kv_heads, self.head_dim)
                    if rope_here:
                        st = rope(st, self.key_transform["theta"], self.position_offset + t0)
                    target[:, :, :n_sink] = st
                continue
            if q.alphabet < q.table_alphabet and out[:, :self.channels].max(initial=0) >= q.alphabet:
                raise CorruptError(f"{self._r.name}: layer {l} {k}s decode to symbols outside "
                                   "the quantizer's range; the header does not match the data")
            side = (np.frombuffer(side, dtype="<f2").reshape(-1, q.side_per_token)
                    if q.side_per_token else None)
            x = q.dequantize(torch.from_numpy(out), self._params[(l, k)], side)
            if n_sink:
                x[:n_sink] = self._load_sinks()[self._streams.index((l, k)), t0:t0 + n_sink]
            t = unflatten(x, self.num_kv_heads, self.head_dim)
            if rope_here:
                t = rope(t, self.key_transform["theta"], self.position_offset + t0)
            target.copy_(t)

    def decode_into(self, dst: dict, chunks=None, *, threads: int = 0) -> None:
        """Decode layers straight into caller-owned tensors (no intermediate copies).

        Parameters
        ----------
        dst : dict
            ``{layer: (keys, values)}``, each a float tensor ``[1, kv_heads, tokens,
            head_dim]`` where tokens covers ``chunks``. Views of larger buffers are fine
            (e.g. ``buf[:, :, :n]`` of a cache preallocated with room for a prompt); with
            float32 targets whose tokens are contiguous the native decoder writes into
            them directly, other dtypes are cast into place.
        """
        self._check_layers(dst.keys())
        self._execute(self._prepare(dst, self._chunk_range(chunks)), threads)

    def decode_layers(self, layers=None, chunks=None, *, dtype=None, threads: int = 0):
        """Decode chosen layers over a contiguous chunk range.

        Returns
        -------
        dict
            ``{layer: (keys, values)}``, each ``[1, kv_heads, tokens, head_dim]`` where
            tokens covers ``chunks`` (all chunks by default).
        """
        chunks = self._chunk_range(chunks)
        layers = self._check_layers(layers)
        shape = (1, self.num_kv_heads, self._span(chunks)[1], self.head_dim)
        dtype = dtype or self.dtype
        dst = {l: (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
               for l in layers}
        self.decode_into(dst, chunks, threads=threads)
        return dst

    @property
    def streaming(self) -> bool:
        """True when the source is a forward-only stream (bytes arrive as they are read)."""
        return self._r.streaming

    def iter_chunks(self, chunks=None, *, out: KVCache | None = None, dtype=None,
                    threads: int = 0):
        """Decode chunk by chunk, in file order, into preallocated tensors.

        A reader thread fetches chunk ``i + 1``'s bytes while chunk ``i`` decodes (native
        code, without the GIL), so over a stream decoding overlaps the transfer. Yields ``(chunk, t0, t1)`` once tokens ``[t0, t1)`` of every layer are
        in ``out``.

        Parameters
        ----------
        out : KVCache, optional
            Destination, ``[1, kv_heads, tokens, head_dim]`` per layer covering the chunk
            range; views of larger buffers are fine (allocated when omitted; read it from
            ``self.last_out``).
        """
        from concurrent.futures import ThreadPoolExecutor

        chunks = self._chunk_range(chunks)
        base, total = self._span(chunks)
        dtype = dtype or self.dtype
        if out is None:
            shape = (1, self.num_kv_heads, total, self.head_dim)
            out = KVCache([torch.empty(shape, dtype=dtype) for _ in range(self.num_layers)],
                          [torch.empty(shape, dtype=dtype) for _ in range(self.num_layers)])
        elif out.num_layers != self.num_layers or out.num_tokens != total:
            raise ShapeError(f"out holds {out.num_layers} layers x {out.num_tokens} tokens; "
                             f"need {self.num_layers} x {total}")
        self.last_out = out

        def step(c):
            t0 = c * self.chunk_tokens - base
            t1 = min(self.num_tokens - base, t0 + self.chunk_tokens)
            dst = {l: (out.keys[l][:, :, t0:t1], out.values[l][:, :, t0:t1])
                   for l in range(self.num_layers)}
            return (c, t0, t1), self._prepare(dst, range(c, c + 1))

        # Everything but the payload is read up front, so the reader thread below is the
        # only one touching the source while chunks decode here.
        self._load_index()
        self._decode_tables()
        if self.sink_tokens:
            self._load_sinks()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-read") as pool:
            ahead = pool.submit(step, chunks[0])
            for i in range(len(chunks)):
                span, prep = ahead.result()
                if i + 1 < len(chunks):
                    ahead = pool.submit(step, chunks[i + 1])  # read while this one decodes
                self._execute(prep, threads)
                yield span

    def decode(self, chunks=None, *, dtype=None, threads: int = 0) -> KVCache:
        """Decode every layer over ``chunks`` (default all) into a :class:`KVCache`."""
        chunks = self._chunk_range(chunks)
        layers = self.decode_layers(None, chunks, dtype=dtype, threads=threads)
        t0 = chunks[0] * self.chunk_tokens
        ids = None
        if self.token_ids is not None:
            ids = self.token_ids[t0:t0 + layers[0][0].shape[2]]
        return KVCache([layers[l][0] for l in range(self.num_layers)],
                       [layers[l][1] for l in range(self.num_layers)], ids, self.model)

