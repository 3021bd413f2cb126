"""The connector's metrics in vLLM's own ``/metrics``, through vLLM 0.32's connector
stats API, and on a port of their own (``metrics_port``).

How the stats travel in vLLM 0.32: after every step the model runner asks the worker's
connector for :meth:`~KVCodecConnector.get_kv_connector_stats` (here: its store's
:meth:`~kvcodec.store.metrics.StoreMetrics.interval`, what happened since the last
step), the engine aggregates the workers' (:meth:`KVCodecStats.aggregate`), and the
scheduler adds its own connector's (the lookups: the scheduler side looks prefixes
up). The sum rides the engine's ``SchedulerStats`` to the front end (only while stats
are logged: ``vllm serve`` by default, ``LLM(disable_log_stats=False)``), where
vLLM's Prometheus logger hands it to the :class:`KVCodecPromMetrics` that
:meth:`~KVCodecConnector.build_prom_metrics` made, and its logging logger prints
:meth:`KVCodecStats.reduce` with its periodic lines.

In ``/metrics`` the names are the store's with vLLM's prefix (``vllm:kvcodec_*``) and
vLLM's labels (``model_name``, ``engine``); the hit-ratio gauge is left to vLLM's own
``vllm:external_prefix_cache_hits`` / ``vllm:external_prefix_cache_queries``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

from ...store.metrics import (DOCS, LATENCY_BUCKETS, StoreMetrics, register,
                              start_http_server)

log = logging.getLogger("kvcodec")

COUNTERS = [f"kvcodec_{k}_total" for k in StoreMetrics.COUNTERS]
FAILURES = "kvcodec_load_failures_total"
LOAD = "kvcodec_load_seconds"
ENCODE = "kvcodec_encode_seconds"
STORE_BYTES = "kvcodec_store_bytes"


def add_intervals(a: dict, b: dict) -> dict:
    """Two :meth:`StoreMetrics.interval` results as one (two workers, or a worker's and
    the scheduler's): increments added, latencies joined, the larger store bytes."""
    out = dict(a)
    for name, v in b.items():
        if name == STORE_BYTES:
            out[name] = max(out.get(name, v), v)
        elif name == FAILURES:
            out[name] = {c: out.get(name, {}).get(c, 0) + v.get(c, 0)
                         for c in {*out.get(name, {}), *v}}
        elif name == LOAD:
            out[name] = {s: out.get(name, {}).get(s, []) + v.get(s, [])
                         for s in {*out.get(name, {}), *v}}
        elif name == ENCODE:
            out[name] = out.get(name, []) + v
        else:
            out[name] = out.get(name, 0) + v
    return out


@dataclass
class KVCodecStats(KVConnectorStats):
    """One interval of the connector's store metrics (``data``: a
    :meth:`StoreMetrics.interval`, plain data that crosses processes)."""

    def reset(self):
        self.data = {}

    def is_empty(self) -> bool:
        return not self.data

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other is not None and not other.is_empty():
            self.data = add_intervals(self.data, other.data)
        return self

    def reduce(self) -> dict:
        """The interval in a few numbers, for vLLM's log line: the counters that moved,
        failures by cause, mean latency per stage (ms)."""
        out = {k.removeprefix("kvcodec_").removesuffix("_total"): v
               for k, v in self.data.items() if k in COUNTERS}
        for c, n in self.data.get(FAILURES, {}).items():
            out[f"failures_{c}"] = n
        stages = dict(self.data.get(LOAD, {}), encode=self.data.get(ENCODE, []))
        for stage, seconds in stages.items():
            if seconds:
                out[f"{stage}_ms"] = round(1000 * sum(seconds) / len(seconds), 3)
        return out


def _vllm(name: str) -> str:
    # vLLM's namespace (vLLM unregisters its own "vllm:" metrics when it makes new
    # ones); counters without "_total", which the client (or Ray's wrapper) adds.
    return "vllm:" + name.removesuffix("_total")


class KVCodecPromMetrics(KVConnectorPromMetrics):
    """The store's metrics as vLLM metrics (the classes vLLM passes: prometheus_client's,
    or Ray's wrappers), fed by :meth:`observe` with each interval's increments."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        labels = list(labelnames)
        self.counters = {name: self._counter_cls(name=_vllm(name), documentation=DOCS[name],
                                                 labelnames=labels) for name in COUNTERS}
        self.failures = self._counter_cls(name=_vllm(FAILURES), documentation=DOCS[FAILURES],
                                          labelnames=labels + ["cause"])
        self.load = self._histogram_cls(name=_vllm(LOAD), documentation=DOCS[LOAD],
                                        labelnames=labels + ["stage"],
                                        buckets=list(LATENCY_BUCKETS))
        self.encode = self._histogram_cls(name=_vllm(ENCODE), documentation=DOCS[ENCODE],
                                          labelnames=labels, buckets=list(LATENCY_BUCKETS))
        self.store_bytes = self._gauge_cls(name=_vllm(STORE_BYTES),
                                           documentation=DOCS[STORE_BYTES],
                                           labelnames=labels, multiprocess_mode="mostrecent")

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0):
        data = transfer_stats_data
        values = list(self.per_engine_labelvalues[engine_idx])
        for name, counter in self.counters.items():
            if data.get(name):
                counter.labels(*values).inc(data[name])
        for c, n in data.get(FAILURES, {}).items():
            self.failures.labels(*values, c).inc(n)
        for stage, seconds in data.get(LOAD, {}).items():
            child = self.load.labels(*values, stage)
            for s in seconds:
                child.observe(s)
        if data.get(ENCODE):
            child = self.encode.labels(*values)
            for s in data[ENCODE]:
                child.observe(s)
        if data.get(STORE_BYTES, -1) >= 0:
            self.store_bytes.labels(*values).set(data[STORE_BYTES])


_PORT_REGISTRY = []  # the registry metrics_port serves in this process, made once


def port_registry():
    """The ``prometheus_client`` registry that ``metrics_port`` serves in this process
    (the ``kvcodec_*`` metrics of its connectors' stores, nothing of vLLM's)."""
    from prometheus_client import CollectorRegistry

    if not _PORT_REGISTRY:
        _PORT_REGISTRY.append(CollectorRegistry())
    return _PORT_REGISTRY[0]


def export_on_port(store, port: int, serve: bool) -> None:
    """``metrics_port``: ``store``'s metrics in this process's :func:`port_registry`
    (labelled by its root; a scheduler's and a worker's store of one process summed),
    served at ``http://0.0.0.0:port/metrics`` if ``serve`` (the worker side). A port
    another process holds (a second worker) is logged, not fatal: that process's
    metrics still reach vLLM's ``/metrics``."""
    registry = port_registry()
    register(store, registry)
    if serve:
        try:
            start_http_server(port, registry=registry)
        except OSError as exc:
            log.warning("kvcodec vLLM: cannot serve metrics on port %d (%s); they still "
                        "reach vLLM's /metrics", port, exc)
