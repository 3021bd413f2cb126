"""What a store's users did with it, counted in process: lookups and hit tokens, bytes
read, load and encode latencies, failures by cause, saves, evictions, store bytes.

:class:`StoreMetrics` is plain, thread-safe counting (no dependency); every
:class:`~kvcodec.store.ChunkStore` has one (``store.metrics``, shared by its salted
views). :meth:`StoreMetrics.snapshot` names every value as Prometheus would, and every
exporter uses those names: :func:`to_json`, :func:`register` (a ``prometheus_client``
collector; :func:`start_http_server` serves it), the vLLM connector (its stats join
vLLM's ``/metrics`` as ``vllm:kvcodec_*``; :meth:`StoreMetrics.interval`) and
``kvcodec precompute --report``. ``prometheus_client`` is imported only by the
exporters that need it.
"""
from __future__ import annotations

import json
import threading
import weakref
from contextlib import contextmanager

# Latency buckets (seconds), the upper bounds of a Prometheus histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
# Raw latencies kept per histogram between two intervals (vLLM asks every step).
RECENT = 4096

DOCS = {
    "kvcodec_lookups_total": "Prefix lookups in the store.",
    "kvcodec_lookup_tokens_total": "Tokens of the prompts looked up.",
    "kvcodec_hit_tokens_total": "Tokens the lookups found cached.",
    "kvcodec_entries_read_total": "Entries fetched and checked.",
    "kvcodec_bytes_read_total": "Bytes of the entries fetched.",
    "kvcodec_entries_written_total": "Entries encoded and written.",
    "kvcodec_bytes_written_total": "Bytes of the entries written.",
    "kvcodec_evictions_total": "Entries removed by the capacity limit.",
    "kvcodec_evicted_bytes_total": "Bytes of the entries removed by the capacity limit.",
    "kvcodec_saves_queued_total": "vLLM saves queued for encoding.",
    "kvcodec_saves_written_total": "vLLM saves written to the store.",
    "kvcodec_saves_dropped_total": "vLLM saves never written (queue full, load failed, "
                                   "write error).",
    "kvcodec_blend_requests_total": "Blended vLLM requests planned.",
    "kvcodec_blend_documents_total": "Documents of blended requests loaded from the store.",
    "kvcodec_blend_computed_total": "Documents of blended requests computed instead.",
    "kvcodec_blend_refused_total": "Blends asked for and served as plain prompts.",
    "kvcodec_load_failures_total": "Entry loads that failed, by cause.",
    "kvcodec_load_seconds": "Load latency by stage: open (fetch and check an entry), "
                            "decode (one plan of entries), write (into a model's cache).",
    "kvcodec_encode_seconds": "Time to encode and write one entry.",
    "kvcodec_store_bytes": "Bytes the store held when last measured.",
    "kvcodec_hit_ratio": "Hit tokens over looked-up tokens, since the start.",
}


