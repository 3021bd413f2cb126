"""Chunk stores on fsspec URLs: ``memory://``, S3 (a real ``moto_server``), and the local
backend's listing and object helpers."""
import os
import uuid

import fsspec
import pytest
import torch
from kvcodec import evict
from kvcodec.errors import BackendError, ConfigError, KVCodecError, ShapeError
from kvcodec.core.kvcache import KVCache
from kvcodec.store import ChunkStore
from kvcodec.store.remote import FsspecBackend

CONFIG = "default"


def _same(a, b):
    assert a.token_ids == b.token_ids and a.num_layers == b.num_layers
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


@pytest.fixture(scope="module")
def local(tmp_path_factory, lm, kv_600):
    """A local store holding kv_600: the reference every URL store must match."""
    store = ChunkStore(tmp_path_factory.mktemp("local"), lm.fingerprint, CONFIG)
    assert store.put(kv_600) == 3
    return store


def test_memory_store_matches_the_local_store(local, lm, kv_600):
    url = f"memory://kvc-{uuid.uuid4().hex[:8]}/store"
    store = ChunkStore(url, lm.fingerprint, CONFIG)
    try:
        ids = kv_600.token_ids
        assert store.put(kv_600) == 3 and store.put(kv_600) == 0
        locs = store.lookup(ids, partial=True)
        assert locs == [f"{url}/{k[:2]}/{k[2:]}.kvc" for k in local.keys(ids)]
        for loc, path in zip(locs, local.lookup(ids, partial=True)):
            with fsspec.open(loc, "rb") as f:
                assert f.read() == path.read_bytes()  # byte-identical entries
            assert store.exists(loc) and store.size(loc) == path.stat().st_size
        assert sorted(store.entries()) == sorted(locs)
        _same(store.load_prefix(ids), local.load_prefix(ids))
    finally:
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def _fill(store, ids, locs):
    fp = store.fingerprint
    shape = (1, fp["num_kv_heads"], len(locs) * store.chunk_tokens, fp["head_dim"])
    bufs = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(fp["num_layers"])]
    return store.fill(bufs, ids, locs), bufs


def _requests(monkeypatch) -> list:
    """Every existence check (a HEAD) and read (a GET) of an fsspec store's entries:
    ``(method, the entry's name's first 8 characters)``."""
    calls = []
    for name in ("exists", "_fetch"):
        real = getattr(FsspecBackend, name)
        monkeypatch.setattr(FsspecBackend, name, lambda self, rel, *a, _r=real, _n=name:
                            calls.append((_n, rel.rsplit("/", 1)[-1][:8])) or _r(self, rel, *a))
    return calls


def test_a_lookup_that_holds_reads_is_the_loads_only_round_trip(local, lm, kv_600,
                                                                 monkeypatch):
    """``lookup(hold=t)``: an object store's entries from token ``t`` on are looked up
    with GETs whose bytes the following load takes (one round trip per entry, not a HEAD
    and a GET); earlier entries (vLLM computed them already) get a HEAD. The bytes are
    taken once, and a write or removal through the store drops them."""
    url = f"memory://kvc-{uuid.uuid4().hex[:8]}/store"
    store = ChunkStore(url, lm.fingerprint, CONFIG)
    calls = _requests(monkeypatch)
    fs = fsspec.filesystem("memory")
    try:
        ids = kv_600.token_ids
        store.put(kv_600)
        rels = [store._backend.rel(loc) for loc in store.lookup(ids, partial=True)]
        names = [r.rsplit("/", 1)[-1][:8] for r in rels]
        calls.clear()
        locs = store.lookup(ids, partial=True, hold=256)  # the first chunk is vLLM's
        assert sorted(calls) == sorted([("exists", names[0])]
                                       + [("_fetch", n) for n in names[1:]])
        calls.clear()
        assert store.lookup(ids, partial=True, hold=256) == locs and calls == [
            ("exists", names[0])]  # held already: not fetched again
        calls.clear()
        n, bufs = _fill(store, ids, locs)
        assert n == 600 and calls == [("_fetch", names[0])]  # the rest: held bytes
        ref = local.load_prefix(ids)  # whole chunks: 512 tokens
        assert all(torch.equal(k[:, :, :512], r) for (k, _), r in zip(bufs, ref.keys))
        # Taken once: the next load fetches again; the bytes were the store's.
        store.lookup(ids, partial=True, hold=0)
        for rel in rels:  # gone behind the store's back: the held bytes still serve
            fs.rm(f"{url.split('://')[1]}/{rel}")
        assert _fill(store, ids, locs)[0] == 600
        assert _fill(store, ids, locs)[0] == 0  # taken: nothing left to serve
        # A write (a put) and a removal through the store drop what was held.
        store.put(kv_600)
        store.lookup(ids, partial=True, hold=0)
        store._backend.write(rels[0], b"not an entry")
        store._backend.remove(rels[1])
        assert _fill(store, ids, locs)[0] == 0 and fs.exists(
            f"{url.split('://')[1]}/{rels[0]}.bad")  # damage read, not the held bytes
    finally:
        fs.rm(url.split("://")[1].split("/")[0], recursive=True)


