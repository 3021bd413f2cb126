"""A store under faults: only proven damage moves an entry aside, only the bytes that
failed move, entries are readable by other users, tenants' salts separate keys, and
nothing a store holds makes a reader allocate more than an entry of its tokens needs."""
import errno
import io
import os
import stat
import uuid

import pytest
import torch

import kvcodec
from kvcodec.errors import AccessError, CorruptError, KVCodecError, VersionError
from kvcodec.format.container import StreamBuffer, atomic_write
from kvcodec.store import ChunkStore, is_damage


@pytest.fixture
def filled(tmp_path, lm, kv_600):
    store = ChunkStore(tmp_path / "store", lm.fingerprint, "default")
    store.put(kv_600)
    return store, kv_600.token_ids, store.lookup(kv_600.token_ids)


def _refusing(monkeypatch, err: int):
    """Every open of an entry fails with ``err`` (as it would with too many open files,
    a permission, a dying disk), through whichever ``open`` the reader calls."""
    real_open = open

    def fake(path, *a, **k):
        if str(path).endswith(".kvc"):
            raise OSError(err, os.strerror(err))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake)
    monkeypatch.setattr("io.open", fake)


@pytest.mark.parametrize("err", [errno.EMFILE, errno.EACCES, errno.EIO])
def test_environment_errors_leave_entries_in_place(filled, monkeypatch, caplog, err):
    store, ids, paths = filled
    with monkeypatch.context() as m:
        _refusing(m, err)
        with caplog.at_level("WARNING", logger="kvcodec"):
            assert store.load_prefix(ids) is None  # a miss, not an error
    assert all(p.exists() for p in paths), "a good entry was moved aside"
    assert not list(store.root.rglob("*.bad"))
    assert os.strerror(err) in caplog.text and "left in place" in caplog.text
    assert store.load_prefix(ids).num_tokens == 512  # the store works again


def test_damage_is_what_the_bytes_prove():
    assert is_damage(CorruptError("crc")) and is_damage(kvcodec.TruncatedError("short"))
    assert is_damage(kvcodec.FormatError("bad magic"))
    assert not is_damage(VersionError("version 9"))  # a newer writer's entry
    assert not is_damage(OSError(errno.EIO, "I/O error"))
    assert not is_damage(AccessError(errno.EMFILE, "too many"))
    assert not is_damage(KVCodecError("no backend"))
    assert isinstance(AccessError(errno.EMFILE, "x"), OSError)
    assert AccessError(errno.EMFILE, "x").errno == errno.EMFILE


