"""Host staging of a GPU decode (:func:`kvcodec.integrations.cuda.prepare_many`).

Every part's work items become records of one NumPy structured array in the kernel's
own ``DecodeItem`` layout (``_cuda.DECODE_ITEM_FIELDS``), copied to the device as they
are. The small float arrays the kernel reads (step multipliers, channel offsets, RoPE
tables, the sink rows with their RoPE applied) go into one host arena uploaded with the
payload, and the symbols of every stream into one scratch buffer: a launch costs a
handful of device copies and allocations whatever its number of files, layers and
chunks, where it used to cost a few per stream and file.
"""
from __future__ import annotations

import functools
from collections import namedtuple

import numpy as np
import torch

from ..core.quant import Uniform
from ..errors import ShapeError

DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

#: Record fields that point into one of the launch's own buffers: until
#: :meth:`Arenas.rebase` they hold the offset there plus one (0 stays null).
RELATIVE = {"blob": "payload", "mult": "floats", "add": "floats", "cos": "floats",
            "sin": "floats", "sink": "floats", "symbols": "symbols"}

Staged = namedtuple("Staged", "records name keep finish")  # one file's part; name(i): item i's

def fused(q) -> bool:
    """Streams the kernel dequantizes itself: per-token-step ``uniform``, centered or not
    (the shipped default); the others decode symbols on the GPU and dequantize in PyTorch."""
    return isinstance(q, Uniform) and q.scale == "token" and not q.transformed


@functools.lru_cache(maxsize=4)
def item_dtype(fields: tuple, itemsize: int) -> np.dtype:
    """The structured dtype of ``DecodeItem`` records, from the module's field table."""
    names, (offsets, formats) = [n for n, _ in fields], zip(*(v for _, v in fields))
    return np.dtype({"names": names, "formats": ["<" + f for f in formats],
                     "offsets": list(offsets), "itemsize": itemsize})


