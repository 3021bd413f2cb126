"""Decoding evicted .kvc files (format version 4, :mod:`kvcodec.format.kept`): each head's
kept tokens over a chunk range, back into a padded evicted :class:`KVCache`.

A stream's rows in each chunk are one native decode job; per-token-step uniform streams
are dequantized natively too, without RoPE (the native rotation takes contiguous
positions), which is applied here at each kept token's true position.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..core import tables
from ..core.kvcache import KVCache
from ..core.quant import STEP_GRID, Uniform
from ..core.streams import KINDS
from ..core.transforms import rope, shift
from ..errors import CorruptError
from .kept import positions
from .sections import SectionReader


class _Stream(NamedTuple):
    """One stream's part of a decode: native jobs, their outputs, its kept positions."""

    jobs: list
    sym: np.ndarray  # uint8 [rows, coded columns]
    side: bytes
    deq: np.ndarray | None  # float32 [1, rows, head_dim] where decoded natively
    pos: np.ndarray  # int64 [rows], ascending true positions


class EvictedReader(SectionReader):
    """A :class:`SectionReader` that also decodes evicted files."""

    def _decode_evicted(self, chunks: range, dtype, threads: int, base: int,
                        turn) -> KVCache:
        """The kept tokens within ``chunks``' token span ``[t0, t1)`` as an evicted
        :class:`KVCache` of ``length = t1 - t0``, positions relative to ``t0``. Keys coded
        pre-RoPE are rotated at their true positions from ``base``; ``turn`` is None or
        ``(ropes, delta)``: post-RoPE keys then turned by ``delta`` positions."""
        t0, n = self._span(chunks)
        self._load_index()
        dtab = self._decode_tables()
        plans = [self._plan_stream(s, chunks, dtab[stream])
                 for s, stream in enumerate(self._streams)]
        owners = [s for s, p in enumerate(plans) for _ in p.jobs]
        errors = tables.native().decode_many([j for p in plans for j in p.jobs],
                                             self.chunk_tokens, threads)
        for err, s in zip(errors, owners):
            if err is not None:
                raise CorruptError(f"{self._r.name}: {self._stream_name(s)}: {err}")
        h, d, dtype = self.num_kv_heads, self.head_dim, dtype or self.dtype
        rows = self._chunk_rows[:, :, chunks[0]:chunks[-1] + 1].sum(axis=2)
        slots = [int(r.max()) for r in rows]
        kept = [torch.full((h, m), -1, dtype=torch.int64) for m in slots]
        out = {k: [torch.zeros((1, h, m, d), dtype=dtype) for m in slots] for k in KINDS}
        for s, ((l, k, head), plan) in enumerate(zip(self._streams, plans)):
            x = self._finish_stream(s, plan, base)
            if k == "key" and turn is not None and turn[0][l] is not None:
                x = shift(x[None, None], turn[0][l], turn[1])[0, 0]
            out[k][l][0, head, :len(plan.pos)] = x
            kept[l][head, :len(plan.pos)] = torch.from_numpy(plan.pos - t0)
        ids = None if self.token_ids is None else self.token_ids[t0:t0 + n]
        return KVCache(out["key"], out["value"], ids, self.model, length=n, kept=kept)

    def _plan_stream(self, s: int, chunks: range, dtab) -> _Stream:
        """Read and verify stream ``s``'s payload items over ``chunks`` and build its
        native decode jobs, one per non-empty item."""
        l, _, head = stream = self._streams[s]
        t0, n = self._span(chunks)
        pos = positions(self._kept[l, head], self.num_tokens, t0, t0 + n)
        q = self._quant[stream]
        sym = np.empty((len(pos), self._coded(q)), dtype=np.uint8)
        fused = isinstance(q, Uniform) and q.scale == "token"
        deq = np.empty((1, len(pos), self.head_dim), dtype=np.float32) if fused else None
        mult = q._head_mult(self.head_dim).numpy() if fused else None
        jobs, sides, r0 = [], [], 0
        for c, m in zip(chunks, self._chunk_rows[l, head, chunks[0]:chunks[-1] + 1].tolist()):
            if m:
                side, blob = self._read_item(c, s)
                spec = (STEP_GRID, mult, q.r, 1, deq[:, r0:r0 + m], None, None) if fused else None
                jobs.append(([blob], dtab, sym[r0:r0 + m], spec))
                sides.append(side)
                r0 += m
        return _Stream(jobs, sym, b"".join(sides), deq, pos)

    def _finish_stream(self, s: int, plan: _Stream, base: int) -> torch.Tensor:
        """float32 ``[rows, head_dim]`` of decoded stream ``s``: dequantized (unless the
        native decoder did), sink rows restored, keys rotated at their positions from
        ``base``."""
        l, k, _ = stream = self._streams[s]
        q, pos = self._quant[stream], plan.pos
        if not len(pos):  # a head that keeps no token here
            return torch.zeros(0, self.head_dim)
        if plan.deq is not None:
            x = torch.from_numpy(plan.deq[0])
        else:
            sym = plan.sym[:, :self.head_dim]
            if q.alphabet < q.table_alphabet and sym.max(initial=0) >= q.alphabet:
                raise CorruptError(f"{self._r.name}: {self._stream_name(s)} decode to symbols "
                                   "outside the quantizer's range; the header does not match "
                                   "the data")
            side = (np.frombuffer(plan.side, dtype="<f2").reshape(-1, q.side_per_token)
                    if q.side_per_token else None)
            x = q.dequantize(torch.from_numpy(plan.sym), self._params[stream], side)
        n_sink = int(np.count_nonzero(pos < self.sink_tokens))
        if n_sink:  # the first rows (positions ascend); the sinks section is by position
            x[:n_sink] = self._load_sinks()[s, torch.from_numpy(pos[:n_sink])]
        rope_here = self._ropes[l] if k == "key" else None
        if rope_here is not None:
            x = rope(x[None, None], rope_here, torch.from_numpy(pos) + base)[0, 0]
        return x
