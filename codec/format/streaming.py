"""Decoding a file chunk by chunk while its bytes arrive (:meth:`KVCFile.iter_chunks`).

The calling thread reads the source a step at a time while a decode runs in one
background thread (native code, all threads, no GIL); each decode takes what has arrived
since the previous one started. Where the decoder keeps up with the link, that is the
layers of a chunk that are there (a chunk's items are in layer order; a quarter of its
streams at least), so what remains after the last byte is the decode of the last layers,
not of the whole last chunk. Where it falls behind, it takes the chunks that arrived
whole, and the chunk still arriving waits for the next. (Planning whole chunks as they
arrive, while the decoder runs, cost more at 1 Gbit/s on 2 cores than the wait it
saved.) Over a file or a fast link it is few, large decodes, about as fast as a
whole-file decode. Decoding starts once the source has made the reader wait: until then
the bytes are there already, and one large decode beats a first piece decoded alone
while this thread copies the rest.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import KVCodecError
from .container import untrusted
from .plan import execute

# A read step of a stream that came slower than this (bytes per second) waited for the
# source; two such steps in a row mean the source is slow (one can be a hiccup of a fast
# one: a page fault, the scheduler).
STALL_RATE = 2.5e8


class ChunkStreamer:
    """One :meth:`KVCFile.iter_chunks` run: file ``f``'s chunks ``chunks`` decoded into
    ``out`` (a :class:`~kvcodec.core.kvcache.KVCache` sized as the file's layers hold
    those chunks). Iterate it for ``(chunk, t0, t1)`` as each chunk's tokens land.
    ``decodes`` lists the decodes it started, each ``[(chunk, first stream, end
    stream), ...]``: the parts of chunks it took."""

    def __init__(self, f, chunks: range, out, threads: int):
        self.f, self.chunks, self.out, self.threads = f, chunks, out, threads
        meta, sec = f.meta, f.sections
        self.n_streams = n = len(meta.streams)
        self.base = meta.span(chunks)[0]
        self.spans = [meta.layer_span(l, chunks) for l in range(meta.num_layers)]
        # A decode takes whole layers: the stream indices where a chunk's layers end.
        self.cuts = [s for s in range(1, n + 1)
                     if s == n or meta.streams[s][0] != meta.streams[s - 1][0]]
        self.decodes = []
        # The least a decode takes before the last byte: a quarter of a chunk's streams
        # (a decode's fixed costs and its tables' cache misses want more than a layer).
        self.least = max(1, n // 4)
        # What every chunk's plan needs, read before the first byte of payload.
        with untrusted(meta.name):
            sec.decode_tables()
            if meta.sink_tokens:
                sec.sinks()
        self.payload = f.source.section_offset("payload")
        self.items = sec.item_lists()

    def _end(self, c: int, s: int) -> int:
        """File offset just past chunk ``c``'s items before stream ``s``."""
        off, side, blob, _ = self.items
        i = c * self.n_streams + s - 1
        return self.payload + off[i] + side[i] + blob[i]

    def _arrive(self, arrived: list, c: int, s0: int, whole: bool) -> int:
        """Read and check chunk ``c``'s items from stream ``s0`` on: all of them if
        ``whole``, else up to the last whole layer the source holds. Adds them to
        ``arrived`` (``[chunk, first stream, end stream, items]``, merged with the
        chunk's previous part) and returns the stream after them."""
        s1 = self.n_streams if whole else s0
        if not whole:
            have = self.f.source.buffered()
            for cut in self.cuts:
                if cut > s0:
                    if self._end(c, cut) > have:
                        break
                    s1 = cut
        if s1 == s0:
            return s0
        n, sec = self.n_streams, self.f.sections
        first, last = c * n + s0, c * n + s1 - 1
        items = sec.read_items([(c, s) for s in range(s0, s1)],
                               {(first, last): sec.read_run(first, last)})
        if arrived and arrived[-1][0] == c:
            arrived[-1][2] = s1
            arrived[-1][3].update(items)
        else:
            arrived.append([c, s0, s1, items])
        return s1

    def _plan(self, run: range, streams: tuple, items: dict):
        """The plan of the layers of ``streams`` (first, end) over chunks ``run``, or
        None where they hold no rows there."""
        meta, dst = self.f.meta, {}
        for l in sorted({meta.streams[s][0] for s in range(*streams)}):
            at, rows = meta.layer_span(l, run)
            if rows:
                r0 = at - self.spans[l][0]
                dst[l] = (self.out.keys[l][:, :, r0:r0 + rows],
                          self.out.values[l][:, :, r0:r0 + rows])
        return self.f.plan(dst, run, items=items) if dst else None

    def _take(self, arrived: list) -> tuple:
        """``(what the next decode takes, what waits)`` of ``arrived``, before the last
        byte. Behind the stream (chunks finished since the last decode), the finished
        chunks: the one still arriving goes in the next decode, whole, as a chunk
        decodes fastest. Caught up, the part of a chunk that arrived, once it is at
        least ``least`` streams: the decode after the last byte is then of a few layers."""
        _, s0, s1, _ = arrived[-1]
        if s1 < self.n_streams:  # the last entry is the chunk still arriving
            if len(arrived) > 1:
                return arrived[:-1], arrived[-1:]
            if s1 - s0 < self.least:
                return [], arrived
        return arrived, []

    def _start(self, pool, arrived: list):
        """Plan what ``arrived`` holds, whole chunks next to each other as one run, and
        start its decode (one native call)."""
        n, groups = self.n_streams, []
        for c, s0, s1, items in arrived:
            g = groups[-1] if groups else None
            if g and (s0, s1) == (0, n) == g[1] and g[0][-1] == c - 1:
                g[0] = range(g[0][0], c + 1)
                g[2].update(items)
            else:
                groups.append([range(c, c + 1), (s0, s1), items])
        self.decodes.append([(c, s0, s1) for c, s0, s1, _ in arrived])
        plan = None
        for run, streams, items in groups:
            p = self._plan(run, streams, items)
            if p is not None:
                plan = p if plan is None else plan.extend(p)
        done = [c for c, _, s1, _ in arrived if s1 == n]
        return done, (None if plan is None else pool.submit(execute, plan, self.threads))

    def _done(self, pending):
        done, future = pending
        if future is not None:
            future.result()  # a decode error is raised here
        meta = self.f.meta
        for c in done:
            t0 = c * meta.chunk_tokens - self.base
            yield c, t0, min(meta.num_tokens - self.base, t0 + meta.chunk_tokens)

    def __iter__(self):
        f, n = self.f, self.n_streams
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-decode") as pool:
            pending, arrived, failed, waited, slow = None, [], None, False, 0
            for c in self.chunks:
                s0, end = 0, self._end(c, n)
                try:
                    # A stream's bytes come a step at a time, so that a finished decode
                    # is followed at once by what arrived meanwhile.
                    while s0 < n:
                        t, had = time.perf_counter(), f.source.buffered()
                        got = f.source.fill(end)
                        dt, step = time.perf_counter() - t, f.source.buffered() - had
                        slow = slow + 1 if dt * STALL_RATE > step else 0
                        waited = waited or slow >= 2
                        if pending is not None and (pending[1] is None or pending[1].done()):
                            yield from self._done(pending)
                            pending = None
                        s0 = self._arrive(arrived, c, s0, got)
                        if pending is None and waited and arrived:
                            take, arrived = self._take(arrived)
                            if take:
                                pending = self._start(pool, take)
                except KVCodecError as exc:  # decode what did arrive, then raise
                    failed = exc
                    break
            while pending is not None or arrived:
                if pending is not None:
                    yield from self._done(pending)
                    pending = None
                if arrived:
                    pending, arrived = self._start(pool, arrived), []
            if failed is not None:
                raise failed