class Arena:
    """Host bytes bound for one device buffer: pieces appended, each at an aligned offset."""

    def __init__(self, align: int = 1):
        self.pieces, self.size, self.align = [], 0, align

    def put(self, data) -> int:
        """Append ``data`` (bytes-like); its offset plus one (what a relative field holds)."""
        at = -(-self.size // self.align) * self.align
        if at > self.size:
            self.pieces.append(bytes(at - self.size))
        mv = memoryview(data).cast("B")
        self.pieces.append(mv)
        self.size = at + mv.nbytes
        return at + 1

    def reserve_many(self, sizes: np.ndarray) -> np.ndarray:
        """Room for pieces of ``sizes`` bytes written on the device only (the symbol
        scratch), each aligned: their offsets plus one."""
        padded = -(-np.asarray(sizes, dtype=np.int64) // self.align) * self.align
        at = -(-self.size // self.align) * self.align + np.concatenate([[0], np.cumsum(padded)[:-1]])
        self.size = int(at[-1] + padded[-1]) if len(at) else self.size
        return at + 1


class Arenas:
    """The launch's three buffers as they are filled: payload blobs, float arrays and
    symbol scratch (sizes only), then on the device (:meth:`upload`)."""

    def __init__(self):
        self.payload, self.floats, self.symbols = Arena(), Arena(16), Arena(16)
        self.device = {}

    def upload(self, dev) -> None:
        """Payload and floats in one host-to-device copy; the symbol scratch allocated."""
        start = -(-self.payload.size // 16) * 16
        total = start + self.floats.size
        data = torch.empty(max(1, total), dtype=torch.uint8, device=dev)
        # Pinned: an asynchronous copy at full link speed. Torch's caching host allocator
        # reuses the block for a later upload only once this copy has read it.
        host = torch.empty(max(1, total), dtype=torch.uint8, pin_memory=data.is_cuda)
        view = host.numpy()
        for at, arena in ((0, self.payload), (start, self.floats)):
            for p in arena.pieces:
                p = np.frombuffer(p, dtype=np.uint8)
                view[at:at + p.size] = p
                at += p.size
        data.copy_(host, non_blocking=True)
        sym = torch.empty(max(1, self.symbols.size), dtype=torch.uint8, device=dev)
        self.device = {"payload": (data, 0), "floats": (data, start), "symbols": (sym, 0)}

    def rebase(self, records: np.ndarray) -> None:
        """Relative fields of ``records`` to device addresses (after :meth:`upload`)."""
        for field, arena in RELATIVE.items():
            buf, start = self.device[arena]
            col = records[field]
            live = col != 0
            col[live] += np.uint64(buf.data_ptr() + start - 1)

    def symbols_view(self, at: int, rows: int, cols: int) -> torch.Tensor:
        """The device symbols ``[rows, cols]`` reserved at ``at`` (as
        :meth:`Arena.reserve_many` returned it)."""
        return self.device["symbols"][0][at - 1:at - 1 + rows * cols].view(rows, cols)


def stage(dfile, part, dtype, ar: Arenas, grid: torch.Tensor, dt: np.dtype) -> Staged:
    """One file's work items as records ``dt`` (relative fields into ``ar``), a name for
    each (errors name the item), what they keep alive and the finishing step (the streams
    the kernel does not dequantize)."""
    from ..core.streams import KINDS

    f, dev, sec = dfile.f.meta, dfile.device, dfile.f.sections
    params = sec.params()
    chunks = f.chunk_range(part.chunks)
    t0 = chunks[0] * f.chunk_tokens
    n = min(f.num_tokens, (chunks[-1] + 1) * f.chunk_tokens) - t0
    h, d = f.num_kv_heads, f.head_dim
    out, slots, block_size = part.out, part.slots, part.block_size
    if out is None:
        if slots is not None:
            raise ShapeError("a paged decode needs its destination caches (out)")
        out = [tuple(torch.empty((1, h, n, d), dtype=dtype, device=dev) for _ in KINDS)
               for _ in range(f.num_layers)]
    if len(out) != f.num_layers:
        raise ShapeError(f"out has {len(out)} layers; the file has {f.num_layers}")
    if slots is not None and (slots.shape != (n,) or slots.dtype != torch.int64
                              or slots.device != dev or block_size < 1):
        raise ShapeError(f"slots must be int64 [{n}] on {dev} with block_size >= 1")
    pos = {s: i for i, s in enumerate(f.streams)}
    lks = [(l, k) for l in range(f.num_layers) for k in KINDS]
    data, got = sec.read_span(chunks)  # one read, checked, uploaded as it is
    # Per stream (layer-major, keys then values), then per item (stream-major, its chunks).
    qs = [f.quant[lk] for lk in lks]
    fz = np.array([fused(q) for q in qs])
    cols = np.array([f.coded_columns(q) for q in qs], dtype=np.int64)
    sym_at = ar.symbols.reserve_many(n * cols)
    r0 = np.array([c * f.chunk_tokens - t0 for c in chunks], dtype=np.int64)
    per_stream, per_chunk = _expanders(len(lks), len(chunks))
    rec = np.zeros(len(lks) * len(chunks), dtype=dt)
    items = [got[c, pos[lk]] for lk in lks for c in chunks]
    rec["blob"] = ar.payload.put(data) + np.array([at for _, at, _ in items], dtype=np.int64)
    rec["size"] = [size for _, _, size in items]
    rec["rows"] = per_chunk(np.minimum(f.chunk_tokens, n - r0))
    rec["channels"] = per_stream(cols)
    rec["symbol_table"] = per_stream([dfile.tables[lk][1].data_ptr() for lk in lks])
    rec["range_table"] = per_stream([dfile.tables[lk][2].data_ptr() for lk in lks])
    rec["symbols"] = per_stream(sym_at) + per_chunk(r0) * per_stream(cols)
    if fz.any():  # the streams the kernel dequantizes: where their rows go, and how
        fused_at = _fused_fields(dfile, part, out, dtype, ar, grid, lks, fz, pos, t0, r0, n)
        live = per_stream(fz)
        for name, col in fused_at.items():
            rec[name] = np.where(live, col, 0)
    sides = {lk: b"".join(got[c, pos[lk]][0] for c in chunks)
             for lk, z in zip(lks, fz) if not z}
    symbols = dict(zip(lks, sym_at.tolist()))

    def name(i: int) -> str:
        (l, k), c = lks[i // len(chunks)], chunks[i % len(chunks)]
        return f"{f.name}: chunk {c}, layer {l} {k}s"

    def finish():
        dfile.finish_unfused(out, {lk: ar.symbols_view(symbols[lk], n, f.coded_columns(f.quant[lk]))
                                   for lk in sides}, sides, params, t0, n, dtype, slots,
                             block_size)
        return out

    return Staged(rec, name, [grid, dfile.tables, out, slots], finish)


def _fused_fields(dfile, part, out, dtype, ar, grid, lks, fz, pos, t0, r0, n) -> dict:
    """The fused streams' record columns (per item; rows of unfused streams are dropped
    by the caller): dequantization parameters, RoPE and sink rows, destinations."""
    from ..core.streams import KINDS
    from ..core.transforms import rope_tables, rotate

    f, sec = dfile.f.meta, dfile.f.sections
    qs, params, start = [f.quant[lk] for lk in lks], sec.params(), f.position_offset + t0
    h, d = f.num_kv_heads, f.head_dim
    ns = len(lks)
    per_stream, per_chunk = _expanders(ns, len(r0))
    col = {"dtype": DTYPES[dtype], "heads": h, "head_dim": d, "grid": grid.data_ptr()}
    col["half_range"] = per_stream([q.r if z else 0 for q, z in zip(qs, fz)])
    # Step multipliers of every fused stream in one piece; channel means likewise.
    one = np.ones(f.channels, dtype="<f4")
    mult = np.stack([q.head_mult_array(f.channels) if z else one for q, z in zip(qs, fz)])
    col["mult"] = per_stream(ar.floats.put(mult.astype("<f4")) + 4 * f.channels * np.arange(ns))
    centered = [bool(z and q.center) for q, z in zip(qs, fz)]
    if any(centered):
        means = np.stack([np.asarray(params[lk]["mean"], dtype="<f4") if c else one
                          for lk, c in zip(lks, centered)])
        at = ar.floats.put(means) + 4 * f.channels * np.arange(ns)
        col["add"] = per_stream(np.where(centered, at, 0))
    ropes = {r: tuple(ar.floats.put(t.numpy()) for t in rope_tables(start, n, r))
             for r in set(f.ropes) - {None}}
    keys_rope = [ropes.get(f.ropes[l]) if k == "key" else None for l, k in lks]
    for j, name in enumerate(("cos", "sin")):
        base = per_stream([0 if r is None else r[j] for r in keys_rope])
        col[name] = np.where(base != 0, base + per_chunk(r0) * d * 4, 0)
    col["first_row"] = per_chunk(np.maximum(0, f.sink_tokens - (t0 + r0)))
    sinks = _sinks(f, sec, ar, [lk for lk, z in zip(lks, fz) if z], pos, t0, n, start,
                   rope_tables, rotate)
    base = per_stream([sinks.get(lk, 0) for lk in lks])
    col["sink"] = np.where((base != 0) & (col["first_row"] > 0),
                           base + per_chunk(r0) * h * d * 4, 0)
    dsts = [out[l][KINDS.index(k)] for l, k in lks]
    col["stride_dim"] = per_stream([t.stride(3) for t in dsts])
    ptr = per_stream([t.data_ptr() for t in dsts])
    if part.slots is None:
        col["stride_head"] = per_stream([t.stride(1) for t in dsts])
        col["stride_token"] = per_stream([t.stride(2) for t in dsts])
        col["dst"] = ptr + per_chunk(r0) * col["stride_token"] * dsts[0].element_size()
    else:
        col["stride_head"] = per_stream([t.stride(2) for t in dsts])
        col["stride_token"] = per_stream([t.stride(1) for t in dsts])
        col["stride_block"] = per_stream([t.stride(0) for t in dsts])
        col["dst"], col["block_size"] = ptr, part.block_size
        col["slots"] = part.slots.data_ptr() + 8 * per_chunk(r0)
    return col


def _expanders(streams: int, chunks: int) -> tuple:
    """Per-item columns (items stream-major, each stream's chunks in order) from values
    per stream and from values per chunk."""
    return (lambda a: np.repeat(np.asarray(a), chunks)), (lambda a: np.tile(a, streams))


def _sinks(f, sec, ar: Arenas, fused_lks: list, pos: dict, t0: int, n: int, start: int,
           rope_tables, rotate) -> dict:
    """The sink rows of the span's fused streams ``fused_lks`` (``pos``: stream -> its
    index) as the CPU decoder restores them (fp16 rows, keys turned by their layer's
    RoPE), float32 in ``ar.floats``: per stream the relative address of its ``[n_sink,
    channels]`` rows."""
    n_sink = max(0, min(f.sink_tokens - t0, n))
    if not n_sink:
        return {}
    h, d = f.num_kv_heads, f.head_dim
    groups = {}  # streams by the RoPE their rows need (None: values, unrotated keys)
    for l, k in fused_lks:
        groups.setdefault(f.ropes[l] if k == "key" else None, []).append((l, k))
    rows, out = sec.sinks().numpy(), {}
    for r, lks in groups.items():
        x = rows[[pos[lk] for lk in lks], t0:t0 + n_sink]  # [streams, n_sink, channels]
        if r is not None:
            cos, sin = (t.numpy() for t in rope_tables(start, n_sink, r))
            y = rotate(x.reshape(len(lks), n_sink, h, d).transpose(0, 2, 1, 3), cos, sin)
            x = y.transpose(0, 2, 1, 3).reshape(len(lks), n_sink, h * d)
        at = ar.floats.put(np.ascontiguousarray(x, dtype="<f4"))
        for j, lk in enumerate(lks):
            out[lk] = at + j * n_sink * h * d * 4
    return out