def test_transformers_loads_from_an_object_store_in_one_request_per_entry(lm, kv_600,
                                                                          monkeypatch):
    """``cache_from_store`` (and ``prefill_with_store``) looks up and loads in one
    request per entry: the lookup's GETs are the load's reads."""
    from kvcodec.integrations.hf import prefill_with_store

    url = f"memory://kvc-{uuid.uuid4().hex[:8]}/store"
    store = ChunkStore(url, lm.fingerprint, CONFIG)
    try:
        store.put(kv_600)
        calls = _requests(monkeypatch)
        _, n, _ = prefill_with_store(lm, store, kv_600.token_ids)
        assert n == 600 - 64  # the last 64 computed (reuse_end)
        assert sorted(m for m, _ in calls) == ["_fetch"] * 3
        assert len({e for _, e in calls}) == 3
    finally:
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def test_a_lookup_holds_no_more_than_the_bound(lm, kv_600, monkeypatch):
    """Past the held bytes' bound a lookup asks with HEADs, as without holding (a long
    prompt's later entries are fetched once, by the load), and what its reads in flight
    bring past the bound is not kept; the load gets every entry either way."""
    from kvcodec.store.held import HELD

    url = f"memory://kvc-{uuid.uuid4().hex[:8]}/store"
    store = ChunkStore(url, lm.fingerprint, CONFIG)
    try:
        store.put(kv_600)
        ids, fs = kv_600.token_ids, fsspec.filesystem("memory")
        sizes = [fs.size(loc.split("://", 1)[1]) for loc in store.lookup(ids, partial=True)]
        calls = _requests(monkeypatch)
        monkeypatch.setattr(HELD, "max_bytes", HELD.bytes)  # full
        locs = store.lookup(ids, partial=True, hold=0)
        assert sorted(m for m, _ in calls) == ["exists"] * 3
        calls.clear()
        assert _fill(store, ids, locs)[0] == 600 and [m for m, _ in calls] == ["_fetch"] * 3
        calls.clear()
        before = HELD.bytes
        monkeypatch.setattr(HELD, "max_bytes", before + max(sizes))  # room for one entry
        store.lookup(ids, partial=True, hold=0)
        assert len(calls) == 3 and len({e for _, e in calls}) == 3  # one request each
        held = [HELD.has((store.root, store._backend.rel(loc))) for loc in locs]
        assert sum(held) == 1 and before < HELD.bytes <= HELD.max_bytes
        calls.clear()
        assert _fill(store, ids, locs)[0] == 600 and [m for m, _ in calls] == ["_fetch"] * 2
    finally:
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def test_held_reads_are_bounded_and_expire(monkeypatch):
    from kvcodec.store import held

    h = held.HeldReads(max_bytes=10, ttl_s=5.0)
    assert h.put("a", b"1234", "ia") and h.put("b", b"123456", "ib")
    assert h.bytes == 10 and h.has("a") and h.has("b") and not h.room()
    assert not h.put("c", b"12", "ic")  # over the bound: not held, nothing pushed out
    assert not h.has("c") and h.has("a") and h.bytes == 10
    assert h.take("b") == (b"123456", "ib") and h.take("b") is None and h.bytes == 4
    assert h.room() and h.put("a", b"12", "ia2") and h.bytes == 2  # a new read replaces
    now = held.time.monotonic()
    monkeypatch.setattr(held.time, "monotonic", lambda: now + 6)
    assert not h.has("a") and h.take("a") is None and h.bytes == 0  # stale: dropped


def test_a_reads_identity_is_its_size_and_zlibs_crc():
    # The native CRC (faster) gives zlib's value, so an identity held from a lookup and
    # the one a quarantine computes on a second read compare as before, at any length
    # (the native folds 64-byte blocks, then the tail) and offset into the buffer.
    import zlib

    from kvcodec.store.remote import _content_identity

    data = os.urandom(650_000 + 37)
    for n in (0, 1, 63, 64, 65, 4096 + 7, len(data)):
        part = memoryview(data)[len(data) - n:]
        assert _content_identity(part) == ("crc32", n, zlib.crc32(part))



