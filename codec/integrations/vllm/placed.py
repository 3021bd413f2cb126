"""A layer group's decode written straight into vLLM's paged blocks.

Each layer group of a step is decoded as one plan into the pool's buffers (``[tokens,
heads, head_dim]`` per layer and kind, :class:`.paged_layout.BufferPool`), and each
layer's rows were then copied into the step's blocks by vLLM's cache-writing op. Where
each element of vLLM's layout sits at its token's place plus its head's and its
channel's (:attr:`.PagedLayout.spans`: its CPU backends keep a block's values ``[heads,
block, head_dim]`` and its keys ``[heads, head_dim, block]``; its AMX backend, bfloat16
in blocks of 32 or more, pairs values: keys ``[head_dim / 2, block, 2]``, values by
sixteen channels with two tokens interleaved), a :class:`Placement` points every row of
the native decode at its slot instead (:attr:`~kvcodec.format.plan.Dequant.placed`):
the decode writes the cache, and only rows it could not place are copied
(:func:`write_rows`). On a 2-core Zen 3 (float32, 1,920 tokens of SmolLM2) the copy took
~18 ms of a 59-73 ms load; on a 2-core Xeon with AMX (bfloat16, 2,017 tokens)
7-8 ms of ~35, placed the decode takes 2-3 ms longer and the copy is gone.

An entry that loads of the step share (decoded once, its rows go to several requests'
blocks) is placed in the blocks of its first claim, and each later claim's blocks are
copied whole from there (:func:`copy_blocks`), where its rows fill whole blocks as the
first claim's do (entries being a multiple of vLLM's block size, all but the last
block of a document loaded whole); the rest of its rows (a load ending inside a block)
are copied element by element, their places in the cache computed once for all the
layers. On a 2-core Zen 3 (float32), eight requests over four shared documents of
1,920 tokens spent 135 ms in vLLM's op and ~130 ms gathering the shared rows for it;
on a 2-core Xeon with AMX (bfloat16), eight over four documents loaded whole
(2,000 tokens, a load ending inside a block) sent each shared document through the op
for both its requests: 137-248 ms of the step. The documents of a selective blend
(its check reads them, :mod:`.recompute`) stay in the buffers and go through the op,
beside the step's other rows placed.
"""
from __future__ import annotations

import bisect
import time

import numpy as np
import torch

from ...core.streams import KINDS
from .paged_layout import slot_ids


def entry_rows(load, entry, span: tuple, block: int) -> tuple:
    """``(rows, slots, lo, hi)`` of an opened entry ``(file, first token, ...)`` of
    ``load`` decoded at buffer rows ``span``: the tokens ``lo .. hi - 1`` the load
    writes, their buffer rows and their slots."""
    f, t0 = entry[:2]
    lo, hi = max(t0, load.start), min(t0 + f.num_tokens, load.end)
    rows = torch.arange(span[0] + lo - t0, span[0] + hi - t0)
    return rows, slot_ids(load.block_ids, lo, hi, block), lo, hi


def _flat(cache: torch.Tensor) -> np.ndarray | None:
    """``cache`` as a 1-D NumPy array the decoder writes (float32, or bfloat16 bits)."""
    if not cache.is_contiguous() or cache.dtype not in (torch.float32, torch.bfloat16):
        return None
    if cache.dtype == torch.bfloat16:
        return cache.view(torch.int16).numpy().reshape(-1).view(np.uint16)
    return cache.numpy().reshape(-1)


