"""A store as a cache of bounded size: access journals, least-recently-used eviction
after puts, TTL, readers racing eviction (hits or misses, never errors)."""
import os
import random
import threading
import time

import pytest

from kvcodec.core.kvcache import KVCache
from kvcodec.errors import ConfigError
from kvcodec.store import ChunkStore
from kvcodec.store import access, capacity

TOKENS = 16  # one small (partial-chunk) entry per put: cheap to code, 1,000 of them


@pytest.fixture(scope="module")
def small(kv_600):
    return kv_600.slice(0, TOKENS)


def _doc(small, i: int) -> KVCache:
    """Entry ``i``: the same K/V under distinct token ids (so a distinct key)."""
    ids = [100 + i] + [int(t) for t in small.token_ids[1:]]
    return KVCache(small.keys, small.values, ids, small.model)


def _entries(store) -> set:
    return {store._backend.rel(p) for p in store.entries()}


def test_journal_flush_merge_and_compaction(tmp_path):
    from kvcodec.store.backends import open_backend

    b = open_backend(tmp_path)
    a1, a2 = access.AccessLog(b), access.AccessLog(b)
    a1.record("ab/x.kvc", 10.0)
    a1.record("ab/y.kvc", 20.0)
    a2.record("ab/x.kvc", 30.0)
    assert a1.flush() == 2 and a2.flush() == 1 and a1.flush() == 0
    b.write("access/junk.log", b"no-time\nab/z.kvc nan\nab/w.kvc 5\nab/v.kvc inf\n")
    times, names = access.read_all(b)
    assert times == {"ab/x.kvc": 30.0, "ab/y.kvc": 20.0, "ab/w.kvc": 5.0}
    assert len(names) == 3
    access.compact(b, times, names, alive={"ab/x.kvc"})
    times2, names2 = access.read_all(b)
    assert times2 == {"ab/x.kvc": 30.0} and len(names2) == 1


