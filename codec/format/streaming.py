"""Decoding a file chunk by chunk while its bytes arrive (:meth:`KVCFile.iter_chunks`).

The calling thread reads the source a step at a time while a decode runs in one
background thread (native code, all threads, no GIL); each decode takes every chunk that
has arrived since the previous one started. Over a slow stream that is one chunk at a
time, decoding while the next is on the wire, and what remains after the last byte is
the last chunk's decode; over a file or a fast link it is few, large decodes, about as
fast as a whole-file decode. Decoding starts once the source has made the reader wait:
until then the bytes are there already, and one large decode beats a first chunk
decoded alone while this thread copies the rest.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import KVCodecError
from .container import untrusted
from .plan import execute

# A read step (128 KiB) of a stream that takes longer than this waited for the source.
STALL_S = 1e-3


class ChunkStreamer:
    """One :meth:`KVCFile.iter_chunks` run: file ``f``'s chunks ``chunks`` decoded into
    ``out`` (a :class:`~kvcodec.core.kvcache.KVCache` sized as the file's layers hold
    those chunks). Iterate it for ``(chunk, t0, t1)`` as each chunk's tokens land."""

    def __init__(self, f, chunks: range, out, threads: int):
        self.f, self.chunks, self.out, self.threads = f, chunks, out, threads
        meta, sec = f.meta, f.sections
        self.n_streams = len(meta.streams)
        self.base = meta.span(chunks)[0]
        self.spans = [meta.layer_span(l, chunks) for l in range(meta.num_layers)]
        # What every chunk's plan needs, read before the first byte of payload.
        with untrusted(meta.name):
            sec.decode_tables()
            if meta.sink_tokens:
                sec.sinks()
        self.payload = f.source.section_offset("payload")

    def _arrive(self, c: int) -> dict:
        """Chunk ``c``'s payload items, read and checked (while a decode runs)."""
        n, sec = self.n_streams, self.f.sections
        first, last = c * n, c * n + n - 1
        return sec.read_items([(c, s) for s in range(n)],
                              {(first, last): sec.read_run(first, last)})

    def _start(self, pool, arrived: list):
        """Plan the chunks in ``arrived`` and start their decode."""
        run = range(arrived[0][0], arrived[-1][0] + 1)
        items = {k: v for _, part in arrived for k, v in part.items()}
        dst = {}
        for l, (first, _) in enumerate(self.spans):
            at, rows = self.f.meta.layer_span(l, run)
            if rows:
                r0 = at - first
                dst[l] = (self.out.keys[l][:, :, r0:r0 + rows],
                          self.out.values[l][:, :, r0:r0 + rows])
        plan = self.f.plan(dst, run, items=items)
        return run, pool.submit(execute, plan, self.threads)

    def _done(self, pending):
        run, future = pending
        future.result()  # a decode error is raised here
        meta = self.f.meta
        for c in run:
            t0 = c * meta.chunk_tokens - self.base
            yield c, t0, min(meta.num_tokens - self.base, t0 + meta.chunk_tokens)

    def __iter__(self):
        f, n = self.f, self.n_streams
        off, side, blob, _ = f.sections.item_lists()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-decode") as pool:
            pending, arrived, failed, waited = None, [], None, False
            for c in self.chunks:
                last = c * n + n - 1
                end = self.payload + off[last] + side[last] + blob[last]
                try:
                    # A stream's bytes come a step at a time, so that a finished decode
                    # is followed at once by one of the chunks that arrived meanwhile.
                    while True:
                        t = time.perf_counter()
                        got = f.source.fill(end)
                        waited = waited or time.perf_counter() - t > STALL_S
                        if got:
                            break
                        if pending is not None and pending[1].done():
                            yield from self._done(pending)
                            pending = None
                            if arrived:
                                pending, arrived = self._start(pool, arrived), []
                    arrived.append((c, self._arrive(c)))
                except KVCodecError as exc:  # decode what did arrive, then raise
                    failed = exc
                    break
                if pending is not None and pending[1].done():
                    yield from self._done(pending)
                    pending = None
                if pending is None and waited:
                    pending, arrived = self._start(pool, arrived), []
            while pending is not None or arrived:
                if pending is not None:
                    yield from self._done(pending)
                    pending = None
                if arrived:
                    pending, arrived = self._start(pool, arrived), []
            if failed is not None:
                raise failed
