"""The connector's worker side: entries decoded layer by layer into vLLM's paged cache
while attention runs, and the chunks vLLM computes encoded into the store."""
from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from ...core.kvcache import KVCache
from ...errors import ConfigError, FormatError, KVCodecError
from ...store.batch import decode_documents
from .cpu import overlap_loads, torch_one_thread
from .paged_layout import BufferPool, PagedLayout, SaveBuffers, layer_groups, slot_ids
from .placed import Placement, copy_blocks, entry_rows, write_rows
from .recompute import check
from .scheduler import Load
from .step_plan import plan_group

log = logging.getLogger("kvcodec")

_LAYER = re.compile(r"layers\.(\d+)\.")


def check_dense(cache) -> None:
    """Refuse an evicted cache or file (``evicted``: each head keeps its own tokens),
    which vLLM's paged cache, one slot per token for every head, cannot hold."""
    if getattr(cache, "evicted", False):
        raise FormatError("evicted caches (per-head token subsets) cannot be loaded into "
                          "vLLM's paged cache yet")


class ConnectorWorker:
    """Loads and saves for one vLLM worker. ``store``: a :class:`~kvcodec.store.ChunkStore`
    under ``fingerprint`` (the served model's); ``threads``: decoder threads (0: all
    cores); ``save``: encode what the scheduler asks to save; ``load_timeout_s``: how long
    a step waits for the store to deliver its entries before it recomputes the rest;
    ``max_pending_save_bytes``: the K/V copies queued for encoding at most (a save past
    it is skipped: a future miss, not a stall; one save always goes).

    Counters, for tests, benchmarks and logs: ``bytes_read`` (entry bytes read, each
    entry of a step once, landed or not), ``tokens_loaded`` (tokens written into vLLM's
    cache), ``tokens_shared`` (of those, tokens of entries another load of the same step
    read and decoded: each entry is read and decoded once per step), ``blocks_failed``
    (blocks reported for recomputation), ``saves_skipped`` (saves the bound turned away).
    The store's metrics also get the time of writes through vLLM's op and of shared
    entries' block copies (stage ``write``: rows not decoded in place, :mod:`.placed`),
    loads not delivered in time (cause ``timeout``) and the saves queued, written and
    dropped.
    ``overlap``: decode beside the forward pass, else before it (:func:`.cpu.overlap_loads`);
    its own threads run torch single-threaded (:func:`.cpu.torch_one_thread`)."""

    BUFFER_BYTES = 256 << 20  # decode buffers kept across steps, at most (BufferPool)
    SAVE_BUFFER_BYTES = 128 << 20  # saves' copies kept for later saves (SaveBuffers)

    def __init__(self, store, fingerprint: dict, block: int, threads: int, save: bool,
                 load_timeout_s: float = 5.0, max_pending_save_bytes: int = 1 << 30):
        self.store, self.fingerprint = store, fingerprint
        self.block, self.chunk = block, store.chunk_tokens
        self.threads, self.save = threads, save
        self.load_timeout_s = float(load_timeout_s)
        self.max_pending_save_bytes = int(max_pending_save_bytes)
        self.caches: dict[int, torch.Tensor] = {}
        self.layer_names: dict[str, int] = {}
        self.layout: PagedLayout | None = None
        self._events: dict[int, threading.Event] = {}
        self._loader: threading.Thread | None = None
        self._failed_blocks: set = set()
        self._failed_requests: set = set()  # requests of this step whose load failed
        # Entries are fetched eight at a time (a 2k-token prompt's came over a 1 Gbit/s link
        # to S3 in 64 ms, in 75 four at a time) within load_timeout_s (stuck: background).
        self._fetcher = ThreadPoolExecutor(8, "kvcodec-fetch", initializer=torch_one_thread)
        self._encoder = ThreadPoolExecutor(1, "kvcodec-save", initializer=torch_one_thread)
        self.overlap: bool | str = "auto"  # the connector sets it; resolved with the caches
        self._pool = BufferPool(fingerprint["num_kv_heads"], fingerprint["head_dim"],
                                self.BUFFER_BYTES)
        self._save_bufs = SaveBuffers(self.SAVE_BUFFER_BYTES, self.chunk)
        self._pending_save_bytes = 0
        self._pending_lock = threading.Lock()
        self.bytes_read = self.tokens_loaded = 0
        self.tokens_preloaded = 0  # selective blends' documents, for the later layers
        self.tokens_shared = 0  # of tokens_loaded: decoded once for several loads of a step
        self.selections: dict = {}  # req_id -> recomputed cached positions (the last 64)
        self._recomputes: list = []  # this step's selective blends
        self.subset = None  # SubsetForward (blend_rows_only, eager engine): the connector sets it
        self._forward_context = None
        self.blocks_failed = 0
        self.saves_skipped = 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        for name, cache in kv_caches.items():
            m = _LAYER.search(name)
            if m is None:
                raise ConfigError(f"cannot tell the layer index of vLLM layer {name!r}")
            self.layer_names[name] = int(m.group(1))
            self.caches[int(m.group(1))] = cache
        first = next(iter(self.caches.values()))
        if first.dim() != 4:
            raise ConfigError(f"paged cache of shape {tuple(first.shape)}: KVCodecConnector "
                              "handles vLLM's CPU layout [blocks, kv_heads, block, 2*head_size]")
        fp = self.fingerprint
        if (len(self.caches), first.shape[1], first.shape[3]) != (
                fp["num_layers"], fp["num_kv_heads"], 2 * fp["head_dim"]):
            raise ConfigError(f"vLLM's caches ({len(self.caches)} layers, "
                              f"{tuple(first.shape)}) do not fit the model fingerprint")
        self.layout = PagedLayout(first, self.block, True)  # reads: saves, hkvd checks
        self.overlap = overlap_loads(self.overlap, first.device)
        self._pool.decode_to(self.layout.dtype)

    def start_load_kv(self, meta, forward_context) -> None:
        self._failed_requests = set()
        self._recomputes = [l for l in meta.loads if l.recompute is not None]
        self._forward_context = forward_context
        if self.subset is not None:  # rows only after a selective blend's check layer
            self.subset.end()
            if self._recomputes:
                self.subset.prepare(forward_context)
        if not meta.loads:
            return
        self.layout.bind_isa(forward_context, self.layer_names)
        opening, deadline = {}, time.monotonic() + self.load_timeout_s  # fetches, shared
        wanted = [self._submit(load, opening) for load in meta.loads]
        used = set()  # the fetches some load keeps
        jobs = [job for load, w in zip(meta.loads, wanted)
                if (job := self._collect(load, w, deadline, used)) is not None]
        self.bytes_read += sum({id(f): f.size_bytes for _, fs in jobs for f, *_ in fs}.values())
        for fut in opening.values():  # not used: never leave an entry open
            if id(fut) not in used and not fut.cancel():
                fut.add_done_callback(_close_result)
        self._events = {l: threading.Event() for l in self.caches}
        if not self.overlap:
            return self._load_layers(jobs)
        self._loader = threading.Thread(target=self._load_layers, args=(jobs, True),
                                        name="kvcodec-load", daemon=True)
        self._loader.start()

    def _submit(self, load: Load, opening: dict) -> list:
        """Start fetching and checking every entry a load needs (a blend's: each run of
        entries, a document's re-rotated to its offset). ``opening``: the step's fetches
        by entry (and position, for a blended document): an entry two loads of the step
        need is fetched once. Returns ``(run, position, fetch)`` per entry."""
        store = self.store.with_salt(load.salt)
        wanted = []
        for run in load.runs():
            view = store.exact() if run.exact else store
            keys = view.keys(run.token_ids, run.anchor)
            for c in range(len(keys)):
                t = c * self.chunk
                a, b = run.offset + t, run.offset + min(len(run.token_ids), t + self.chunk)
                if b > load.start and a < load.end:
                    path = view.path(keys[c])
                    key = (str(path), a if run.anchor is not None else None)
                    if key not in opening:
                        opening[key] = self._fetcher.submit(
                            self._open_entry, view, path, run.token_ids[t:t + self.chunk],
                            t, run.anchor)
                    wanted.append((run, a, opening[key]))
        return wanted

    def _collect(self, load: Load, wanted: list, deadline: float, used: set):
        """The entries of ``wanted`` as they arrive; the first that is missing, damaged,
        evicted, unreadable or not there by ``deadline`` (and everything after it) is
        reported for recomputation instead."""
        files = []
        for run, a, fut in wanted:
            try:
                f, path = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                files.append((f, a, path, run))
                used.add(id(fut))
                continue
            except FutureTimeout:
                self.store.metrics.failed("timeout")
                log.warning("kvcodec vLLM: the store did not deliver %s's entry at token %d "
                            "within %.1f s; recomputing from there", load.req_id, a,
                            self.load_timeout_s)
            except (KVCodecError, OSError):
                pass  # absent, or reported (moved aside or logged) by open_entry
            self._fail(load, a)
            break
        return (load, files) if files else None

    @staticmethod
    def _open_entry(store, path, token_ids, t: int, anchor=None):
        f = store.open_entry(path, token_ids, t, anchor)
        try:
            check_dense(f)
            if anchor is not None and f.layer_tokens != [f.num_tokens] * f.num_layers:
                log.warning("kvcodec vLLM: document entry %s keeps a sliding window in "
                            "some layers; a blend needs every token: computed instead",
                            path)
                raise FormatError(f"{path}: a sliding-window document cannot be blended")
        except BaseException:
            f.close()
            raise
        return f, path

    def _fail(self, load: Load, t: int) -> None:
        if load.recompute is not None:  # vLLM computes these tokens anyway: no report
            rc = load.recompute
            rc.failed_from = t if rc.failed_from is None else min(t, rc.failed_from)
            return
        self._failed_requests.add(load.req_id)
        first = max(t, load.start) // self.block
        last = (load.end + self.block - 1) // self.block
        self._failed_blocks.update(load.block_ids[first:last])
        self.blocks_failed += max(0, last - first)

    def _load_layers(self, jobs, beside: bool = False) -> None:
        if beside:  # the loader's thread, beside the forward pass
            torch_one_thread()
        # The buffers' rows: each entry once, however many loads of the step share it
        # (:func:`.step_plan.plan_group`), at most (a load's entries of layers vLLM
        # computes are not decoded).
        tokens = sum({id(f): f.num_tokens for _, files in jobs for f, *_ in files}.values())
        try:
            for group in layer_groups(sorted(self.caches), beside,
                                      self._pool.layer_bytes(tokens), self._pool.max_bytes):
                self._load_group(group, jobs)
                for layer in group:
                    self._events[layer].set()
        except BaseException as exc:  # never leave attention waiting, nor a wrong cache
            log.warning("kvcodec vLLM load stopped: %s", exc)
            for load, _ in jobs:
                self._fail(load, load.start)
        finally:
            for ev in self._events.values():
                ev.set()
            for _, files in jobs:
                for f, *_ in files:
                    if f is not None:
                        f.close()

    def _load_group(self, group: list, jobs: list) -> None:
        """Decode layers ``group`` of every entry of every load of this step as one plan
        (each run of a load's entries stacked as one file where they allow it, a
        blended document's keys rotated to its offset, all in one native call:
        :func:`~kvcodec.store.batch.decode_documents`) straight into vLLM's blocks
        (:class:`.placed.Placement`), or into one buffer per layer written with one call
        of its op each. Loads of the step that share a document decode it once
        (:func:`.step_plan.plan_group`), into the first one's blocks, then copied into
        the others' (:func:`.placed.copy_blocks`). A damaged entry stops its
        load there (it and later ones are recomputed); the other loads are not
        affected."""
        owners, docs, where, bufs = plan_group(jobs, group, self._pool)
        if not owners:
            return
        spans = [[entry_rows(load, files[a + i], docs[d].spans[j], self.block)
                  for i, (d, j) in enumerate(at)]
                 for (load, files, a, _), at in zip(owners, where)]
        caches = {l: self.caches[l] for l in group}
        place = Placement.of(self.layout, caches, bufs, spans,
                             [o[0].recompute is not None for o in owners])
        landed = decode_documents(self.store, docs, self.threads, place)
        runs, stopped, claimed = {}, set(), set()  # first layer -> (rows, slots)
        copies = []  # a shared entry's blocks copied from its first claim's
        for (load, files, a, b), at, got in zip(owners, where, spans):  # at: (doc, entry)s
            good = next((i for i, (d, j) in enumerate(at) if landed[d] <= j), b - a)
            if id(load) in stopped:
                continue
            if good < b - a:  # reported by decode_documents: this one and later recompute
                for j in range(a + good, len(files)):
                    if files[j][0] is not None:
                        files[j][0].close()
                    files[j] = (None,) + files[j][1:]
                self._fail(load, files[a + good][1])
                stopped.add(id(load))
            rc = load.recompute
            rows, slots = runs.setdefault(0 if rc is None else rc.check_layer + 1, ([], []))
            for i in range(good):
                r, s, lo, hi = got[i]
                fresh = at[i] not in claimed  # else another load's: read, decoded once
                claimed.add(at[i])
                rows.append(r)
                slots.append(s)
                pair = None if place is None else place.copies(r, s)
                if pair is not None:
                    copies.append(pair)
                if rc is not None and rc.check_layer in bufs:  # the check's cached side
                    k, v = bufs[rc.check_layer]
                    rc.cached.append((torch.arange(lo, hi), k[0, :, r].transpose(0, 1).float(),
                                      v[0, :, r].transpose(0, 1).float()))
                    self.tokens_preloaded += hi - lo
                elif rc is None and group[0] == min(self.caches):
                    self.tokens_loaded += hi - lo
                    self.tokens_shared += (hi - lo) * (not fresh)
        runs = {first: (torch.cat(r), torch.cat(s)) for first, (r, s) in runs.items() if r}
        write_rows(self.layout, self.caches, bufs, runs, self.store.metrics,
                   None if place is None else place.placed)
        copy_blocks(caches, copies, self.layout, self.store.metrics)

    def save_kv_layer(self, layer_name: str) -> None:
        """After a layer's attention: at a selective blend's check layer, choose the
        cached tokens whose K/V stay and keep them from being overwritten in the later
        layers (:func:`.recompute.check`)."""
        layer = self.layer_names.get(layer_name)
        todo = [l for l in self._recomputes if l.recompute.check_layer == layer]
        if not todo:
            return
        self._join_loader()  # every preload written, every failure known
        for load in todo:
            self.selections[load.req_id] = check(load, self.caches[layer], self.layout,
                                                 self.layer_names, self.block,
                                                 self._forward_context)
            if self.subset is not None:
                self.subset.activate(load, self._forward_context)
            while len(self.selections) > 64:  # the latest only (tests, benchmarks)
                del self.selections[next(iter(self.selections))]
        self._recomputes = [l for l in self._recomputes if l not in todo]

    def wait_for_layer_load(self, layer_name: str) -> None:
        ev = self._events.get(self.layer_names.get(layer_name))
        if ev is not None:
            ev.wait()

    def _join_loader(self) -> None:
        if self._loader is not None:
            self._loader.join()
            self._loader = None

    def wait_for_save(self, meta) -> None:
        self._join_loader()
        if self.subset is not None:
            self.subset.end()
        if meta is None or not meta.saves or not self.layout.can_read:
            return
        for save in meta.saves:
            if save.req_id in self._failed_requests:
                # Its blocks from the failed one on hold what was there before (another
                # request's data), and this step's forward attended to them: vLLM
                # recomputes them, and nothing of this step may reach the store.
                log.info("kvcodec vLLM: not saving %s, whose load failed", save.req_id)
                self.store.metrics.saved("dropped")
                continue
            n = len(save.token_ids)
            store = self.store.with_salt(save.salt)
            store = store.exact() if save.exact else store
            # Only the chunks from the first one the store lacks are copied and coded
            # (a new question after a cached document: its last chunk).
            with store.metrics.bookkeeping():  # not a request's lookup: not counted
                t0 = store.cached_tokens(save.token_ids)  # whole chunks: a multiple of chunk
            if t0 >= n:
                continue
            # The K/V copy this save holds until it is encoded (c[0, :, 0]: a token's).
            size = (n - t0) * sum(c[0, :, 0].nbytes for c in self.caches.values())
            if not self._reserve_save(size):
                self.saves_skipped += 1
                self.store.metrics.saved("dropped")
                log.info("kvcodec vLLM: not saving %s: %d MiB of saves already queued",
                         save.req_id, self._pending_save_bytes >> 20)
                continue
            buf = self._save_bufs.take(self.layout, len(self.caches), n - t0)
            keys, values = self.layout.read_from(
                [self.caches[l] for l in sorted(self.caches)],
                slot_ids(save.block_ids, t0, n, self.block), buf)
            kv = KVCache(keys, values, list(save.token_ids[t0:]), self.fingerprint)
            self.store.metrics.saved("queued")
            self._encoder.submit(self._put, store, kv, size, list(save.token_ids[:t0]), buf)

    def _reserve_save(self, size: int) -> bool:
        with self._pending_lock:
            if self._pending_save_bytes and (self._pending_save_bytes + size
                                             > self.max_pending_save_bytes):
                return False
            self._pending_save_bytes += size
            return True

    def _put(self, store, kv: KVCache, size: int, prefix: list, buf) -> None:
        try:
            store.put(kv, prefix=prefix)  # kv: the tokens after prefix, the store lacks
            store.metrics.saved("written")
        except Exception as exc:  # a failed save is a future cache miss, not an error
            store.metrics.saved("dropped")
            log.warning("kvcodec vLLM save failed: %s", exc)
        finally:
            self._save_bufs.give(buf)
            with self._pending_lock:
                self._pending_save_bytes -= size

    def flush(self) -> None:
        """Wait until every save queued so far is written (or has failed)."""
        self._encoder.submit(lambda: None).result()

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._join_loader()  # every error of this step is known once it ends
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self):
        self._encoder.shutdown(wait=True)
        self._fetcher.shutdown(wait=False, cancel_futures=True)


def _close_result(fut) -> None:
    """Close the entry a fetch opened after its load stopped needing it."""
    if not fut.cancelled() and fut.exception() is None:
        fut.result()[0].close()