def test_a_newer_format_version_is_left_in_place(filled):
    store, ids, paths = filled
    data = bytearray(paths[1].read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    paths[1].write_bytes(bytes(data))
    assert store.load_prefix(ids).num_tokens == 256
    assert paths[1].exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_entries_follow_the_umask(tmp_path, lm, kv_600, umask):
    """A store filled by one user is read by another: entries get 0666 less the umask,
    as any file the process creates (before: 0600, from mkstemp)."""
    old = os.umask(umask)
    try:
        store = ChunkStore(tmp_path, lm.fingerprint, "default")
        store.put(kv_600)
        atomic_write(tmp_path / "plain.bin", b"x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for p in list(store.entries()) + [tmp_path / "plain.bin"]:
        assert stat.S_IMODE(p.stat().st_mode) == want, oct(p.stat().st_mode)


def test_quarantine_moves_only_the_bytes_that_failed(filled, monkeypatch):
    """A reader finds an entry damaged; before it moves it aside, a writer puts a good
    one in its place. The good one stays (before: moved aside by name)."""
    from kvcodec.store import chunks as chunks_mod

    store, ids, paths = filled
    good = paths[1].read_bytes()
    damaged = bytearray(good)
    damaged[30] ^= 0xFF  # the header: its checksum fails when it is opened
    paths[1].write_bytes(bytes(damaged))
    real_open = chunks_mod.kvc.open

    def racing_open(source, **kw):
        try:
            return real_open(source, **kw)
        except CorruptError:
            atomic_write(paths[1], good)  # the writer, between the read and the move
            raise

    monkeypatch.setattr(chunks_mod.kvc, "open", racing_open)
    assert store.load_prefix(ids).num_tokens == 256  # this read failed at the damage
    monkeypatch.undo()
    assert paths[1].read_bytes() == good, "the writer's good entry was moved aside"
    assert not paths[1].with_name(paths[1].name + ".bad").exists()
    assert store.load_prefix(ids).num_tokens == 512
    assert not [p for p in store.root.rglob(".*") if p.is_file()]  # nothing held behind


def test_quarantine_by_identity_moves_the_damaged_bytes(filled):
    store, ids, paths = filled
    data = bytearray(paths[0].read_bytes())
    data[-100] ^= 0xFF  # the payload: found when it decodes
    paths[0].write_bytes(bytes(data))
    f = store.open_entry(paths[0], ids[:256], 0)
    with f, pytest.raises(CorruptError):
        f.decode()
    assert store.quarantine(paths[0], CorruptError("crc"), f.identity)
    assert not paths[0].exists() and paths[0].with_name(paths[0].name + ".bad").exists()
    # Nothing there any more: nothing moved, no error.
    assert not store.quarantine(paths[0], CorruptError("crc"), f.identity)


@pytest.fixture
def remote(lm, kv_600):
    """A memory:// store holding kv_600, and the first chunk's location."""
    import fsspec

    url = f"memory://kvc-{uuid.uuid4().hex[:8]}/store"
    store = ChunkStore(url, lm.fingerprint, "default")
    store.put(kv_600)
    yield store, store.lookup(kv_600.token_ids)
    fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def _record(monkeypatch, fs, *methods):
    """Every call of ``methods`` of ``fs``: (method, args, kwargs)."""
    calls = []
    for name in methods:
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda *a, _n=name, _r=real, **k:
                            calls.append((_n, a, k)) or _r(*a, **k))
    return calls


def test_an_object_larger_than_its_tokens_need_is_read_no_further(remote, kv_600, monkeypatch):
    store, locs = remote
    loc, limit = locs[0], store.entry_limit(256)
    store._backend.fs.pipe_file(loc.split("://", 1)[1], b"\0" * (10 * limit))
    calls = _record(monkeypatch, store._backend.fs, "cat_file", "info")
    with pytest.raises(CorruptError, match="more than"):
        store.open_entry(loc, kv_600.token_ids[:256], 0)
    reads = [k for n, _, k in calls if n == "cat_file"]
    assert reads and all(k.get("end") == limit + 1 for k in reads), calls
    assert store.exists(loc + ".bad")  # damage: moved aside


def _refuse_ranges(monkeypatch, fs) -> None:
    """``fs`` answers every ranged read as S3 answers one of an empty object (416)."""
    real = fs.cat_file

    def refusing(path, start=None, end=None, **k):
        if start is not None:
            raise OSError(errno.EINVAL, "The requested range is not satisfiable")
        return real(path, **k)
    monkeypatch.setattr(fs, "cat_file", refusing)


def test_a_holding_lookup_finds_an_oversized_object_and_its_load_moves_it(remote, kv_600,
                                                                          monkeypatch):
    """A lookup that holds its GETs' bytes (``hold``) of an object larger than an entry
    can be, on a store that refuses the range (its size asked, then refused): the entry
    is there (not an error of the lookup), and the load finds the damage and moves it."""
    store, locs = remote
    loc, fs = locs[0], store._backend.fs
    fs.pipe_file(loc.split("://", 1)[1], b"\0" * (10 * store.entry_limit(256)))
    _refuse_ranges(monkeypatch, fs)
    assert store.lookup(kv_600.token_ids, hold=0) == locs
    assert store.load_prefix(kv_600.token_ids) is None
    assert store.exists(loc + ".bad") and not store.exists(loc)


def test_a_remote_entry_is_one_request(remote, kv_600, monkeypatch):
    """One ranged GET per entry: asking the size first cost a round trip per entry."""
    store, locs = remote
    with store.open_entry(locs[0], kv_600.token_ids[:256], 0) as f:
        want = f.decode()
    calls = _record(monkeypatch, store._backend.fs, "cat_file", "info", "size")
    with store.open_entry(locs[0], kv_600.token_ids[:256], 0) as f:
        got = f.decode()
    assert [n for n, _, _ in calls] == ["cat_file"]
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values,
                                                 want.keys + want.values))


