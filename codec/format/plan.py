"""Decode plans: the one way a .kvc file's bytes become tensors.

A :class:`DecodePlan` lists native decode :class:`Job` s (each a stream's rANS blobs over
a run of chunks, its tables, where its symbols go, and, on the fused path, a named
:class:`Dequant` spec so that the native decoder dequantizes and re-applies RoPE as it
goes) and the :class:`Target` each job fills (a stream's destination rows and what is
left to do there). Plans of several files (or several calls on one file) concatenate
with :meth:`DecodePlan.extend` and run as one native call. :func:`execute` runs a plan on
the CPU and :func:`finish` completes its targets: dequantization where the native decoder
did not do it, the fp16 attention-sink rows, keys rotated at their positions, and keys
coded after RoPE turned to a new position. The GPU decoder (:mod:`kvcodec.integrations.cuda`)
plans with the same file API.

Plans are built by the file (:meth:`kvcodec.format.KVCFile.plan`); building one reads
and verifies the payload items it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import tables
from ..core.streams import flatten, unflatten
from ..core.transforms import rope, shift
from ..errors import CorruptError, ShapeError


@dataclass(slots=True)
class Dequant:
    """The native dequantizer's arguments for one job of a per-token-step ``uniform``
    stream (the shipped default): the step grid, per-channel step multipliers, the
    quantizer's half range, the heads the channels split into, where the values go
    (``out``: ``[heads, rows, head_dim]``, a view of the destination, float32 or
    bfloat16 bits as uint16, or a float32 ``scratch`` array copied there afterwards),
    cos/sin of the rows' positions for keys (None: not rotated natively), and ``add``,
    the per-channel offset a centered stream adds back before RoPE (None: none; with
    ``add_rows``, ``[blocks, channels]``: one row of offsets per ``add_rows`` rows, for
    entries decoded as one stream, :mod:`.stacked`), and ``basis``, a ``klt`` stream's
    inverse transform (``[heads, head_dim, head_dim]``, :mod:`kvcodec.core.klt`; None for
    channel-coded streams). ``placed``: where the rows go instead of ``out`` (which
    then only gives the shape and dtype): ``(flat, head_stride, chan, row_at)``, a 1-D
    array of ``out``'s dtype, the elements between heads, between channels (or an int64
    array of each channel's place from its row's head start), and per row where its
    head 0 starts in ``flat`` (negative: not stored), as the vLLM
    worker decodes into the paged cache's blocks
    (:mod:`kvcodec.integrations.vllm.placed`). ``sinks``: attention-sink rows the
    decoder writes in place of the first ``sink_rows`` rows of every ``sink_every``
    rows (float32 ``[blocks * sink_rows, channels]``; ``sink_every`` 0: one block, and
    ``sink_rows`` 0: every row of ``sinks``), rotated where keys
    are and stored as any row (entries decoded as one stream, :mod:`.stacked`; None:
    :func:`finish` restores them)."""

    grid: np.ndarray
    mult: np.ndarray
    half_range: int
    heads: int
    out: np.ndarray
    cos: np.ndarray | None = None
    sin: np.ndarray | None = None
    scratch: bool = False
    add: np.ndarray | None = None
    add_rows: int = 0
    basis: np.ndarray | None = None
    placed: tuple | None = None
    sinks: np.ndarray | None = None
    sink_every: int = 0
    sink_rows: int = 0

    def native(self) -> tuple:
        out = self.out if self.placed is None else self.placed
        args = (self.grid, self.mult, self.half_range, self.heads, out, self.cos,
                self.sin, self.add)
        if self.sinks is not None:
            return args + (self.add_rows, self.basis, self.sinks, self.sink_every,
                           self.sink_rows or len(self.sinks))
        if self.basis is not None:
            return args + (self.add_rows, self.basis)
        return args + (self.add_rows,) if self.add_rows else args


@dataclass(slots=True)
class Job:
    """One native decode job: ``blobs`` (one per chunk) of a stream coded with
    ``tables``, decoded into ``out`` (a uint8 ``[rows, coded columns]`` symbol array, or
    ``(rows, coded columns)`` when ``dequant`` turns them into values directly)."""

    blobs: list
    tables: object
    out: object
    dequant: Dequant | None = None

    def native(self) -> tuple:
        return (self.blobs, self.tables, self.out,
                None if self.dequant is None else self.dequant.native())


@dataclass(slots=True)
class Target:
    """A stream's rows in one decode, finished after its jobs have run.

    ``dst`` is ``[1, heads, rows, head_dim]`` (a view of the caller's tensor). Its rows
    sit at positions ``base + first ..`` (``positions``, int64 ``[rows]``, for the kept
    rows of an evicted stream). Where the native decoder dequantized them (``fused``:
    ``[(Dequant, destination view)]``) only the rest is done here; else ``symbols`` and
    ``side`` are dequantized with ``quant`` and ``params``. The first ``sinks.shape[0]``
    rows are attention sinks, kept in fp16 (``sinks``: a float32 NumPy ``[n, channels]``).
    ``rope`` rotates keys at their positions (unless ``rotated``: done natively);
    ``turn`` is ``(rope, delta)`` for keys coded after RoPE and placed elsewhere.
    (Entries decoded as one stream, :mod:`.stacked`, have their sink rows written by the
    decoder: :attr:`Dequant.sinks`.)
    """

    name: str
    dst: torch.Tensor
    quant: object
    params: dict | None = None
    symbols: np.ndarray | None = None
    side: bytes = b""
    fused: list = field(default_factory=list)
    rotated: bool = False
    sinks: np.ndarray | None = None
    rope: object = None
    base: int = 0
    first: int = 0
    positions: torch.Tensor | None = None
    turn: tuple | None = None


@dataclass
class DecodePlan:
    """Native jobs, the target each fills (``owner``: an index into ``targets`` per
    job), and the chunk size their blobs were coded with."""

    chunk_tokens: int
    jobs: list = field(default_factory=list)
    owner: list = field(default_factory=list)
    targets: list = field(default_factory=list)

    def add(self, target: Target, jobs: list) -> None:
        self.owner += [len(self.targets)] * len(jobs)
        self.jobs += jobs
        self.targets.append(target)

    def extend(self, other: "DecodePlan") -> "DecodePlan":
        """Append ``other``'s jobs and targets (one native call decodes both)."""
        if other.chunk_tokens != self.chunk_tokens:
            raise ValueError("plans of different chunk sizes cannot run as one")
        self.owner += [len(self.targets) + o for o in other.owner]
        self.jobs += other.jobs
        self.targets += other.targets
        return self


def out_dtype(dtype, default: torch.dtype) -> torch.dtype:
    """The dtype to decode into: ``default`` for None, else one of the three float dtypes
    (a string was torch.empty's TypeError)."""
    if dtype is None:
        return default
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ShapeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, "
                         f"got {dtype!r:.40}")
    return dtype


