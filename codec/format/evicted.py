"""Decode plans of evicted .kvc files (format version 4, :mod:`kvcodec.format.kept`):
each head's kept tokens over a chunk range, back into a padded evicted cache.

A stream (layer, kind, head) codes only its head's kept rows; its rows in each chunk are
one native decode job. Per-token-step uniform streams are dequantized natively too,
without RoPE (the native rotation takes contiguous positions), which
:func:`~kvcodec.format.plan.finish` applies at each kept token's true position.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.quant import STEP_GRID, Uniform
from ..core.streams import KINDS
from ..errors import ShapeError
from .kept import positions
from .plan import DecodePlan, Dequant, Job, Target


def plan_evicted(f, chunks: range, dtype, base: int, turn) -> tuple:
    """The plan of file ``f``'s kept tokens within ``chunks``' token span ``[t0, t1)``
    and where it puts them: ``(plan, keys, values, kept)``, per layer ``[1, heads, slots,
    head_dim]`` of ``dtype`` (zero where a head keeps fewer than the layer's largest)
    and int64 ``[heads, slots]`` positions relative to ``t0`` (``-1``: unused). Keys
    coded pre-RoPE are rotated at their true positions from ``base``; ``turn`` is None or
    ``(ropes, delta)``: post-RoPE keys then turned by ``delta`` positions."""
    m, sec = f.meta, f.sections
    t0, n = m.span(chunks)
    dtab, params = sec.decode_tables(), sec.params()
    sec.index()  # per-chunk rows (sec.chunk_rows) come with the index
    h, d = m.num_kv_heads, m.head_dim
    rows = sec.chunk_rows[:, :, chunks[0]:chunks[-1] + 1].sum(axis=2)
    slots = [int(r.max()) for r in rows]
    if not any(slots):  # a cache holds at least one token
        raise ShapeError(f"{m.name}: chunks {chunks[0]}..{chunks[-1]} hold no tokens: every "
                         "head evicted all of theirs there")
    kept = [torch.full((h, s), -1, dtype=torch.int64) for s in slots]
    out = {k: [torch.zeros((1, h, s, d), dtype=dtype) for s in slots] for k in KINDS}
    plan = DecodePlan(m.chunk_tokens)
    for s, (l, k, head) in enumerate(m.streams):
        pos = positions(m.kept[l, head], m.num_tokens, t0, t0 + n)
        kept[l][head, :len(pos)] = torch.from_numpy(pos - t0)
        dst = out[k][l][:, head:head + 1, :len(pos)]
        q = m.quant[(l, k, head)]
        rope_here = m.ropes[l] if k == "key" else None
        t = Target(f"{m.name}: {m.stream_name(s)}", dst, q, params[(l, k, head)],
                   rope=rope_here, base=base, positions=torch.from_numpy(pos))
        if turn is not None and k == "key" and turn[0][l] is not None:
            t.turn = (turn[0][l], turn[1])
        n_sink = int(np.count_nonzero(pos < m.sink_tokens))
        if n_sink:  # the first rows (positions ascend); the sinks section is by position
            t.sinks = sec.sinks().numpy()[s, pos[:n_sink]]
        fused = isinstance(q, Uniform) and q.scale == "token"
        if not fused:
            t.symbols = np.empty((len(pos), m.coded_columns(q)), dtype=np.uint8)
        p = params[(l, k, head)]
        mult = q.dequant_mult(d) if fused else None
        add = (np.ascontiguousarray(p["mean"], dtype=np.float32)
               if fused and q.center else None)
        jobs, sides, r0 = [], [], 0
        per_chunk = sec.chunk_rows[l, head, chunks[0]:chunks[-1] + 1].tolist()
        for c, rows_here in zip(chunks, per_chunk):
            if not rows_here:
                continue
            side, blob = sec.read_item(c, s)
            view = dst[:, :, r0:r0 + rows_here]
            if fused:
                in_place = dst.dtype == torch.float32
                deq = Dequant(STEP_GRID, mult, q.r, 1,
                              view[0].numpy() if in_place else
                              np.empty((1, rows_here, d), dtype=np.float32),
                              scratch=not in_place, add=add, basis=q.dequant_basis(d))
                jobs.append(Job([blob], dtab[(l, k, head)], (rows_here, m.coded_columns(q)),
                                deq))
                t.fused.append((deq, view))
            else:
                jobs.append(Job([blob], dtab[(l, k, head)], t.symbols[r0:r0 + rows_here]))
            sides.append(side)
            r0 += rows_here
        t.side = b"".join(sides)
        plan.add(t, jobs)
    return plan, out["key"], out["value"], kept