def test_a_store_that_refuses_the_range_is_asked_the_size(remote, kv_600, monkeypatch):
    """S3 answers an empty object's range with 416: the size, then the bytes."""
    store, locs = remote
    loc, fs = locs[0], store._backend.fs
    _refuse_ranges(monkeypatch, fs)
    with store.open_entry(loc, kv_600.token_ids[:256], 0) as f:
        assert f.num_tokens == 256
    fs.pipe_file(loc.split("://", 1)[1], b"")  # empty: damage, found and moved aside
    with pytest.raises(KVCodecError):
        store.open_entry(loc, kv_600.token_ids[:256], 0)
    assert store.exists(loc + ".bad") and not store.exists(loc)


def test_a_remote_quarantine_moves_only_the_bytes_that_failed(remote, kv_600):
    """The identity of a GET's bytes is their CRC and size: an object a writer has
    replaced since the read stays; the same bytes move aside."""
    store, locs = remote
    loc, fs = locs[1], store._backend.fs
    key = loc.split("://", 1)[1]
    good = fs.cat_file(key)
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    fs.pipe_file(key, bytes(bad))
    f = store.open_entry(loc, kv_600.token_ids[256:512], 256)
    with f, pytest.raises(CorruptError):
        f.decode()
    fs.pipe_file(key, good)  # a writer, between the read and the move
    assert not store.quarantine(loc, CorruptError("crc"), f.identity)
    assert fs.cat_file(key) == good and not store.exists(loc + ".bad")
    fs.pipe_file(key, bytes(bad))  # the damaged bytes again: they move
    assert store.quarantine(loc, CorruptError("crc"), f.identity)
    assert not store.exists(loc) and fs.cat_file(key + ".bad") == bytes(bad)


def test_salts_separate_keys(tmp_path, lm, kv_600):
    ids = kv_600.token_ids
    plain = ChunkStore(tmp_path, lm.fingerprint, "default")
    a = ChunkStore(tmp_path, lm.fingerprint, "default", salt="a")
    assert a.put(kv_600) == 3
    assert a.cached_tokens(ids) == 512
    assert plain.cached_tokens(ids) == 0 and plain.with_salt("b").cached_tokens(ids) == 0
    assert plain.with_salt("a").keys(ids) == a.keys(ids)
    assert a.with_salt(None).keys(ids) == plain.keys(ids)
    assert not set(a.keys(ids)) & set(plain.keys(ids))
    # Unsalted keys are what they were: stores filled before salts existed still hit.
    assert plain.keys(ids)[0] == ChunkStore(tmp_path, lm.fingerprint, "default",
                                            salt=None).keys(ids)[0]


def test_a_stream_is_read_in_bounded_pieces():
    """A header the peer wrote claims a terabyte: the reader asks the stream for at most
    1 MiB at a time (a buffered reader allocates what it is asked for)."""
    asked = []

    class Peer(io.RawIOBase):
        def readable(self):
            return True

        def read(self, n=-1):
            asked.append(n)
            return b"\0" * min(n, 4096) if len(asked) < 50 else b""

    buf = StreamBuffer(Peer())
    buf.fill_to(1 << 40)
    assert max(asked) <= 1 << 20


