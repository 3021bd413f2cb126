"""Consecutive store entries planned as one file: a job and a target per stream.

A store keeps a document as one-chunk entries, each a .kvc file of its own. Planned one
by one (:meth:`KVCFile.plan`), a prefix of N entries is N x (layers x 2) targets and
jobs, and building them in Python cost more than the native decode itself saves over one
file. Entries that are consecutive chunks of one document, coded with one config and
one set of shared tables, and decoded into one buffer per layer (:func:`plan_stack`)
are instead planned the way one file's chunks are: per stream, one job whose blobs are
the entries' (in order), one target over all their rows. What differs per entry is
carried per chunk: the centering offsets (the native dequantizer takes one row of them
per ``chunk_tokens`` rows) and the fp16 attention-sink rows each entry starts with,
which the decoder writes in place of those rows' sums
(:attr:`~kvcodec.format.plan.Dequant.sinks`: restoring them in NumPy afterwards, one
target at a time, took 2.5-3 ms of a 2,000-token load inside vLLM).

A single entry is planned this way too (a request's own last entry after entries it
shares with another request of a vLLM step): its plan joins the step's others in one
native call.

Anything else (evicted or streamed files, another chunk layout, windows shorter than
the entries, own tables, destinations that are not float32 rows of one buffer) is not
stacked: :func:`plan_stack` returns None and the caller plans the entries one by one,
as it does when the stacked decode reports an error (to say which entry is damaged).
Every payload item is read and checksummed here as :meth:`KVCFile.plan` does.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.quant import STEP_GRID, Uniform
from ..core.streams import KINDS
from ..core.transforms import check_positions
from .container import untrusted
from .plan import DecodePlan, Dequant, Job, Target, in_place


def plan_stack(files: list, bufs, spans: list,
               position_offset: int | None = None) -> DecodePlan | None:
    """One plan decoding ``files`` (open entries, token spans ``spans`` of ``bufs``: per
    layer ``(keys, values)`` ``[1, heads, capacity, head_dim]``, a list over every layer
    or a ``{layer: (keys, values)}`` dict of some) as one file, or None where they do not
    stack (see the module docstring). ``position_offset``: the first entry's first token
    placed there instead of where it was coded (a document blended at another offset,
    :meth:`KVCFile.decode_into`'s); only entries coded pre-RoPE move here (others are
    not stacked). Raises what :meth:`KVCFile.plan` raises for a damaged entry."""
    if not files or not _stackable(files, spans):
        return None
    f0, m0 = files[0], files[0].meta
    t0, t1 = spans[0][0], spans[-1][1]
    base = m0.position_offset
    if position_offset is not None and position_offset != base:
        if m0.key_transform is None:
            return None  # keys coded after RoPE: turned per entry by its plan
        check_positions(m0.key_transform, position_offset, t1 - t0)
        base = position_offset
    streams = []
    for l, pair in (bufs.items() if isinstance(bufs, dict) else enumerate(bufs)):
        for k, buf in zip(KINDS, pair):
            q = m0.quant[(l, k)]
            rope = m0.ropes[l] if k == "key" else None
            view = buf[:, :, t0:t1]
            arr = in_place(view)
            if (arr is None or not (isinstance(q, Uniform) and q.scale == "token")
                    or (rope is not None and rope.rotary_dim != m0.head_dim)):
                return None
            streams.append((l, k, q, rope, view, arr, m0.stream_index[(l, k)]))
    entry_blobs, params, sinks = [], [], []  # per entry: blobs (stream order), params, sinks
    for f in files:
        with untrusted(f.meta.name):
            sec = f.sections
            entry_blobs.append(sec.chunk_blobs(0))
            params.append(sec.param_rows())
            sinks.append(sec.sink_rows() if m0.sink_tokens else None)
    tables = [f.sections.decode_tables() for f in files]
    # Per stream, its rows of every entry at once, float32 (one cast, not one per entry
    # and stream): the centering offsets [streams, entries, channels] and the sink rows
    # [streams, entries * sink_tokens, channels].
    means = _mean_rows(f0, streams, params)
    if m0.sink_tokens:
        at = np.array([s for *_, s in streams], dtype=np.intp)
        sinks = _float32(np.stack([x[at] for x in sinks], axis=1))
        sinks = sinks.reshape(len(at), -1, sinks.shape[-1])
    plan = DecodePlan(m0.chunk_tokens)
    rows, n_sink = t1 - t0, m0.sink_tokens
    for i, (l, k, q, rope, view, arr, s) in enumerate(streams):
        dtab = tables[0][(l, k)]
        if any(t[(l, k)] is not dtab for t in tables):
            return None  # not one set of shared tables
        add = means[i] if q.center else None
        cos = sin = None
        if rope is not None:
            cos, sin = f0.rope_arrays(base, rows, rope)
        h, d = arr.shape[0], arr.shape[2]
        deq = Dequant(STEP_GRID, q.dequant_mult(h * d), q.r, h, arr, cos, sin, add=add,
                      add_rows=m0.chunk_tokens if add is not None else 0,
                      basis=q.dequant_basis(h * d))
        t = Target(f"{m0.name} .. {files[-1].meta.name}: layer {l} {k}s", view, q,
                   f0.sections.params()[(l, k)], rope=rope, base=base,
                   rotated=rope is not None)
        t.fused.append((deq, None))
        if n_sink:  # the decoder writes them, rotated where keys are
            deq.sinks, deq.sink_every, deq.sink_rows = sinks[i], m0.chunk_tokens, n_sink
        blobs = [got[s] for got in entry_blobs]
        plan.add(t, [Job(blobs, dtab, (rows, m0.coded_columns(q)), deq)])
    return plan


def _mean_rows(f0, streams: list, params: list):
    """float32 ``[streams, entries, channels]``: each stream's centering offsets
    (``mean``) in every entry, from the entries' parameter rows (None: no stream is
    centered)."""
    if not any(q.center for _, _, q, *_ in streams):
        return None
    picks = np.array([f0.sections.param_row((l, k), "mean") if q.center else 0
                      for l, k, q, *_ in streams], dtype=np.intp)
    return _float32(np.stack([p[picks] for p in params], axis=1))


_GRAIN = 32768  # torch's grain size (at::internal::GRAIN_SIZE): copies up to it run inline


def _float32(a: np.ndarray) -> np.ndarray:
    """float16 ``a`` as float32, through torch (NumPy's conversion of halves is element
    by element, ~20x slower), at most torch's grain size at a time, so that each copy
    runs in this thread: one parallel copy wakes the process's OpenMP workers, which
    then spin beside the native decode that follows (libgomp's wait policy; 8 entries'
    load from a store, 2 cores: ~3 ms slower)."""
    src = torch.from_numpy(np.ascontiguousarray(a)).reshape(-1)
    out = torch.empty(src.shape, dtype=torch.float32)
    for i in range(0, len(src), _GRAIN):
        out[i:i + _GRAIN] = src[i:i + _GRAIN]
    return out.numpy().reshape(a.shape)


def _stackable(files: list, spans: list) -> bool:
    """Whether ``files`` are consecutive one-chunk entries of one document (every layer
    covering all their tokens), coded alike with one set of shared tables."""
    m0 = files[0].meta
    for i, (f, (a, b)) in enumerate(zip(files, spans)):
        m = f.meta
        if (m.evicted or f.streaming or m.shared_tables is None or m.num_chunks != 1
                or m.num_tokens != b - a or any(m.starts)
                or (i + 1 < len(files) and m.num_tokens != m0.chunk_tokens)
                or m.position_offset != m0.position_offset + (a - spans[0][0])
                or (i and spans[i - 1][1] != a)):
            return False
        if i and (m.config != m0.config or m.shared_tables != m0.shared_tables
                  or m.key_transform != m0.key_transform or m.sink_tokens != m0.sink_tokens
                  or m.streams != m0.streams or m.chunk_tokens != m0.chunk_tokens):
            return False
    return True