def run(plan: DecodePlan, threads: int = 0) -> list:
    """Decode ``plan``'s jobs natively (one call, all threads, the GIL released), without
    finishing them. Returns per target the first error of its jobs (None where all
    decoded): a caller that decodes several files in one plan finishes those before
    the first damaged one (:func:`finish`) and reports that one."""
    # Jobs that share tables (one stream of many store entries coded with shared tables)
    # run one after another, so that the decoder interleaves blobs of one table set,
    # which stays in cache, as it does for the chunks of one file's stream.
    first = {}
    for j in plan.jobs:
        first.setdefault(id(j.tables), len(first))
    order = sorted(range(len(plan.jobs)), key=lambda i: first[id(plan.jobs[i].tables)])
    errors = tables.native().decode_many([plan.jobs[i].native() for i in order],
                                         plan.chunk_tokens, tables.threads(threads))
    out = [None] * len(plan.targets)
    for err, t in zip(errors, (plan.owner[i] for i in order)):
        if err is not None and out[t] is None:
            out[t] = err
    return out


def execute(plan: DecodePlan, threads: int = 0) -> None:
    """Decode ``plan``'s jobs (:func:`run`), then :func:`finish` its targets. The first
    damaged blob raises :class:`CorruptError` naming its stream."""
    for err, t in zip(run(plan, threads), plan.targets):
        if err is not None:
            raise CorruptError(f"{t.name}: {err}")
    finish(plan.targets)


def finish(targets: list) -> None:
    """Complete decoded targets in place: values dequantized (where the native decoder
    did not), attention-sink rows restored, keys rotated at their positions and turned
    where they move. Keys whose other rows were rotated natively have their sink rows
    rotated together, one call per distinct RoPE and position."""
    sink_keys = {}  # (rope, position, rows) -> [(dst, sink rows)]
    for t in targets:
        rows = t.dst.shape[2]
        if not rows:
            continue
        h, d = t.dst.shape[1], t.dst.shape[3]
        for deq, view in t.fused:
            if deq.scratch:
                view.copy_(fp16_safe(torch.from_numpy(deq.out), view.dtype).unsqueeze(0))
        n_sink = 0 if t.sinks is None else t.sinks.shape[0]
        if t.fused and (t.rotated or t.rope is None) and t.turn is None:
            # Values in place, rotated where they are keys: only the sink rows remain,
            # where the decoder did not write them.
            if n_sink and t.fused[0][0].sinks is None:
                rows_np = t.sinks.reshape(n_sink, h, d).transpose(1, 0, 2)
                if t.rope is not None:
                    key = (t.rope, t.base + t.first, n_sink, h)
                    sink_keys.setdefault(key, []).append((t, rows_np))
                else:
                    _put_rows(t, rows_np)
            continue
        if t.fused:  # dequantized natively, not rotated (evicted rows) or turned after
            x = flatten(t.dst)
        else:
            q = t.quant
            sym = t.symbols
            if q.alphabet < q.table_alphabet and sym[:, :h * d].max(initial=0) >= q.alphabet:
                raise CorruptError(f"{t.name} decode to symbols outside the quantizer's "
                                   "range; the header does not match the data")
            x = dequantize_stored(q, torch.from_numpy(sym), t.params, t.side, t.name)
        if n_sink:
            x[:n_sink] = torch.from_numpy(t.sinks)
        y = unflatten(x, h, d)
        if t.rope is not None and not (t.fused and t.rotated):
            pos = t.positions + t.base if t.positions is not None else t.base + t.first
            y = rope(y, t.rope, pos)
        if t.turn is not None:
            y = shift(y, *t.turn)
        t.dst.copy_(fp16_safe(y, t.dst.dtype))
    for (r, pos, n_sink, h), pairs in sink_keys.items():
        st = rope(torch.from_numpy(np.stack([x for _, x in pairs], 1)), r, pos).numpy()
        for i, (t, _) in enumerate(pairs):
            _put_rows(t, st[:, i])


