"""The work of one process: a loaded model and the job's stores turn documents into
stored entries. Both runners drive it (in-process, and each Ray worker).

Pipeline
    The calling thread reads documents, skips finished ones (manifest, then entry
    existence), tokenizes and cuts windows, and prefills batches of windows; one encoder
    thread evicts (if asked), encodes and writes each window's entries, then records
    finished documents in the manifest. A bounded queue between them (``QUEUE`` batches)
    overlaps encoding with the next prefill and bounds memory. Encoding holds the GIL
    only in short Python stretches; the model's kernels release it.

Errors
    A document that cannot be prefilled or stored (a :class:`KVCodecError`: too long for
    an anchor, a shape the codec refuses...) is reported as failed and the job goes on;
    a batch that fails is retried window by window so one bad window does not fail its
    neighbours. A store that cannot be written (``OSError``: full disk, no permission,
    unreachable object store) stops the job, since every later write would fail too:
    the same command resumes it. So does any other failure of the encoder thread outside
    one document's entries (a manifest record that cannot be written, a bug): the
    encoder records it and keeps draining the queue, so the calling thread never waits
    on a full queue, stops at its next hand-off and raises it. Every write is atomic
    (temp and rename), so a stopped job leaves only whole entries and records.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import KVCodecError
from ..models.batch import capture_batch
from ..models.capture import default_anchor
from ..models.tokens import chat_text, document_ids, special_prefix
from ..store import ChunkStore
from ..store.keys import entry_name
from .corpus import Skipped
from .manifest import Manifest
from .plan import LOOKAHEAD, JobSpec, batches, windows
from .report import DocResult

QUEUE = 2  # prefilled batches waiting for the encoder
HANDOFF_POLL_S = 1.0  # how often a hand-off to a full queue checks the encoder is alive


@dataclass
class _Doc:
    result: DocResult
    text: str
    left: int  # windows not yet stored
    failed: list = field(default_factory=list)
    entries: list = field(default_factory=list)  # its entries' names, for the manifest


@dataclass
class _Window:
    doc: _Doc
    ids: list


class Engine:
    """Documents in, entries out, for one model and one :class:`JobSpec`.

    ``store`` is a directory or fsspec URL; ``threads`` the coder threads per entry
    (1 leaves the cores to the prefill running beside the encoder).
    """

    def __init__(self, lm, spec: JobSpec, store, *, storage_options=None, threads: int = 1):
        self.lm, self.spec = lm, spec
        self.stores = [ChunkStore(store, lm.fingerprint, c, storage_options=storage_options,
                                  salt=spec.salt, max_bytes=spec.max_bytes, ttl=spec.ttl)
                       for c in spec.configs]
        for s in self.stores:
            s.threads = threads
        chunk = math.lcm(*(s.chunk_tokens for s in self.stores))
        self.anchor = default_anchor(lm.tokenizer) if spec.independent else None
        context = getattr(lm.config, "max_position_embeddings", None)
        self.window = spec.window(context, chunk, len(self.anchor or ()))
        # Every prefix window starts as a prompt does (the BOS where the tokenizer adds one).
        self.prefix = [] if self.anchor is not None else special_prefix(lm.tokenizer)
        if spec.chat:
            chat_text(lm.tokenizer, "", spec.system)  # no template: refused before any work
        self.manifest = Manifest(self.stores[0],
                                 spec.key(lm.fingerprint, self.window, self.prefix,
                                          self.stores[0].store_config))
        self._policy = None
        if spec.evict:
            from ..evict import parse
            from ..evict.policies import get_policy

            name, ratio = parse(spec.evict)
            self._policy = (name, ratio, bool(get_policy(name).needs & {"observed", "replay"}))
        self._lock = threading.Lock()

    # -- the calling thread ------------------------------------------------------------

    def run(self, items, emit) -> None:
        """Process ``items`` (:class:`~kvcodec.jobs.corpus.Document` or ``Skipped``);
        ``emit(DocResult)`` is called once per item, from this thread or the encoder's."""
        work: queue.Queue = queue.Queue(maxsize=QUEUE)
        failure: list = []
        encoder = threading.Thread(target=self._encode_loop, args=(work, emit, failure),
                                   name="kvcodec-encode", daemon=True)
        encoder.start()
        pending: list = []

        def hand_off(item) -> None:
            # The encoder drains the queue until None, even after a failure; the timeout
            # only guards against it having died some other way.
            while True:
                try:
                    work.put(item, timeout=HANDOFF_POLL_S)
                    return
                except queue.Full:
                    if not encoder.is_alive():
                        if not failure:
                            failure.append(RuntimeError("the encoder thread stopped"))
                        return

        try:
            for item in items:
                if failure:
                    break
                if isinstance(item, Skipped):
                    self._emit(emit, DocResult(item.id, "skipped", reason=item.reason))
                    continue
                pending.extend(self._plan(item, emit))
                if len(pending) >= LOOKAHEAD:
                    self._prefill(pending, hand_off, failure)
                    pending = []
            if pending and not failure:
                self._prefill(pending, hand_off, failure)
        finally:
            hand_off(None)
            encoder.join()
        if failure:
            raise failure[0]

    def _plan(self, doc, emit) -> list:
        """The windows of ``doc`` that need a prefill (none if it is finished)."""
        record = self.manifest.get(doc.text)
        if record is not None:
            self._emit(emit, DocResult(doc.id, "stored", tokens=record.get("tokens", 0),
                                       windows=record.get("windows", 0),
                                       chunks_skipped=record.get("chunks", 0)))
            return []
        result = DocResult(doc.id, "done")
        try:
            ids = document_ids(self.lm.tokenizer, doc.text, chat=self.spec.chat,
                               system=self.spec.system, independent=self.anchor is not None)
        except Exception as exc:  # noqa: BLE001 - a tokenizer failure fails this document
            self._emit(emit, DocResult(doc.id, "failed", reason=f"tokenizer: {exc}"))
            return []
        if len(ids) <= len(self.prefix):
            self._emit(emit, DocResult(doc.id, "skipped", reason="no tokens"))
            return []
        parts = windows(ids, self.window, self.prefix)
        result.tokens, result.windows = len(ids), len(parts)
        state = _Doc(result, doc.text, 0)
        todo = []
        for part in parts:
            state.entries.extend(self._entry_names(part))
            stored = self._stored_chunks(part)
            if stored is None:
                todo.append(_Window(state, part))
            else:
                result.chunks_skipped += stored
        state.left = len(todo)
        if not todo:
            result.status = "stored"
            self._finish(state, emit)
        return todo

    def _entry_names(self, ids) -> list:
        """Where the entries of the window ``ids`` live in the store, for every config
        (``kvcodec store rm --doc`` removes a document by them)."""
        out = []
        for s in self.stores:
            if self._policy is not None:
                out.append(entry_name(s.evicted_key(ids, self.spec.evict)))
            else:
                out.extend(entry_name(k) for k in s.keys(ids, self.anchor))
        return out

    def _stored_chunks(self, ids) -> int | None:
        """How many entries hold ``ids`` if every store has all of them, else None."""
        n = 0
        for s in self.stores:
            if self._policy is not None:
                if s.evicted(ids, self.spec.evict) is None:
                    return None
                n += 1
                continue
            chunks = _chunks(ids, s)
            if self.anchor is not None:
                if s.document(ids, self.anchor) is None:
                    return None
            elif s.lookup(ids, partial=True).tokens < len(ids):
                return None
            n += chunks
        return n

    def _prefill(self, pending: list, hand_off, failure) -> None:
        for group in batches(pending, lambda w: len(w.ids), self.spec.batch_tokens):
            if failure:
                return
            t = time.perf_counter()
            kvs = self._capture(group)
            dt = time.perf_counter() - t
            tokens = sum(len(w.ids) for w in group)
            for w in group:
                w.doc.result.prefill_s += dt * len(w.ids) / tokens
            hand_off(list(zip(group, kvs)))

    def _capture(self, group: list) -> list:
        """KV (or the exception it raised) of each window of ``group``."""
        if self._policy is not None and self._policy[2]:
            return [self._one(w) for w in group]  # attention hooks: one window at a time
        if len(group) == 1:
            return [self._one(group[0])]
        try:
            return capture_batch(self.lm, [w.ids for w in group], anchor=self.anchor)
        except Exception:  # noqa: BLE001 - retried one by one, which reports each failure
            return [self._one(w) for w in group]

    def _one(self, w: _Window):
        try:
            if self._policy is not None and self._policy[2]:
                from ..evict import capture

                return capture(self.lm, token_ids=w.ids, policy=self._policy[0],
                               ratio=self._policy[1])
            return capture_batch(self.lm, [w.ids], anchor=self.anchor)[0]
        except Exception as exc:  # noqa: BLE001 - reported as this document's failure
            return exc

    # -- the encoder thread ------------------------------------------------------------

    def _encode_loop(self, work, emit, failure) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            if failure:
                continue  # drain: the job is stopping
            try:
                self._encode(item, emit, failure)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                failure.append(exc)

    def _encode(self, item: list, emit, failure) -> None:
        """Store the entries of one prefilled batch; a document whose entries are all
        stored gets its manifest record (a failure there stops the job)."""
        for w, kv in item:
            try:
                if isinstance(kv, BaseException):
                    raise kv
                t = time.perf_counter()
                self._store(w, kv)
                w.doc.result.codec_s += time.perf_counter() - t
            except OSError as exc:
                failure.append(exc)
                return
            except Exception as exc:  # noqa: BLE001 - this document fails, the job goes on
                w.doc.failed.append(_describe(exc))
            w.doc.result.tokens_prefilled += len(w.ids)
            w.doc.left -= 1
            if w.doc.left == 0:
                self._finish(w.doc, emit)

    def _store(self, w: _Window, kv) -> None:
        r = w.doc.result
        if self._policy is not None and not self._policy[2]:
            from ..evict import evict

            kv = evict(kv, self._policy[0], self._policy[1])
        for s in self.stores:
            before = (s.written_chunks, s.written_bytes, s.written_numel)
            if self._policy is not None:
                s.put_evicted(kv, self.spec.evict)
            elif self.anchor is not None:
                s.put_document(kv)
            else:
                s.put(kv)
            new = s.written_chunks - before[0]
            r.chunks_new += new
            r.chunks_skipped += (1 if self._policy is not None else _chunks(w.ids, s)) - new
            r.bytes_new += s.written_bytes - before[1]
            r.fp16_bytes_new += 2 * (s.written_numel - before[2])

    def _finish(self, doc: _Doc, emit) -> None:
        r = doc.result
        if doc.failed:
            r.status, r.reason = "failed", doc.failed[0]
        else:
            self.manifest.put(doc.text, {"id": r.id, "tokens": r.tokens, "windows": r.windows,
                                         "chunks": r.chunks_new + r.chunks_skipped,
                                         "entries": doc.entries})
        self._emit(emit, r)

    def _emit(self, emit, result: DocResult) -> None:
        with self._lock:
            emit(result)


def _chunks(ids, store) -> int:
    """How many entries ``store`` keeps a window of ``ids`` in (the last may be partial)."""
    return -(-len(ids) // store.chunk_tokens)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, KVCodecError) else f"{type(exc).__name__}: {text}"