class Placement:
    """Called with each plan of a layer group's decode (``place`` of
    :func:`~kvcodec.store.batch.decode_documents`): points every target of the plan at
    the slots its buffer rows are written to, except the rows of a target that is not
    done wholly by the native decoder (values finished in Python, keys turned after
    RoPE, a scratch output) or whose rows must stay in the buffers (``held``); those
    rows stay there for every target that covers them. ``placed``: per buffer row,
    whether it went straight to the cache (:func:`write_rows` skips those)."""

    def __init__(self, layout, flats: dict, bufs: dict, first: np.ndarray, held: np.ndarray):
        self.spans, self._flat = layout.spans, flats  # flats: per layer, _flat(cache)
        cap = next(iter(bufs.values()))[0].shape[2]
        self.placed = np.zeros(cap, bool)
        self._held, self._first = held, first  # first: per buffer row, its first slot
        rows = np.flatnonzero(first >= 0)
        self._row_at = {}
        for kind in KINDS:
            at = np.full(cap, -1, np.int64)
            at[rows] = layout.starts(first[rows], kind)
            self._row_at[kind] = at
        self._dtype = next(iter(flats.values())).dtype
        self._bufs = []  # (first byte, end, row bytes, (head, channel) bytes, layer, kind)
        for l, pair in bufs.items():
            for kind, v in zip(KINDS, pair):
                size = v.element_size()
                self._bufs.append((v.data_ptr(), v.data_ptr() + cap * v.stride(2) * size,
                                   v.stride(2) * size, (v.stride(1) * size, size), l, kind))
        self._bufs.sort()

    @classmethod
    def of(cls, layout, caches: dict, bufs: dict, spans: list, hold: list):
        """A placement of a group whose loads write ``spans`` (per owner, per entry
        :func:`entry_rows`): each row at the slot of its first claim, holding in the
        buffers the rows of the owners ``hold`` says (a selective blend reads them back);
        or None where nothing can be placed (a layout not strided; a cache not
        contiguous float32 or bfloat16). A later claim's rows are copied from the first
        claim's slots (:func:`copy_blocks`)."""
        flats = {l: _flat(c) for l, c in caches.items()}
        if layout.spans is None or any(f is None for f in flats.values()):
            return None
        got = [(r.numpy(), s.numpy(), h) for entries, h in zip(spans, hold)
               for r, s, *_ in entries]
        if not got:
            return None
        cap = next(iter(bufs.values()))[0].shape[2]
        first, held = np.full(cap, -1, np.int64), np.zeros(cap, bool)
        for r, s, h in got:
            new = first[r] < 0
            first[r[new]] = s[new]
            held[r] |= h
        return cls(layout, flats, bufs, first, held)

    def copies(self, rows: torch.Tensor, slots: torch.Tensor):
        """``(from, to)`` slots of a claim's rows (an entry's ``rows`` at ``slots``) that
        an earlier claim placed, for :func:`copy_blocks`; None where it has none, or they
        were not placed (they stay in the buffers: :func:`write_rows`)."""
        r, s = rows.numpy(), slots.numpy()
        src = self._first[r]
        later = src != s
        if not later.any() or not self.placed[r[later]].all():
            return None
        return src[later], s[later]

    def _find(self, ptr: int, strides: tuple):
        """``(layer, kind, first row)`` of the buffer rows at ``ptr`` (head and channel
        ``strides`` in bytes), or None where they are not a pool buffer's."""
        i = bisect.bisect_right(self._bufs, (ptr, float("inf"))) - 1
        if i < 0:
            return None
        start, end, row, have, l, kind = self._bufs[i]
        if ptr >= end or (ptr - start) % row or strides != have:
            return None
        return l, kind, (ptr - start) // row

    def _out(self, deq):
        if deq.scratch or deq.placed is not None or deq.out.dtype != self._dtype:
            return None
        return self._find(deq.out.__array_interface__["data"][0],
                          (deq.out.strides[0], deq.out.strides[2]))

    def __call__(self, plan) -> None:
        todo, kept = [], set()  # kept: target row ranges (first, rows) left in the buffers
        for t in plan.targets:
            size = t.dst.element_size()
            where = self._find(t.dst.data_ptr(), (t.dst.stride(1) * size, size))
            if where is None:
                continue  # not the pool's (not a worker's plan)
            span = (where[2], t.dst.shape[2])
            outs = [(deq, self._out(deq)) for deq, _ in t.fused]
            if (not t.fused or t.turn is not None or not (t.rotated or t.rope is None)
                    or any(o is None for _, o in outs)
                    or self._held[span[0]:span[0] + span[1]].any()):
                kept.add(span)
            todo.append((span, outs))
        for (r0, n), outs in todo:
            self.placed[r0:r0 + n] = (r0, n) not in kept  # a later plan of them decides
            if (r0, n) in kept:
                continue
            for deq, (l, kind, first) in outs:
                hs, cs, _ = self.spans[kind]
                rows = deq.out.shape[1]
                deq.placed = (self._flat[l], hs, cs, self._row_at[kind][first:first + rows])