def fp16_safe(x: torch.Tensor, dtype) -> torch.Tensor:
    """Float32 ``x``, clamped in place to float16's finite range where it goes to a
    ``dtype`` of float16: a lossy value within half a step of 65504 rounded past it, to
    infinity, which makes attention NaN."""
    return x.clamp_(-65504.0, 65504.0) if dtype == torch.float16 else x


def dequantize_stored(q, symbols: torch.Tensor, params: dict, side: bytes,
                      name: str) -> torch.Tensor:
    """``q``'s dequantization of a stream the native decoder does not dequantize
    (``side``: its side bytes, float16), refused where it yields NaN or infinity: a
    cachegen scale or a lossless value is stored as it decodes, no encoder writes a
    non-finite one (they refuse such input and clamp scales to float16's range), so only
    a crafted file holds one, and it would poison every attention score of the cache."""
    sides = (np.frombuffer(side, dtype="<f2").reshape(-1, q.side_per_token)
             if q.side_per_token else None)
    x = q.dequantize(symbols, params, sides)
    # A float32 sum is 20x cheaper than a finite test of every value and finite wherever
    # they are (unless they are so large that it overflows: then the test decides).
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise CorruptError(f"{name} decodes to NaN or infinity, which no encoder writes")
    return x


def _as_out(rows: np.ndarray, dtype) -> np.ndarray:
    """``rows`` as a decoder's output holds them: float32, or uint16 bfloat16 bits
    (rounded as PyTorch casts, as the decoder rounded the others); as they are if they
    already are."""
    if dtype == np.uint16 and rows.dtype != np.uint16:
        rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        return rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return rows


def _store(deq: Dequant, at, rows: np.ndarray) -> None:
    """Rows ``at`` (an index of rows) of a decoder's output set to ``rows`` (``[heads, n,
    head_dim]``, float32 or as the output holds them: :func:`_as_out`): in ``out``, or
    where ``placed`` puts them."""
    rows = _as_out(rows, deq.out.dtype)
    if deq.placed is None:
        deq.out[:, at] = rows
        return
    flat, hs, cs, row_at = deq.placed
    start = row_at[at]  # one per row of out
    keep = start >= 0
    h, d = rows.shape[0], rows.shape[2]
    chans = cs if isinstance(cs, np.ndarray) else np.arange(d) * max(cs, 1)
    where = start[keep][None, :, None] + (np.arange(h) * hs)[:, None, None] + chans
    flat[where] = rows[:, keep]


def _put_rows(t: Target, rows: np.ndarray) -> None:
    """Set the first rows of a fused target's destination to ``rows`` (``[heads, n,
    head_dim]``): in the NumPy array the decoder wrote (a decode sets these few rows
    for each of hundreds of targets, and a NumPy assignment costs a fraction of
    torch's), or through torch where it wrote a scratch array."""
    deq, n = t.fused[0][0], rows.shape[1]
    if not deq.scratch and deq.out.shape[1] >= n:
        _store(deq, slice(0, n), rows)
    else:
        t.dst[0, :, :n] = torch.from_numpy(np.ascontiguousarray(rows)).to(t.dst.dtype)


def in_place(dst: torch.Tensor) -> np.ndarray | None:
    """``dst[0]`` as NumPy for the native decoder to write into, or None (then it
    decodes into a scratch array, cast and copied after): a CPU float32 or bfloat16
    tensor (bfloat16 as its uint16 bits: the decoder rounds as PyTorch casts) whose
    channels are contiguous, heads and rows any non-overlapping strides (the native
    call checks them), such as a ``[rows, heads, head_dim]`` buffer seen as ``[1, heads,
    rows, head_dim]``."""
    if dst.dtype not in (torch.float32, torch.bfloat16) or not dst.is_cpu or \
            dst.requires_grad or dst.stride(3) != 1:
        return None
    if dst.dtype == torch.float32:
        return dst.numpy()[0]
    return dst.view(torch.int16).numpy()[0].view(np.uint16)
