"""A store's metrics: counted on a real round trip (put, lookup, load, a damaged and a
missing entry), exported under the same names as JSON, in Prometheus' text format and
over HTTP, and in a precompute job's report."""
import json
import socket
import urllib.request

import pytest

from kvcodec.store import ChunkStore
from kvcodec.store import metrics as m

prometheus_client = pytest.importorskip("prometheus_client")


def _sample(registry, name, **labels):
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


@pytest.fixture
def used(tmp_path, lm, kv_600):
    """A store after a put of 600 tokens (3 entries), a lookup, a prefix load, a load
    whose second entry is damaged and a read of an absent entry."""
    store = ChunkStore(tmp_path / "store", lm.fingerprint, config="lossless")
    ids = kv_600.token_ids
    assert store.put(kv_600) == 3
    locs = store.lookup(ids)  # two whole chunks: 512 of 600 tokens
    assert store.load_prefix(ids).num_tokens == 512  # a lookup, two opens, one decode
    sizes = [loc.stat().st_size for loc in locs]
    data = bytearray(locs[1].read_bytes())
    data[-100] ^= 0xFF
    locs[1].write_bytes(bytes(data))
    assert store.load_prefix(ids).num_tokens == 256  # the damaged one moved aside
    with pytest.raises(FileNotFoundError):
        store.open_entry(locs[1], ids[256:512], 256)
    return store, sizes


def test_a_round_trip_is_counted(used, kv_600):
    store, sizes = used
    snap = store.metrics.snapshot()
    written = sum(p.stat().st_size for p in store.entries())
    assert snap["kvcodec_entries_written_total"] == 3
    assert snap["kvcodec_bytes_written_total"] == written + sizes[1]  # + the moved one
    assert snap["kvcodec_encode_seconds"]["count"] == 3
    assert snap["kvcodec_lookups_total"] == 3
    assert snap["kvcodec_lookup_tokens_total"] == 3 * 600
    assert snap["kvcodec_hit_tokens_total"] == 3 * 512
    assert snap["kvcodec_hit_ratio"] == pytest.approx(512 / 600)
    # The first load read both entries; the second read both too (its second is
    # damaged in the payload: the checksum fails in the decode, not in the open).
    assert snap["kvcodec_entries_read_total"] == 4
    assert snap["kvcodec_bytes_read_total"] == 2 * sum(sizes)
    assert snap["kvcodec_load_failures_total"] == {"damaged": 1, "missing": 1,
                                                   "environment": 0, "timeout": 0}
    load = snap["kvcodec_load_seconds"]
    assert load["open"]["count"] == 4 and load["decode"]["count"] == 2
    assert load["write"]["count"] == 0
    assert json.loads(m.to_json(store)) == json.loads(json.dumps(snap))


def test_histogram_buckets_are_cumulative():
    h = m.Histogram()
    for s in (0.0001, 0.003, 0.003, 0.2, 30.0):
        h.observe(s)
    snap = h.snapshot()
    counts = list(snap["buckets"].values())
    assert counts == sorted(counts) and counts[-1] == snap["count"] == 5
    assert snap["buckets"]["0.0005"] == 1 and snap["buckets"]["0.005"] == 3
    assert snap["buckets"]["0.25"] == 4 and snap["buckets"]["10.0"] == 4
    assert snap["buckets"]["+Inf"] == 5 and snap["sum"] == pytest.approx(30.2061)


def test_prometheus_text_exposition(used):
    store, sizes = used
    registry = prometheus_client.CollectorRegistry()
    m.register(store, registry)
    m.register(store.with_salt("tenant"), registry)  # the same metrics: once
    root = str(store.root)
    snap = store.metrics.snapshot()
    text = prometheus_client.generate_latest(registry).decode()
    for name in ("kvcodec_lookups_total", "kvcodec_hit_tokens_total", "kvcodec_hit_ratio",
                 "kvcodec_load_seconds_bucket", "kvcodec_encode_seconds_count",
                 "kvcodec_saves_dropped_total", "kvcodec_load_failures_total"):
        assert name in text
    assert _sample(registry, "kvcodec_lookups_total", store=root) == 3
    assert _sample(registry, "kvcodec_bytes_read_total", store=root) == 2 * sum(sizes)
    assert _sample(registry, "kvcodec_load_failures_total", store=root, cause="damaged") == 1
    assert _sample(registry, "kvcodec_hit_ratio", store=root) == pytest.approx(512 / 600)
    assert _sample(registry, "kvcodec_encode_seconds_count", store=root) == 3
    # Buckets: cumulative, one per bound and +Inf, as the snapshot has them.
    buckets = [_sample(registry, "kvcodec_load_seconds_bucket", store=root, stage="open", le=le)
               for le in snap["kvcodec_load_seconds"]["open"]["buckets"]]
    assert buckets == sorted(buckets) and buckets[-1] == 4
    assert _sample(registry, "kvcodec_load_seconds_count", store=root, stage="open") == 4
    assert _sample(registry, "kvcodec_load_seconds_sum", store=root, stage="open") == \
        pytest.approx(snap["kvcodec_load_seconds"]["open"]["sum"])
    # Never measured (no capacity limit): no sample rather than -1.
    assert registry.get_sample_value("kvcodec_store_bytes", {"store": root}) is None