# -- S3 on a real moto server ---------------------------------------------------------


@pytest.fixture
def s3_store(s3_endpoint, lm):
    """A fresh prefix of the bucket per test, and the filesystem to inspect it with."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    store = ChunkStore(f"s3://kvtest/{uuid.uuid4().hex[:8]}", lm.fingerprint, CONFIG,
                       storage_options=options)
    return store, s3fs.S3FileSystem(**options)


def _key(loc):
    return loc.split("://", 1)[1]


def test_s3_round_trip_writes_once_and_leaves_no_temp_objects(s3_store, local, kv_600):
    store, fs = s3_store
    ids = kv_600.token_ids
    assert store.put(kv_600) == 3 and store.put(kv_600) == 0
    assert store.written_chunks == 3 and store.written_numel == kv_600.numel()
    _same(store.load_prefix(ids), local.load_prefix(ids))
    objects = sorted(fs.find(_key(store.root)))
    tables = [o for o in objects if "/tables/" in o]  # the shared tables and "current"
    tails = [o for o in objects if "/tails/" in o]  # the partial last chunk's marker
    entries = [o for o in objects if o not in tables + tails]
    assert entries == sorted(_key(loc) for loc in store.entries())
    assert len(entries) == 3 and all(o.endswith(".kvc") for o in entries)
    assert len(tables) == 2 and not any(".tmp" in o for o in objects)
    assert len(tails) == 1 and tails[0].endswith("/88") and not fs.cat_file(tails[0])


def test_s3_damaged_entries_are_moved_aside_and_rewritten(s3_store, local, kv_600, caplog):
    store, fs = s3_store
    ids = kv_600.token_ids
    store.put(kv_600)
    first, second = (_key(loc) for loc in store.lookup(ids))
    data = fs.cat_file(second)
    fs.pipe_file(second, data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x40])
                 + data[len(data) // 2 + 1:])
    with caplog.at_level("WARNING", logger="kvcodec"):
        assert store.load_prefix(ids).num_tokens == 256  # stops before the damage
    assert "moved it to" in caplog.text
    assert not fs.exists(second) and fs.exists(second + ".bad")
    assert store.put(kv_600) == 1
    _same(store.load_prefix(ids), local.load_prefix(ids))
    fs.pipe_file(first, fs.cat_file(first)[:-100])  # truncated: nothing loads
    assert store.load_prefix(ids) is None and fs.exists(first + ".bad")
    assert store.put(kv_600) == 1
    _same(store.load_prefix(ids), local.load_prefix(ids))
    assert len(list(store.entries())) == 3


def test_s3_evicted_cache_is_one_entry(s3_store, kv_600):
    store, _ = s3_store
    ids = kv_600.token_ids
    ev = evict.evict(kv_600, "knorm", 0.5)
    with pytest.raises(ShapeError, match="put_evicted"):
        store.put(ev)
    assert store.put_evicted(ev, "knorm:0.5") == 1 and store.put_evicted(ev, "knorm:0.5") == 0
    assert store.evicted(ids, "knorm:0.25") is None  # another ratio, another key
    loc = store.evicted(ids, "knorm:0.5")
    assert loc.startswith(store.root) and list(store.entries()) == [loc]
    assert store.written_numel == kv_600.numel()  # the cache before eviction
    with store.open_entry(loc, ids, 0) as f:
        got = f.decode()
    assert got.evicted and got.token_ids == ids
    assert all(torch.equal(a, b) for a, b in zip(got.kept, ev.kept))


# -- the local backend and errors -----------------------------------------------------


def test_local_entries_and_objects(local, kv_600):
    ids = kv_600.token_ids
    assert sorted(local.entries()) == sorted(local.lookup(ids, partial=True))
    (local.root / "ab").mkdir(exist_ok=True)
    (local.root / "ab" / ".x.kvc.123.tmp").write_bytes(b"half")  # a writer's temp file
    local.write_object("manifest/job/doc.json", b"{}")
    assert local.read_object("manifest/job/doc.json") == b"{}"
    assert local.exists_object("manifest/job/doc.json")
    assert local.read_object("manifest/job/other.json") is None
    assert sorted(local.entries()) == sorted(local.lookup(ids, partial=True))
    for bad in ("../x", "/etc/x", local.lookup(ids)[0].relative_to(local.root).as_posix()):
        with pytest.raises(ConfigError):
            local.write_object(bad, b"")


def test_fsspec_filesystems_without_atomic_puts_write_then_rename(tmp_path):
    """sftp, hdfs and the like: a temp name in the same folder, then a rename."""
    backend = FsspecBackend(fsspec.filesystem("file"), str(tmp_path), "x://root")
    moves = []
    mv = backend.fs.mv
    backend.fs.mv = lambda a, b: (moves.append((a, b)), mv(a, b))
    backend.write("ab/cd.kvc", b"data")
    assert moves and moves[0][0].endswith(".tmp") and moves[0][1].endswith("/ab/cd.kvc")
    assert backend.read("ab/cd.kvc") == b"data" and backend.size("ab/cd.kvc") == 4
    assert list(backend.list()) == ["ab/cd.kvc"]
    assert backend.location("ab/cd.kvc") == "x://root/ab/cd.kvc"
    assert backend.quarantine("ab/cd.kvc") == "x://root/ab/cd.kvc.bad"
    assert not backend.exists("ab/cd.kvc") and backend.exists("ab/cd.kvc.bad")
    backend.quarantine("ab/cd.kvc")  # moved already: ignored


def test_unknown_protocols_and_missing_packages_say_what_to_do(lm, monkeypatch):
    with pytest.raises(KVCodecError, match="nosuch://bucket.*Protocol not known"):
        ChunkStore("nosuch://bucket/x", lm.fingerprint)

    def missing(url, **options):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(BackendError, match=r"pip install kvcodec-toolkit\[s3\]"):
        ChunkStore("s3://bucket/x", lm.fingerprint)


def test_a_store_filesystem_failing_with_its_own_errors_raises_oserror(tmp_path, lm,
                                                                        monkeypatch):
    """A remote filesystem's own exceptions (botocore's NoCredentialsError is not an
    OSError) become an OSError naming the store: a job stops on it as on any store it
    cannot reach, and the CLI prints it as one line (it was an uncaught traceback); a
    reader's lookup is a miss."""
    from fsspec.implementations.memory import MemoryFileSystem

    class NoCredentialsError(Exception):
        pass

    def no_credentials(self, *args, **kwargs):
        raise NoCredentialsError("Unable to locate credentials")

    url = f"memory://kv-{uuid.uuid4().hex}"
    store = ChunkStore(url, lm.fingerprint, CONFIG)
    for method in ("info", "cat_file", "pipe_file", "find"):
        monkeypatch.setattr(MemoryFileSystem, method, no_credentials)
    message = rf"store {url}: NoCredentialsError: Unable to locate credentials"
    assert store.lookup(list(range(300))) == []  # a reader's lookup: a logged miss
    with pytest.raises(OSError, match=message):
        store.put(KVCache([torch.zeros(1, 3, 2, 64)] * 30, [torch.zeros(1, 3, 2, 64)] * 30,
                          [1, 2], lm.fingerprint))
    with pytest.raises(OSError, match=message):
        store.read_object("manifest/job/doc.json")
    with pytest.raises(OSError, match=message):
        store.write_object("manifest/job/doc.json", b"{}")
    with pytest.raises(OSError, match=message):
        list(store.entries())