def test_s3_quarantine_checks_the_etag(s3_endpoint, lm, kv_600):
    """On S3 the damaged object moves aside by its ETag: a newer object a writer put
    under the name since it was read stays."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    store = ChunkStore(f"s3://kvtest/{uuid.uuid4().hex[:8]}", lm.fingerprint, "default",
                       storage_options=options)
    fs = s3fs.S3FileSystem(**options)
    store.put(kv_600)
    locs = store.lookup(kv_600.token_ids)
    key = locs[1].split("://", 1)[1]
    good = fs.cat_file(key)
    fs.pipe_file(key, good[:-10])  # damaged
    _, identity = store._backend.fetch(store._backend.rel(locs[1]), 1 << 30)
    fs.pipe_file(key, good)  # a writer's good object lands before the reader moves it
    assert not store.quarantine(locs[1], CorruptError("truncated"), identity)
    assert fs.cat_file(key) == good and not fs.exists(key + ".bad")
    # The damaged object itself does move.
    fs.pipe_file(key, good[:-10])
    assert store.load_prefix(kv_600.token_ids).num_tokens == 256
    fs.invalidate_cache()
    assert fs.exists(key + ".bad") and not fs.exists(key)


def test_a_store_that_cannot_answer_is_a_miss(filled, monkeypatch, caplog):
    """A lookup that fails (no network, a permission on a folder) is a miss with a
    warning, not an error in the caller (the vLLM scheduler, a loader)."""
    from kvcodec.store import backends

    store, ids, paths = filled

    def down(self, rel):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(backends.LocalBackend, "exists", down)
    with caplog.at_level("WARNING", logger="kvcodec"):
        assert store.lookup(ids) == [] and store.cached_tokens(ids) == 0
        assert store.load_prefix(ids) is None
    assert "Network is unreachable" in caplog.text


def test_precompute_salt_writes_the_tenants_keys(tmp_path, lm, texts):
    """``precompute --salt`` (or $KVCODEC_SALT) stores under the tenant's keys: hits for
    that salt, misses for the unsalted store and for other salts; an unsalted run of the
    same corpus is another job (it does not skip the salted one's documents)."""
    from click.testing import CliRunner

    from kvcodec.models import document_ids
    from kvcodec_cli.main import main

    doc = tmp_path / "doc.txt"
    doc.write_text(texts["python_license"][:2500])
    store = tmp_path / "store"
    run = CliRunner().invoke(main, ["precompute", "--store", str(store), "--no-progress",
                                    str(doc)], env={"KVCODEC_SALT": "tenant-a"})
    assert run.exit_code == 0, run.output
    ids = document_ids(lm.tokenizer, doc.read_text())
    salted = ChunkStore(store, lm.fingerprint, "default", salt="tenant-a")
    n = salted.cached_tokens(ids)
    assert n >= 256
    assert salted.with_salt(None).cached_tokens(ids) == 0
    assert salted.with_salt("tenant-b").cached_tokens(ids) == 0
    run = CliRunner().invoke(main, ["precompute", "--store", str(store), "--no-progress",
                                    str(doc)], env={"KVCODEC_SALT": None})
    assert run.exit_code == 0, run.output
    assert salted.with_salt(None).cached_tokens(ids) == n
    assert "tenant-a" not in run.output


def test_a_fifo_in_place_of_an_entry_is_a_miss_that_stays(filled, caplog):
    """A FIFO where an entry belongs blocked the reader's open until a writer came (a
    vLLM worker's load hung for good). It is no entry (a miss, with a warning) and is
    not proven damage (it stays where it is); the entries before it load."""
    import threading

    from click.testing import CliRunner

    from kvcodec_cli.main import main

    store, ids, paths = filled
    os.replace(paths[1], str(paths[1]) + ".away")
    os.mkfifo(paths[1])

    def unblocked(call):
        got = []
        reader = threading.Thread(target=lambda: got.append(call()))
        reader.start()
        reader.join(60)
        hung = reader.is_alive()
        if hung:  # let it go: a writer that opens and closes gives it end of file
            os.close(os.open(paths[1], os.O_WRONLY))
            reader.join()
        assert not hung, "the reader blocked on the FIFO"
        return got[0]

    with caplog.at_level("WARNING", logger="kvcodec"):
        got = unblocked(lambda: store.load_prefix(ids))
    assert got.num_tokens == 256  # the first entry; the FIFO's is a miss
    assert "not a regular file" in caplog.text
    verify = unblocked(lambda: CliRunner().invoke(main, ["store", "verify", str(store.root)]))
    assert verify.exit_code != 0 and "not a regular file" in verify.output, verify.output
    assert stat.S_ISFIFO(os.stat(paths[1]).st_mode) and not list(store.root.rglob("*.bad"))