def whole_blocks(src: np.ndarray, dst: np.ndarray, block: int) -> np.ndarray:
    """Per slot of ``dst`` (a later claim's, copied from ``src``), whether it lies in a
    whole block of ``dst`` that is a copy of a whole block of ``src`` at the same
    offsets (``block`` slots of one block each side), so that the block is copied whole
    (:func:`copy_blocks`)."""
    if not len(dst):
        return np.zeros(0, bool)
    blocks, at, count = np.unique(dst // block, return_inverse=True, return_counts=True)
    lo = np.full(len(blocks), np.iinfo(np.int64).max)
    hi = np.full(len(blocks), -1, np.int64)
    np.minimum.at(lo, at, src // block)
    np.maximum.at(hi, at, src // block)
    moved = np.bincount(at, weights=(dst % block) != (src % block), minlength=len(blocks))
    return ((count == block) & (lo == hi) & (moved == 0))[at]


def _positions(layout, slots: np.ndarray) -> torch.Tensor:
    """Where every key and value element of ``slots`` sits in a contiguous cache of
    ``layout`` seen flat (its :attr:`~.paged_layout.PagedLayout.spans`)."""
    out = []
    for kind in KINDS:
        hs, cs, _ = layout.spans[kind]
        chans = cs if isinstance(cs, np.ndarray) else np.arange(layout.head_dim) * cs
        inner = ((np.arange(layout.heads) * hs)[:, None] + chans).reshape(-1)
        out.append((layout.starts(slots, kind)[:, None] + inner).reshape(-1))
    return torch.from_numpy(np.concatenate(out))


def copy_blocks(caches: dict, copies: list, layout, metrics) -> None:
    """Copy the slots ``copies`` say (``(from, to)`` slots: :meth:`Placement.copies`) in
    every cache of ``caches`` (a layer group's): whole blocks (:func:`whole_blocks`) in
    runs of consecutive blocks, one copy each; the other slots (a load that ends inside
    a block: a document loaded whole) element by element, their positions computed
    once for every layer. Timed as stage ``write``."""
    if not copies:
        return
    started = time.perf_counter()
    block = layout.block
    src = np.concatenate([a for a, _ in copies])
    dst = np.concatenate([b for _, b in copies])
    whole = whole_blocks(src, dst, block)
    order = np.argsort(dst[whole])  # each block's slots in order: its first slot a block
    a, b = src[whole][order][::block] // block, dst[whole][order][::block] // block
    cut = np.flatnonzero((np.diff(b) != 1) | (np.diff(a) != 1)) + 1
    runs = [(int(a[i]), int(b[i]), int(j - i))
            for i, j in zip(np.r_[0, cut], np.r_[cut, len(b)]) if j > i]
    rest = None
    if not whole.all():
        rest = (_positions(layout, src[~whole]), _positions(layout, dst[~whole]))
    for cache in caches.values():
        for i, j, n in runs:
            cache[j:j + n].copy_(cache[i:i + n])
        if rest is not None:
            flat = cache.view(-1)
            flat[rest[1]] = flat[rest[0]]
    metrics.staged("write", time.perf_counter() - started)


def write_rows(layout, caches: dict, bufs: dict, runs: dict, metrics,
               placed: np.ndarray | None = None) -> None:
    """Write the decoded rows of ``runs`` (``{first layer: (rows, slots)}``: the layers
    from ``first`` on write those buffer rows to those slots) from ``bufs`` into
    ``caches`` with vLLM's op, one call per layer, leaving out the rows a
    :class:`Placement` put there already (``placed``). Timed as stage ``write``."""
    if placed is not None:
        runs = {f: (r[keep], s[keep]) for f, (r, s) in runs.items()
                if (keep := ~torch.from_numpy(placed)[r]).any()}
    if not runs:
        return
    started = time.perf_counter()
    written = {}  # the runs a layer writes -> (rows from lo, slots, lo, hi, one slice)
    for l, (k, v) in bufs.items():
        here = tuple(first for first in sorted(runs) if l >= first)
        if not here:
            continue
        if here not in written:  # one run of rows is a slice, not a gather (a copy less)
            rows = torch.cat([runs[f][0] for f in here])
            lo, hi = int(rows.min()), int(rows.max()) + 1
            written[here] = (rows - lo, torch.cat([runs[f][1] for f in here]), lo, hi,
                             bool(torch.equal(rows, torch.arange(lo, hi))))
        rows, slots, lo, hi, run = written[here]
        # [T, H, D] slices of the pool's buffers: in the cache's dtype where the
        # decoder wrote it, so the op casts nothing
        k, v = k[0].transpose(0, 1)[lo:hi], v[0].transpose(0, 1)[lo:hi]
        if not run:  # rows repeat (shared entries) or skip: cast once, then gather
            k, v = k.to(layout.dtype)[rows], v.to(layout.dtype)[rows]
        layout.write(caches[l], k, v, slots)
    metrics.staged("write", time.perf_counter() - started)