def test_two_stores_in_one_registry(tmp_path, lm, kv_600):
    """Stores of two roots are two label values; two store objects of one root (a
    scheduler's and a worker's) are summed; a bare StoreMetrics takes a given label."""
    ids = kv_600.token_ids
    a = ChunkStore(tmp_path / "a", lm.fingerprint, config="lossless")
    a2 = ChunkStore(tmp_path / "a", lm.fingerprint, config="lossless")
    b = ChunkStore(tmp_path / "b", lm.fingerprint, config="lossless")
    a.put(kv_600)
    a.lookup(ids)
    a2.lookup(ids)
    b.lookup(ids[:300])
    bare = m.StoreMetrics()
    bare.saved("queued")
    registry = prometheus_client.CollectorRegistry()
    for s in (a, a2, b):
        m.register(s, registry)
    m.register(bare, registry, store="bare")
    assert _sample(registry, "kvcodec_lookups_total", store=str(a.root)) == 2
    assert _sample(registry, "kvcodec_hit_tokens_total", store=str(a.root)) == 2 * 512
    assert _sample(registry, "kvcodec_lookups_total", store=str(b.root)) == 1
    assert _sample(registry, "kvcodec_hit_tokens_total", store=str(b.root)) == 0
    assert _sample(registry, "kvcodec_saves_queued_total", store="bare") == 1
    # Another collector of the same names in that registry is refused, not mixed in.
    with pytest.raises(ValueError):
        registry.register(m.StoreCollector())
    assert m.unregister(b, registry)
    assert registry.get_sample_value("kvcodec_lookups_total", {"store": str(b.root)}) is None


def test_metrics_over_http():
    registry = prometheus_client.CollectorRegistry()
    metrics = m.StoreMetrics()
    metrics.lookup(100, 64)
    m.register(metrics, registry, store="s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, _ = m.start_http_server(port, "127.0.0.1", registry=registry)
    try:
        assert m.start_http_server(port, "127.0.0.1", registry=registry)[0] is server
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'kvcodec_hit_tokens_total{store="s"} 64.0' in text
    finally:
        server.shutdown()


def test_interval_gives_what_happened_since_the_last_call():
    metrics = m.StoreMetrics()
    metrics.lookup(10, 5)
    metrics.staged("decode", 0.1)  # before the first interval: counted, not kept raw
    assert metrics.interval() == {"kvcodec_lookups_total": 1,
                                  "kvcodec_lookup_tokens_total": 10,
                                  "kvcodec_hit_tokens_total": 5}
    assert metrics.interval() == {}
    with metrics.bookkeeping():
        metrics.lookup(10, 10)  # a save's check: not a request
    metrics.opened(100, 0.002)
    metrics.failed("timeout")
    metrics.saved("dropped")
    metrics.measured(4096)
    assert metrics.interval() == {
        "kvcodec_entries_read_total": 1, "kvcodec_bytes_read_total": 100,
        "kvcodec_saves_dropped_total": 1, "kvcodec_load_failures_total": {"timeout": 1},
        "kvcodec_load_seconds": {"open": [0.002]}, "kvcodec_store_bytes": 4096}
    assert metrics.snapshot()["kvcodec_lookups_total"] == 1


def test_merge_sums_snapshots():
    a, b = m.StoreMetrics(), m.StoreMetrics()
    a.lookup(10, 5)
    b.lookup(30, 25)
    a.written(100, 0.01)
    b.written(50, 3.0)
    b.measured(150)
    got = m.merge([a.snapshot(), b.snapshot()])
    assert got["kvcodec_lookups_total"] == 2 and got["kvcodec_hit_ratio"] == 0.75
    assert got["kvcodec_bytes_written_total"] == 150 and got["kvcodec_store_bytes"] == 150
    enc = got["kvcodec_encode_seconds"]
    assert enc["count"] == 2 and enc["buckets"]["0.01"] == 1 and enc["buckets"]["5.0"] == 2


def test_precompute_report_has_the_store_metrics(tmp_path, lm, texts):
    from kvcodec.jobs import precompute

    doc = tmp_path / "doc.txt"
    doc.write_text(texts["python_license"][:2000])
    summary = precompute([str(doc)], tmp_path / "store", model=lm, progress=False)
    got = json.loads(summary.to_json())["metrics"]
    assert summary.chunks_new > 0
    assert got["kvcodec_entries_written_total"] == summary.chunks_new
    assert got["kvcodec_bytes_written_total"] == summary.bytes_new
    assert got["kvcodec_encode_seconds"]["count"] == summary.chunks_new