def test_a_journal_that_cannot_be_written_keeps_its_notes(tmp_path, monkeypatch):
    from kvcodec.store.backends import open_backend

    b = open_backend(tmp_path)
    log_ = access.AccessLog(b)
    log_.record("ab/x.kvc", 1.0)

    def full(rel, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(b, "write", full)
    assert log_.flush() == 0 and log_.pending() == {"ab/x.kvc": 1.0}
    monkeypatch.undo()
    assert log_.flush() == 1 and access.read_all(b)[0] == {"ab/x.kvc": 1.0}


def test_policy_is_checked():
    # NaN ttl: no entry ever expired; "abc": a ValueError; infinity: an OverflowError.
    for bad in ({"max_bytes": 0}, {"ttl": -1}, {"low_water": 1.5}, {"ttl": float("nan")},
                {"max_bytes": "abc"}, {"max_bytes": float("inf")}, {"ttl": True}):
        with pytest.raises(ConfigError):
            capacity.Policy(**bad)
    assert capacity.Policy(max_bytes="1e9").max_bytes == 10**9


def test_capped_store_keeps_the_most_recently_used(tmp_path, lm, small):
    """1,000 entries into a store capped at half their size: it stays under the cap, and
    what is left is exactly the most recently used (a scripted order of writes and
    reads)."""
    probe = ChunkStore(tmp_path / "probe", lm.fingerprint, "default")
    probe.put(_doc(small, 0))
    per = next(iter(probe.entries())).stat().st_size
    overhead = sum(size for _, size, _ in probe._backend.scan()) - per  # tables
    cap = overhead + per * 500
    store = ChunkStore(tmp_path / "s", lm.fingerprint, "default", max_bytes=cap)
    used = {}  # rel -> order of last use
    clock = 0
    rng = random.Random(0)
    for i in range(1000):
        doc = _doc(small, i)
        assert store.put(doc) == 1
        rel = store._backend.rel(store.path(store.keys(doc.token_ids)[0]))
        used[rel] = clock = clock + 1
        # Now and then, read a few of the entries written so far (scripted, seeded).
        if i % 50 == 49:
            for j in rng.sample(range(i + 1), 10):
                d = _doc(small, j)
                rel_j = store._backend.rel(store.path(store.keys(d.token_ids)[0]))
                got = store.load_prefix(d.token_ids)  # partial chunk: not a whole one
                locs = store.lookup(d.token_ids, partial=True)
                if locs and store.fill(_bufs(lm, TOKENS), d.token_ids, locs) == TOKENS:
                    used[rel_j] = clock = clock + 1
                assert got is None
        total = sum(size for _, size, _ in store._backend.scan())
        assert total <= cap
    assert store.metrics.snapshot()["kvcodec_evictions_total"] > 0
    left = _entries(store)
    assert 400 <= len(left) <= 500
    ranked = sorted(used, key=used.get, reverse=True)
    assert left == set(ranked[:len(left)]), "eviction kept something older than it removed"


def _bufs(lm, n):
    import torch

    fp = lm.fingerprint
    shape = (1, fp["num_kv_heads"], n, fp["head_dim"])
    return [(torch.empty(shape), torch.empty(shape)) for _ in range(fp["num_layers"])]


def test_readers_racing_eviction_see_hits_or_misses(tmp_path, lm, small):
    """Readers load entries while a writer's puts evict them: every load is whole or a
    miss, nothing raises, no entry is moved aside as damaged."""
    seed = ChunkStore(tmp_path, lm.fingerprint, "default")
    for i in range(40):
        seed.put(_doc(small, i))
    per = max(p.stat().st_size for p in seed.entries())
    writer = ChunkStore(tmp_path, lm.fingerprint, "default", max_bytes=per * 30)
    stop, errors, outcomes = threading.Event(), [], []

    def read(k):
        r = ChunkStore(tmp_path, lm.fingerprint, "default")
        rng = random.Random(k)
        while not stop.is_set():
            d = _doc(small, rng.randrange(0, 120))
            try:
                locs = r.lookup(d.token_ids, partial=True)
                n = r.fill(_bufs(lm, TOKENS), d.token_ids, locs) if locs else 0
                assert n in (0, TOKENS)
                outcomes.append(n)
            except Exception as exc:  # noqa: BLE001 - the test's point
                errors.append(exc)
    readers = [threading.Thread(target=read, args=(k,)) for k in range(3)]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 20
        for i in range(40, 120):
            writer.put(_doc(small, i))
            if time.monotonic() > deadline:
                break
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    assert not errors, errors[:3]
    assert TOKENS in outcomes and 0 in outcomes
    assert writer.metrics.snapshot()["kvcodec_evictions_total"] > 0
    assert not [r for r, _, _ in writer._backend.scan() if r.endswith(".bad")]


def test_ttl_and_bad_files(tmp_path, lm, small):
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    for i in range(6):
        store.put(_doc(small, i))
    rels = sorted(_entries(store))
    old = time.time() - 3600
    for rel in rels[:4]:
        os.utime(tmp_path / rel, (old, old))
    store.access.record(rels[0])  # read now: not expired
    (tmp_path / (rels[5] + ".bad")).write_bytes(b"x" * 10)
    report = store.evict(dry_run=True)
    assert report.removed == []  # no policy: nothing to do
    timed = ChunkStore(tmp_path, lm.fingerprint, "default", ttl=600)
    timed.access.record(rels[0])
    report = timed.evict()
    assert report.expired == 3 and set(report.removed) == set(rels[1:4])
    ages = report.to_dict()["removed_age_s"]
    assert 3590 < ages["min"] <= ages["max"] < 3700  # unused for an hour
    assert _entries(timed) == {rels[0], rels[4], rels[5]}
    assert (tmp_path / (rels[5] + ".bad")).exists()  # under no cap: left for gc


def test_object_store_eviction(lm, small):
    import uuid

    url = f"memory://cap-{uuid.uuid4().hex[:8]}"
    store = ChunkStore(url, lm.fingerprint, "default")
    for i in range(10):
        store.put(_doc(small, i))
    total = sum(size for _, size, _ in store._backend.scan())
    per = max(size for r, size, _ in store._backend.scan() if r.endswith(".kvc"))
    capped = ChunkStore(url, lm.fingerprint, "default", max_bytes=total - 3 * per)
    capped.put(_doc(small, 10))
    assert sum(size for _, size, _ in capped._backend.scan()) <= total - 3 * per
    assert len(_entries(capped)) < 11


def test_salted_views_share_the_cap_and_manifests_stay(tmp_path, lm, small):
    """Puts through tenants' views (as the vLLM worker saves) count toward one cap;
    eviction removes entries only: a job's manifest and the shared tables stay."""
    probe = ChunkStore(tmp_path / "probe", lm.fingerprint, "default")
    probe.put(_doc(small, 0))
    per = next(iter(probe.entries())).stat().st_size
    tables = sum(size for _, size, _ in probe._backend.scan()) - per
    cap = 3 * tables + per * 12 + 1024  # each tenant has its own tables; the manifest
    store = ChunkStore(tmp_path / "s", lm.fingerprint, "default", max_bytes=cap)
    store.write_object("manifest/job/doc.json", b"{}")
    for i in range(30):
        store.with_salt(f"tenant-{i % 3}").put(_doc(small, i))
        total = sum(size for _, size, _ in store._backend.scan())
        assert total <= cap
    objects = {rel for rel, _, _ in store._backend.scan()}
    assert "manifest/job/doc.json" in objects
    assert any(rel.startswith("tables/") for rel in objects)
    assert store.metrics.snapshot()["kvcodec_evictions_total"] >= 15
