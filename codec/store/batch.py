"""Many entries decoded as one plan: the store's prefix loads (:meth:`ChunkStore.fill`)
and the vLLM worker's steps (every request's entries in one native call per layer group)
go through :func:`decode_documents`.

A document (a request's or prefix's run of consecutive entries) whose entries stack is
planned as one file (:mod:`kvcodec.format.stacked`: a job and a target per stream, not
per entry and stream), and every stacked document of a call runs in one native call.
The others, and any whose stacked decode reports an error, go through
:func:`decode_entries`: entries planned in order into one
:class:`~kvcodec.format.plan.DecodePlan` per chunk size (one, in practice), decoded in
one native call, then finished in order. Each entry belongs to a ``group`` (a
document): the first entry of a group that cannot be planned, decoded or finished is
reported to the store (:meth:`ChunkStore.quarantine`: moved aside if the failure proves
damage) and the group's later entries are not used, while entries before it, and other
groups, land. Plans, runs and finishing are timed into ``store.metrics`` (stage
``decode``).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..core.kvcache import token_views
from ..errors import CorruptError, KVCodecError
from ..format.plan import finish, run
from ..format.stacked import plan_stack
from .tails import Prefix, covered


@dataclass
class Entry:
    """One entry to decode: its open file, location (for reports), destinations
    (``{layer: (keys, values)}`` as :meth:`KVCFile.decode_into` takes them), group, and
    the position of its first token (None: where it was coded; a document's entry
    blended elsewhere: :meth:`KVCFile.decode_into`'s ``position_offset``)."""

    file: object
    loc: object
    dst: dict
    group: object = None
    position_offset: int | None = None


def decode_entries(store, entries: list, threads: int = 0, place=None) -> list:
    """Decode ``entries`` (a list of :class:`Entry`, each group's in token order) into
    their destinations; returns per entry whether it landed (it and every earlier entry
    of its group decoded). Failures are reported to ``store``, not raised. ``place``:
    called with each plan before it runs (:func:`decode_documents`)."""
    started = time.perf_counter()
    failed = {}   # group -> index of its first failed entry
    plans = {}    # chunk_tokens -> DecodePlan
    placed = []   # (entry index, plan, first target, end target)
    for i, e in enumerate(entries):
        if e.group in failed:
            continue
        try:
            p = e.file.plan(e.dst, position_offset=e.position_offset)
        except (KVCodecError, OSError) as exc:
            _report(store, e, exc, failed, i)
            continue
        plan = plans.setdefault(p.chunk_tokens, p)
        start = len(plan.targets) if plan is not p else 0
        if plan is not p:
            plan.extend(p)
        placed.append((i, plan, start, len(plan.targets)))
    for p in plans.values():
        if place is not None:
            place(p)
    errors = {id(p): run(p, threads) for p in plans.values()}
    ok = [False] * len(entries)
    for i, plan, start, end in placed:
        e = entries[i]
        if failed.get(e.group, i + 1) < i:
            continue
        errs = errors[id(plan)]
        bad = next((j for j in range(start, end) if errs[j] is not None), None)
        try:
            if bad is not None:
                raise CorruptError(f"{plan.targets[bad].name}: {errs[bad]}")
            finish(plan.targets[start:end])
        except (KVCodecError, OSError) as exc:
            _report(store, e, exc, failed, i)
            continue
        ok[i] = True
    if entries:
        store.metrics.staged("decode", time.perf_counter() - started)
    # An entry landed if it decoded and no earlier entry of its group failed.
    return [x and failed.get(e.group, i + 1) > i for i, (x, e) in enumerate(zip(ok, entries))]


def _report(store, e: Entry, exc: BaseException, failed: dict, i: int) -> None:
    store.quarantine(e.loc, exc, e.file.identity)
    failed[e.group] = min(i, failed.get(e.group, i))


def fetch_all(fetch, n: int, parallel: bool, workers: int = 8) -> list:
    """``[fetch(0), ..., fetch(n - 1)]``, in parallel threads when ``parallel`` (an
    object store: each fetch waits on the network)."""
    if not parallel or n < 2:
        return [fetch(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=min(workers, n),
                            thread_name_prefix="kvcodec-fetch") as pool:
        return list(pool.map(fetch, range(n)))


def leading(present, names: list, parallel: bool, wave: int = 16) -> int:
    """How many of ``names`` from the first are ``present`` (a predicate): one at a time,
    or ``wave`` at a time in parallel threads (an object store answers each HEAD over
    the network)."""
    if not parallel:
        wave = 1
    n = 0
    while n < len(names):
        part = names[n:n + wave]
        got = fetch_all(lambda i: present(part[i]), len(part), parallel, wave)
        if False in got:
            return n + got.index(False)
        n += len(part)
    return n


def open_prefix(store, token_ids, locs) -> tuple:
    """The entries ``locs`` (consecutive chunks of ``token_ids`` from token 0) opened and
    checked, in parallel from an object store: ``(files, spans, n)``, each entry's file
    (None where it is missing or failed, reported by ``open_entry``) and token span, and
    how many lead before the first that failed. The caller closes the files. The last
    entry may hold fewer tokens than a chunk (``locs.tokens``: a document's end under a
    longer prompt, :mod:`.tails`)."""
    chunk, n = store.chunk_tokens, covered(locs, token_ids, store.chunk_tokens)
    spans = [(i * chunk, min(n, (i + 1) * chunk)) for i in range(len(locs))]

    def fetch(i):
        t0, t1 = spans[i]
        try:
            return store.open_entry(locs[i], token_ids[t0:t1], t0)
        except (KVCodecError, OSError):
            return None  # reported by open_entry
    files = fetch_all(fetch, len(locs), store.remote)
    return files, spans, files.index(None) if None in files else len(files)


def fill(store, bufs, token_ids, locs, threads: int = 0, windows=None,
         upto: int | None = None) -> int:
    """:meth:`ChunkStore.fill`: the entries ``locs`` fetched (:func:`open_prefix`) and
    decoded into ``bufs`` (a list over all layers) as one plan; returns the end of what
    landed. ``windows``: per layer its sliding window (None: full attention), where the
    caller keeps only a window's last ``window - 1`` tokens of the prefix: an entry
    wholly before that is not decoded for that layer (on Gemma 3's 15 of 18 sliding
    layers, most of a long document's work). ``upto``: the caller uses at most that
    many tokens (the last entry's later rows are decoded, unused: the windows end
    there; entries wholly past it are not read), and the end returned is at most
    ``upto``."""
    chunk = store.chunk_tokens
    keep = len(locs) if upto is None else -(-upto // chunk)
    if keep < len(locs):  # the entries kept are whole chunks
        locs = Prefix(locs[:keep], keep * chunk)
    files, spans, n = open_prefix(store, token_ids, locs)
    try:
        landed = _decode_prefix(store, files[:n], locs[:n], bufs, spans[:n], windows,
                                threads, upto)
        if windows is not None and 0 < landed < n:  # a shorter prefix: earlier windows
            landed = _decode_prefix(store, files[:landed], locs[:landed], bufs,
                                    spans[:landed], windows, threads, upto)
    finally:
        for f in files:
            if f is not None:
                f.close()
    end = spans[landed - 1][1] if landed else 0
    return end if upto is None else min(end, upto)


def _decode_prefix(store, files, locs, bufs, spans, windows, threads, upto=None) -> int:
    """How many leading entries of a prefix landed, each decoded for the layers that
    need it (every layer without ``windows``, whose windows end at ``upto``, else at the
    last entry's end): consecutive entries that need the same layers are one document."""
    if not files:
        return 0
    end = spans[-1][1] if upto is None else min(spans[-1][1], upto)
    first = [0 if not w else max(0, end - w + 1) for w in (windows or [None] * len(bufs))]
    docs, runs = [], []  # runs: (first entry, end, layers) per document
    for i, (_, t1) in enumerate(spans):
        need = tuple(l for l, f in enumerate(first) if t1 > f)
        if runs and runs[-1][2] == need:
            runs[-1] = (runs[-1][0], i + 1, need)
        else:
            runs.append((i, i + 1, need))
    for a, b, need in runs:
        if need:
            docs.append(Document(files[a:b], locs[a:b], bufs if len(need) == len(bufs)
                                 else {l: bufs[l] for l in need}, spans[a:b]))
    landed = iter(decode_documents(store, docs, threads))
    total = 0
    for a, b, need in runs:  # a run no layer needs lands undecoded
        got = next(landed) if need else b - a
        total += got
        if got < b - a:
            break
    return total


@dataclass
class Document:
    """Consecutive entries of one document to decode: open files, their locations (for
    reports), destinations ``{layer: (keys, values)}`` (or a list over all layers) of
    ``[1, heads, capacity, head_dim]`` buffers (float32 or bfloat16 are decoded into in
    place, any strides with contiguous channels), each entry's token span in them, and
    the position of the first entry's first token (None: where it was coded; a document
    blended at another offset: its keys are rotated there)."""

    files: list
    locs: list
    bufs: object
    spans: list
    position_offset: int | None = None

    def offset_of(self, i: int) -> int | None:
        """Where entry ``i``'s first token goes (None: where it was coded)."""
        if self.position_offset is None:
            return None
        return self.position_offset + self.spans[i][0] - self.spans[0][0]


def decode_documents(store, docs: list, threads: int = 0, place=None) -> list:
    """Decode several documents' entries (the requests of a vLLM step, a store prefix)
    with as few native calls as they allow: each document that stacks
    (:func:`~kvcodec.format.stacked.plan_stack`) is one job per stream, and all of them
    run as one plan. A document that does not stack, or whose stacked decode reports an
    error, is decoded entry by entry (:func:`decode_entries`: the damaged entry is
    reported to the store, the ones before it land). Returns per document how many of
    its leading entries landed. ``place``: called with every plan before it runs (the
    vLLM worker's :class:`~kvcodec.integrations.vllm.placed.Placement`, which may send
    its rows elsewhere than the documents' buffers)."""
    started = time.perf_counter()
    landed = [0] * len(docs)
    plans, rest = {}, []   # chunk_tokens -> (plan, [(doc, first target, end)])
    for d, doc in enumerate(docs):
        try:
            p = plan_stack(doc.files, doc.bufs, doc.spans, doc.position_offset)
        except (KVCodecError, OSError):
            p = None
        if p is None:
            rest.append(d)
            continue
        plan, owned = plans.setdefault(p.chunk_tokens, (p, []))
        start = len(plan.targets) if plan is not p else 0
        if plan is not p:
            plan.extend(p)
        owned.append((d, start, len(plan.targets)))
    for plan, owned in plans.values():
        if place is not None:
            place(plan)
        errors = run(plan, threads)
        for d, a, b in owned:
            try:
                if any(e is not None for e in errors[a:b]):
                    raise CorruptError("stacked decode failed")
                finish(plan.targets[a:b])
                landed[d] = len(docs[d].files)
            except (KVCodecError, OSError):
                rest.append(d)
    if plans:
        store.metrics.staged("decode", time.perf_counter() - started)
    if rest:
        entries = [Entry(f, docs[d].locs[i], _views(docs[d].bufs, *docs[d].spans[i]), d,
                         docs[d].offset_of(i))
                   for d in sorted(rest) for i, f in enumerate(docs[d].files)]
        ok = decode_entries(store, entries, threads, place)
        for e, good in zip(entries, ok):
            landed[e.group] += good  # a group's entries land as a leading run
    return landed


def _views(bufs, t0: int, t1: int) -> dict:
    if isinstance(bufs, dict):
        return {l: (k[:, :, t0:t1], v[:, :, t0:t1]) for l, (k, v) in bufs.items()}
    return token_views(bufs, t0, t1)