class Histogram:
    """Counts per bucket (``le`` upper bounds, cumulative on export), sum and count;
    once :meth:`take` has been called, also the raw values since its last call."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0
        self.recent = None  # None until someone takes them: nobody pays for a list

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        if self.recent is not None and len(self.recent) < RECENT:
            self.recent.append(float(value))

    def take(self) -> list:
        """The values observed since the last call (none before the first)."""
        got, self.recent = self.recent or [], []
        return got

    def snapshot(self) -> dict:
        cumulative, total = {}, 0
        for b, c in zip(self.buckets + (float("inf"),), self.counts):
            total += c
            cumulative["+Inf" if b == float("inf") else repr(b)] = total
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


class StoreMetrics:
    """Counters of one store object's use, in this process.

    Names (:meth:`snapshot`): ``kvcodec_lookups_total``, ``kvcodec_lookup_tokens_total``,
    ``kvcodec_hit_tokens_total``, ``kvcodec_hit_ratio`` (a gauge: hit over looked-up
    tokens, 0 before any lookup), ``kvcodec_entries_read_total``,
    ``kvcodec_bytes_read_total``, ``kvcodec_load_failures_total`` (by ``cause``:
    ``damaged``, ``missing``, ``environment``, ``timeout``: the vLLM worker stopped
    waiting), ``kvcodec_load_seconds`` (by ``stage``: ``open``, ``decode``, ``write``),
    ``kvcodec_entries_written_total``, ``kvcodec_bytes_written_total``,
    ``kvcodec_encode_seconds``, ``kvcodec_saves_queued_total``,
    ``kvcodec_saves_written_total``, ``kvcodec_saves_dropped_total`` (the vLLM
    connector's saves), ``kvcodec_blend_{requests,documents,computed,refused}_total``
    (its blended requests), ``kvcodec_evictions_total``, ``kvcodec_evicted_bytes_total``,
    ``kvcodec_store_bytes`` (a gauge: what the store held when last measured; -1 if
    never)."""

    COUNTERS = ("lookups", "lookup_tokens", "hit_tokens", "entries_read", "bytes_read",
                "entries_written", "bytes_written", "evictions", "evicted_bytes",
                "saves_queued", "saves_written", "saves_dropped", "blend_requests",
                "blend_documents", "blend_computed", "blend_refused")
    STAGES = ("open", "decode", "write")
    CAUSES = ("damaged", "missing", "environment", "timeout")
    SAVES = ("queued", "written", "dropped")

    def __init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()  # .quiet: lookups of this thread not counted
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.failures = dict.fromkeys(self.CAUSES, 0)
        self.load = {s: Histogram() for s in self.STAGES}
        self.encode = Histogram()
        self.store_bytes = -1
        self._mark = (dict(self.counts), dict(self.failures), -1)  # at the last interval

    def lookup(self, tokens: int, hit: int) -> None:
        """A lookup of ``tokens`` tokens that found ``hit`` of them cached."""
        if getattr(self._local, "quiet", 0):
            return
        with self._lock:
            self.counts["lookups"] += 1
            self.counts["lookup_tokens"] += int(tokens)
            self.counts["hit_tokens"] += int(hit)

    @contextmanager
    def bookkeeping(self):
        """Lookups made in this block, by this thread, are not counted: a user's own
        bookkeeping (does the store lack this prompt's chunks, before a save), not a
        request for a prefix, which would count every request twice."""
        self._local.quiet = getattr(self._local, "quiet", 0) + 1
        try:
            yield
        finally:
            self._local.quiet -= 1

    def opened(self, nbytes: int, seconds: float) -> None:
        """An entry of ``nbytes`` fetched and checked in ``seconds``."""
        with self._lock:
            self.counts["entries_read"] += 1
            self.counts["bytes_read"] += int(nbytes)
            self.load["open"].observe(seconds)

    def staged(self, stage: str, seconds: float) -> None:
        """A load's ``stage`` (``decode``: a plan of entries; ``write``: into a model's
        cache) took ``seconds``."""
        with self._lock:
            self.load[stage].observe(seconds)

    def failed(self, cause: str) -> None:
        """A load of an entry failed: ``damaged`` (what :func:`~kvcodec.store.is_damage`
        proves), ``missing``, ``environment`` or ``timeout``."""
        with self._lock:
            self.failures[cause] += 1

    def written(self, nbytes: int, seconds: float) -> None:
        """An entry of ``nbytes`` encoded and written in ``seconds``."""
        with self._lock:
            self.counts["entries_written"] += 1
            self.counts["bytes_written"] += int(nbytes)
            self.encode.observe(seconds)

    def saved(self, outcome: str) -> None:
        """A save the vLLM connector was asked for was ``queued`` (for encoding),
        ``written``, or ``dropped`` (never written)."""
        if outcome not in self.SAVES:
            raise ValueError(f"unknown save outcome {outcome!r}")
        with self._lock:
            self.counts[f"saves_{outcome}"] += 1

    def blended(self, documents: int = 0, computed: int = 0, refused: bool = False) -> None:
        """A blended vLLM request planned (``documents`` from the store, ``computed``
        not), or ``refused`` (malformed, or no blend salt with prefix caching on)."""
        with self._lock:
            self.counts["blend_refused" if refused else "blend_requests"] += 1
            self.counts["blend_documents"] += int(documents)
            self.counts["blend_computed"] += int(computed)

    def evicted(self, entries: int, nbytes: int) -> None:
        with self._lock:
            self.counts["evictions"] += int(entries)
            self.counts["evicted_bytes"] += int(nbytes)

    def measured(self, store_bytes: int) -> None:
        """What the store holds now (entries' bytes), as last listed or tracked."""
        with self._lock:
            self.store_bytes = int(store_bytes)

    def snapshot(self) -> dict:
        """Every value under its Prometheus name (histograms as dicts of cumulative
        buckets, sum and count; labelled values as dicts by label)."""
        with self._lock:
            out = {f"kvcodec_{k}_total": v for k, v in self.counts.items()}
            out["kvcodec_load_failures_total"] = dict(self.failures)
            out["kvcodec_load_seconds"] = {s: h.snapshot() for s, h in self.load.items()}
            out["kvcodec_encode_seconds"] = self.encode.snapshot()
            out["kvcodec_store_bytes"] = self.store_bytes
        out["kvcodec_hit_ratio"] = _ratio(out)
        return out

    def interval(self) -> dict:
        """What happened since the previous call (the first: since creation), under the
        snapshot's names: counters' increments (those that moved), failures by cause,
        the raw latencies (seconds; per stage for ``kvcodec_load_seconds``; none before
        the first call, at most ``RECENT`` per histogram) and the store bytes if newly
        measured. Plain numbers, lists and dicts, so it crosses processes: the vLLM
        connector's stats. One consumer per object."""
        with self._lock:
            counts, failures, store_bytes = self._mark
            out = {f"kvcodec_{k}_total": v - counts[k] for k, v in self.counts.items()
                   if v != counts[k]}
            failed = {c: n - failures[c] for c, n in self.failures.items() if n != failures[c]}
            if failed:
                out["kvcodec_load_failures_total"] = failed
            load = {s: got for s, h in self.load.items() if (got := h.take())}
            if load:
                out["kvcodec_load_seconds"] = load
            if encode := self.encode.take():
                out["kvcodec_encode_seconds"] = encode
            if self.store_bytes != store_bytes:
                out["kvcodec_store_bytes"] = self.store_bytes
            self._mark = (dict(self.counts), dict(self.failures), self.store_bytes)
        return out


def _ratio(snap: dict) -> float:
    tokens = snap["kvcodec_lookup_tokens_total"]
    return snap["kvcodec_hit_tokens_total"] / tokens if tokens else 0.0


def merge(snapshots) -> dict:
    """The sum of several :meth:`StoreMetrics.snapshot` results (several stores of one
    job or one root): counters and histograms added, the largest store bytes."""
    snapshots = list(snapshots)
    if not snapshots:
        return StoreMetrics().snapshot()
    out = json.loads(json.dumps(snapshots[0]))  # a deep copy of plain data
    for s in snapshots[1:]:
        for name, v in s.items():
            if name == "kvcodec_store_bytes":
                out[name] = max(out[name], v)
            elif name == "kvcodec_load_failures_total":
                for c, n in v.items():
                    out[name][c] = out[name].get(c, 0) + n
            elif name == "kvcodec_load_seconds":
                for stage, h in v.items():
                    _add_histogram(out[name].setdefault(stage, _empty(h)), h)
            elif name == "kvcodec_encode_seconds":
                _add_histogram(out[name], v)
            elif name.endswith("_total"):
                out[name] = out.get(name, 0) + v
    out["kvcodec_hit_ratio"] = _ratio(out)
    return out


def _empty(h: dict) -> dict:
    return {"buckets": dict.fromkeys(h["buckets"], 0), "sum": 0.0, "count": 0}


def _add_histogram(into: dict, h: dict) -> None:
    for le, n in h["buckets"].items():
        into["buckets"][le] = into["buckets"].get(le, 0) + n
    into["sum"] += h["sum"]
    into["count"] += h["count"]


def to_json(metrics, indent: int | None = 1) -> str:
    """The snapshot of ``metrics`` (a :class:`StoreMetrics`, a store, or a snapshot) as
    JSON, under the Prometheus names."""
    metrics = getattr(metrics, "metrics", metrics)
    snap = metrics.snapshot() if isinstance(metrics, StoreMetrics) else metrics
    return json.dumps(snap, indent=indent)


# -- Prometheus (prometheus_client, imported here only) -----------------------------------

class StoreCollector:
    """A ``prometheus_client`` collector of the ``kvcodec_*`` metrics of every
    :class:`StoreMetrics` registered with one registry (:func:`register`), labelled by
    ``store``; the metrics of one label are summed (a store's scheduler and worker
    objects in one vLLM process, a job's stores of several configs)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stores = []  # [(label, StoreMetrics)]

    def add(self, metrics: StoreMetrics, label: str) -> None:
        with self._lock:
            if not any(m is metrics for _, m in self._stores):
                self._stores.append((label, metrics))

    def remove(self, metrics: StoreMetrics) -> bool:
        with self._lock:
            n = len(self._stores)
            self._stores = [(l, m) for l, m in self._stores if m is not metrics]
            return len(self._stores) < n

    def describe(self):
        # The names, without samples, so that a registry refuses another collector of
        # the same names (and not this one when it is still empty).
        return list(_families({}))

    def collect(self):
        with self._lock:
            stores = list(self._stores)
        by_label = {}
        for label, m in stores:
            by_label.setdefault(label, []).append(m.snapshot())
        return _families({label: merge(snaps) for label, snaps in by_label.items()})


def _families(by_label: dict):
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

    for k in StoreMetrics.COUNTERS:
        name = f"kvcodec_{k}_total"
        family = CounterMetricFamily(name, DOCS[name], labels=["store"])
        for label, snap in by_label.items():
            family.add_metric([label], snap[name])
        yield family
    name = "kvcodec_load_failures_total"
    family = CounterMetricFamily(name, DOCS[name], labels=["store", "cause"])
    for label, snap in by_label.items():
        for c, n in snap[name].items():
            family.add_metric([label, c], n)
    yield family
    load = HistogramMetricFamily("kvcodec_load_seconds", DOCS["kvcodec_load_seconds"],
                                 labels=["store", "stage"])
    encode = HistogramMetricFamily("kvcodec_encode_seconds", DOCS["kvcodec_encode_seconds"],
                                   labels=["store"])
    for label, snap in by_label.items():
        for stage, h in snap["kvcodec_load_seconds"].items():
            load.add_metric([label, stage], list(h["buckets"].items()), h["sum"])
        h = snap["kvcodec_encode_seconds"]
        encode.add_metric([label], list(h["buckets"].items()), h["sum"])
    yield load
    yield encode
    for name in ("kvcodec_store_bytes", "kvcodec_hit_ratio"):
        family = GaugeMetricFamily(name, DOCS[name], labels=["store"])
        for label, snap in by_label.items():
            if snap[name] >= 0:  # store bytes never measured: no sample, not -1
                family.add_metric([label], snap[name])
        yield family


_COLLECTORS = weakref.WeakKeyDictionary()  # registry -> its StoreCollector
_SERVERS = {}                               # (addr, port) -> (server, thread)
_EXPORT_LOCK = threading.Lock()


def register(metrics, registry=None, *, store: str | None = None) -> StoreCollector:
    """Export ``metrics`` (a :class:`StoreMetrics`, or a store: its ``metrics``) from
    ``registry`` (default ``prometheus_client.REGISTRY``) under the label
    ``store=store`` (default: the store's root, or ``""`` for bare metrics).

    Every store registered with one registry goes into its one
    :class:`StoreCollector`, so several stores in a process never collide: each root is
    one label value, and the metrics of stores of one root are summed. Registering the
    same metrics again does nothing. Returns the registry's collector."""
    from prometheus_client import REGISTRY

    registry = REGISTRY if registry is None else registry
    if store is None:
        store = str(getattr(metrics, "root", ""))
    metrics = getattr(metrics, "metrics", metrics)
    with _EXPORT_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = StoreCollector()
            registry.register(collector)
            _COLLECTORS[registry] = collector
        collector.add(metrics, store)
    return collector


def unregister(metrics, registry=None) -> bool:
    """Stop exporting ``metrics`` (or a store's) from ``registry``; whether it was."""
    from prometheus_client import REGISTRY

    collector = _COLLECTORS.get(REGISTRY if registry is None else registry)
    return collector is not None and collector.remove(getattr(metrics, "metrics", metrics))


def start_http_server(port: int, addr: str = "0.0.0.0", registry=None):
    """``prometheus_client.start_http_server``: ``registry`` (default
    ``prometheus_client.REGISTRY``) served at ``http://addr:port/metrics`` from a daemon
    thread. Once per address in a process: a second call returns the first server.
    Returns ``(server, thread)``; an ``OSError`` if the port is taken."""
    import prometheus_client

    with _EXPORT_LOCK:
        if (addr, port) not in _SERVERS:
            _SERVERS[(addr, port)] = prometheus_client.start_http_server(
                port, addr, registry=prometheus_client.REGISTRY if registry is None
                else registry)
        return _SERVERS[(addr, port)]