def test_file_urls_are_local_stores(tmp_path, lm):
    store = ChunkStore(f"file://{tmp_path}/s", lm.fingerprint)
    assert store.root == tmp_path / "s" and os.path.isdir(store.root)


def test_a_store_path_that_is_a_file_is_a_config_error(tmp_path, lm):
    """It was mkdir's "File exists" (or "Not a directory" under it), out of every
    command."""
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    (tmp_path / "file").write_text("not a store")
    for root in (tmp_path / "file", tmp_path / "file" / "sub", f"file://{tmp_path}/file"):
        with pytest.raises(ConfigError, match=r"a file \(or under one\), not a directory"):
            ChunkStore(root, lm.fingerprint)
    (tmp_path / "doc.txt").write_text("A document.")
    r = CliRunner().invoke(main, ["precompute", str(tmp_path / "doc.txt"), "--store",
                                  str(tmp_path / "file"), "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("error: store ") and \
        len(r.output.strip().splitlines()) == 1, r.output
    assert (tmp_path / "file").read_text() == "not a store"


def test_sweep_removes_only_stale_temp_files(tmp_path, lm):
    """A writer killed mid-write leaves a temp file: never an entry, removed by the next
    job once it is old enough that no live writer can own it."""
    store = ChunkStore(tmp_path, lm.fingerprint, CONFIG)
    folder = tmp_path / "ab"
    folder.mkdir()
    stale, live = folder / ".cdef.kvc.x1.tmp", folder / ".cdef.kvc.x2.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    assert list(store.entries()) == []
    assert store.sweep(older_than=600) == 1
    assert not stale.exists() and live.exists()
