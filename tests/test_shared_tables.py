"""Shared probability tables (format v6) and many entries decoded as one plan: entries
coded with their store's tables decode bit for bit like entries with their own, carry
no tables, and a prefix of them decodes in one native call; damaged or missing tables
are damage of the entries that use them, environment errors are not; a damaged entry in
the middle of a plan lets the earlier ones land and stops its own group only."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import kvcodec
from kvcodec.core.kvcache import token_views
from kvcodec.errors import CorruptError, FormatError
from kvcodec.format import Encoder, container
from kvcodec.format.table_cache import TABLES
from kvcodec.format.shared import SharedTables
from kvcodec.store import ChunkStore
from kvcodec.store.batch import Entry, decode_entries

from test_hostile import rebuild


@pytest.fixture
def filled(tmp_path, lm, kv_1536):
    store = ChunkStore(tmp_path / "store", lm.fingerprint, "default")
    store.put(kv_1536)
    return store, kv_1536.token_ids, store.lookup(kv_1536.token_ids)


def _tables_objects(store):
    return sorted(p for p in (store.root / "tables").rglob("*") if p.is_file())


def test_entries_use_the_store_tables_and_decode_bit_for_bit(lm, kv_1536):
    enc = Encoder("default", lm.fingerprint)
    shared = enc.shared_tables(kv_1536)
    for t0 in (0, 512, 1280):
        part = kv_1536.slice(t0, t0 + 256)
        own = enc.encode(part, position_offset=t0)
        mine = enc.encode(part, position_offset=t0, tables=shared)
        assert container.PREAMBLE.unpack_from(mine)[1] == 6 and len(mine) < len(own)
        with kvcodec.open(mine, tables={shared.digest: shared}.__getitem__) as f:
            assert f.shared_tables == shared.digest
            assert f.sections.read_item(0, 0)  # the payload is there; the tables are not
            got = f.decode()
        ref = kvcodec.decode(own)
        for a, b in zip(got.keys + got.values, ref.keys + ref.values):
            assert torch.equal(a, b)
    # Without its store, an entry says where its tables are (one clear error).
    with kvcodec.open(mine) as f, pytest.raises(FormatError, match="through its store"):
        f.decode()


def test_the_serialized_tables_are_checked(lm, kv_600):
    shared = Encoder("default", lm.fingerprint).shared_tables(kv_600)
    again = SharedTables.from_bytes(shared.data, 10 ** 6)
    assert again.digest == shared.digest and again.layout == shared.layout
    assert all(np.array_equal(a, b) for a, b in zip(again.freqs, shared.freqs))
    bad = bytearray(shared.data)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(CorruptError, match="checksum"):
        SharedTables.from_bytes(bytes(bad), 10 ** 6)
    with pytest.raises(CorruptError, match="out of bounds"):  # more rows than allowed
        SharedTables.from_bytes(shared.data, 10)
    with pytest.raises(CorruptError):
        SharedTables.from_bytes(b"KVCTAB1\n" + struct.pack("<I", 1 << 30) + b"x" * 8, 10 ** 6)


def test_a_header_claiming_shared_tables_outside_v6_is_refused(lm, kv_600):
    enc = Encoder("default", lm.fingerprint)
    shared = enc.shared_tables(kv_600)
    data = enc.encode(kv_600.slice(0, 256), tables=shared)
    with pytest.raises(CorruptError, match="shared_tables"):
        kvcodec.open(rebuild(data, version=5))
    with pytest.raises(CorruptError, match="shared_tables"):
        kvcodec.open(rebuild(data, header_update={"shared_tables": "../x"}))


def test_a_prefix_of_shared_entries_loads_as_one_plan(filled, lm):
    store, ids, locs = filled
    assert len(locs) == 6 and len(_tables_objects(store)) == 2  # tables + current
    for loc in locs:
        with kvcodec.open(loc.read_bytes(), tables=store.shared_tables) as f:
            assert f.shared_tables is not None
    TABLES.clear()
    kv = store.load_prefix(ids)
    assert kv.num_tokens == 1536 and TABLES.misses == 1  # built once for six entries
    # Bit for bit what decoding each entry on its own gives.
    for i, loc in enumerate(locs):
        with store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256) as f:
            one = f.decode()
        for l in (0, 17, 29):
            assert torch.equal(kv.keys[l][:, :, i * 256:(i + 1) * 256], one.keys[l])
            assert torch.equal(kv.values[l][:, :, i * 256:(i + 1) * 256], one.values[l])


def _entry_failing_in_the_decoder(data: bytes) -> bytes:
    """``data`` with one blob scrambled and its checksum fixed: only the rANS decoder
    can tell."""
    with kvcodec.open(data) as f:
        payload = bytearray(f.source.read_section("payload"))
        idx = f.sections.index().copy()
        n = len(f.meta.streams)
    i = n * 0 + 9  # chunk 0, a stream in the middle
    start = int(idx["off"][i]) + int(idx["side"][i])
    end = start + int(idx["blob"][i])
    payload[start + 16:end - 16] = bytes(np.random.default_rng(0).integers(
        0, 256, end - start - 32, dtype=np.uint8))
    item = payload[int(idx["off"][i]):end]
    idx["crc"][i] = container.crc32(bytes(item))
    return rebuild(data, replace={"payload": bytes(payload), "index": idx.tobytes()})


def _damaged(data: bytes, where: str) -> bytes:
    """``data`` damaged where its checksum tells (``checksum``) or where only the rANS
    decoder can (``decoder``)."""
    if where == "decoder":
        return _entry_failing_in_the_decoder(data)
    bad = bytearray(data)
    bad[len(bad) - 1000] ^= 0x40
    return bytes(bad)


@pytest.mark.parametrize("where", ["checksum", "decoder"])
def test_a_damaged_entry_in_the_middle_of_a_plan(filled, lm, kv_1536, caplog, where):
    store, ids, locs = filled
    bad = _damaged(locs[2].read_bytes(), where)
    locs[2].write_bytes(bad)
    fp = lm.fingerprint
    shape = (1, fp["num_kv_heads"], 1536, fp["head_dim"])
    # Two requests' prefixes in one plan: the damage stops only its own.
    bufs = [[(torch.zeros(shape), torch.zeros(shape)) for _ in range(fp["num_layers"])]
            for _ in range(2)]
    files = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
             for i, loc in enumerate(locs)]
    other = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
             for i, loc in enumerate(locs[:2])]
    entries = ([Entry(f, locs[i], token_views(bufs[0], i * 256, (i + 1) * 256), "a")
                for i, f in enumerate(files)]
               + [Entry(f, locs[i], token_views(bufs[1], i * 256, (i + 1) * 256), "b")
                  for i, f in enumerate(other)])
    with caplog.at_level("WARNING", logger="kvcodec"):
        ok = decode_entries(store, entries, threads=2)
    assert ok == [True, True, False, False, False, False, True, True]
    assert "moved it to" in caplog.text and not locs[2].exists()
    assert locs[2].with_name(locs[2].name + ".bad").read_bytes() == bad
    ref = store.load_prefix(ids)
    assert ref.num_tokens == 512
    for l in (0, 29):
        assert torch.equal(bufs[0][l][0][:, :, :512], ref.keys[l])
        assert torch.equal(bufs[1][l][1][:, :, :512], ref.values[l])
    for f in files + other:
        f.close()
    assert store.put(kv_1536) == 1  # written again; those after it were not damaged


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_or_missing_tables_are_damage_of_their_entries(filled, lm, kv_1536, damage,
                                                               caplog):
    store, ids, locs = filled
    digest = store.read_object(f"tables/{store.seed_hex[:40]}/current").decode()
    obj = store.root / "tables" / store.seed_hex[:40] / f"{digest}.kvt"
    if damage == "flip":
        data = bytearray(obj.read_bytes())
        data[100] ^= 1
        obj.write_bytes(bytes(data))
    else:
        obj.unlink()
    TABLES.clear()
    fresh = ChunkStore(store.root, lm.fingerprint, "default")  # a reader with no tables cached
    with caplog.at_level("WARNING", logger="kvcodec"):
        assert fresh.load_prefix(ids) is None
    assert not locs[0].exists() and locs[0].with_name(locs[0].name + ".bad").exists()
    if damage == "flip":
        assert not obj.exists() and obj.with_name(obj.name + ".bad").exists()
    # The next put builds the tables again (from the same text: the same bytes) and
    # writes the entry again; it loads.
    assert fresh.put(kv_1536) >= 1
    assert obj.exists() and fresh.read_object(
        f"tables/{store.seed_hex[:40]}/current").decode() == digest
    assert fresh.load_prefix(ids[:256]).num_tokens == 256


def test_an_environment_error_on_the_tables_is_a_miss_not_damage(filled, lm, monkeypatch):
    store, ids, locs = filled
    TABLES.clear()
    fresh = ChunkStore(store.root, lm.fingerprint, "default")
    real = fresh.read_object

    def failing(rel, *args):
        if rel.startswith("tables/"):
            raise OSError(24, "Too many open files")
        return real(rel, *args)
    monkeypatch.setattr(fresh, "read_object", failing)
    assert fresh.load_prefix(ids) is None
    assert all(loc.exists() for loc in locs)  # nothing moved
    monkeypatch.setattr(fresh, "read_object", real)
    assert fresh.load_prefix(ids).num_tokens == 1536


def test_entries_the_tables_do_not_fit_carry_their_own(tmp_path, lm, kv_600):
    store = ChunkStore(tmp_path / "s", lm.fingerprint, "default")
    store.put(kv_600)
    def spiky(x):  # one channel per head swinging far past what real K/V do
        y = torch.zeros_like(x)
        y[:, :, :, 0] = 100.0 * (torch.arange(x.shape[2]) % 2 * 2 - 1)
        return y
    noise = kvcodec.KVCache([spiky(k) for k in kv_600.keys], [spiky(v) for v in kv_600.values],
                            [t + 1 for t in kv_600.token_ids], kv_600.model)
    assert store.put(noise) == 3
    versions = set()
    for loc in store.lookup(noise.token_ids, partial=True):
        with kvcodec.open(loc.read_bytes(), tables=store.shared_tables) as f:
            versions.add((f.source.version, f.shared_tables is None))
    assert all(v < 6 and own for v, own in versions)  # own tables: v3 (or v5, centered)
    got = store.load_prefix(noise.token_ids)
    assert got.num_tokens == 512


def test_put_from_token_never_reads_what_lies_before(tmp_path, lm, kv_600):
    """What the vLLM worker saves: only the chunks from the first one the store lacks,
    the K/V before it being placeholders (here NaN) that nothing reads."""
    store = ChunkStore(tmp_path / "s", lm.fingerprint, "default")
    ref = ChunkStore(tmp_path / "r", lm.fingerprint, "default")
    ref.put(kv_600)
    holed = kvcodec.KVCache([k.clone() for k in kv_600.keys], [v.clone() for v in kv_600.values],
                            kv_600.token_ids, kv_600.model, importance=kv_600.importance)
    for t in holed.keys + holed.values:
        t[:, :, :256] = float("nan")
    assert store.put(holed, from_token=256) == 2  # the second chunk and the partial third
    ids = kv_600.token_ids
    assert store.cached_tokens(ids, partial=True) == 0  # the first chunk is not there
    with pytest.raises(kvcodec.errors.ShapeError):
        store.put(holed, from_token=100)
    for i in (1, 2):
        t0, t1 = 256 * i, min(600, 256 * (i + 1))
        loc, rloc = store.path(store.keys(ids)[i]), ref.path(ref.keys(ids)[i])
        with store.open_entry(loc, ids[t0:t1], t0) as f, ref.open_entry(rloc, ids[t0:t1], t0) as g:
            a, b = f.decode(), g.decode()
        assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))



def test_put_of_a_tail_after_a_prefix_writes_what_put_from_token_writes(tmp_path, lm, kv_600):
    """What the vLLM worker saves since it copies only the tokens the store lacks: a
    cache of the last tokens, keyed after ``prefix``, stores the same entries, byte for
    byte, and the same partial chunk's marker, as ``put(from_token=...)`` of the whole."""
    a = ChunkStore(tmp_path / "a", lm.fingerprint, "default")
    b = ChunkStore(tmp_path / "b", lm.fingerprint, "default")
    ids = kv_600.token_ids
    tail = kv_600.slice(256, 600)  # the cache of tokens 256.. (their ids: ids[256:])
    assert a.put(tail, prefix=ids[:256]) == 2
    assert b.put(kv_600, from_token=256) == 2
    files = lambda s: {p.relative_to(s.root): p.read_bytes()  # noqa: E731
                       for p in Path(s.root).rglob("*") if p.is_file()}
    assert files(a) == files(b) and len(files(a)) > 2  # entries, tables, the marker
    assert a.cached_tokens(ids, partial=True) == 0  # the first chunk is not there
    assert a.put(kv_600) == 1 and a.cached_tokens(ids, partial=True) == 600
    with pytest.raises(kvcodec.errors.ShapeError):
        a.put(tail, prefix=ids[:100])

def test_the_cli_on_an_entry_coded_with_shared_tables(filled, tmp_path):
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    store, _, locs = filled
    digest = store.read_object(f"tables/{store.seed_hex[:40]}/current").decode()
    r = CliRunner().invoke(main, ["inspect", str(locs[0])])
    assert r.exit_code == 0 and "format v6" in r.output and digest in r.output
    r = CliRunner().invoke(main, ["decode", str(locs[0]), "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "through its store" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("config", ["default", "model-free"])
def test_a_prefix_decodes_as_one_file_bit_for_bit(tmp_path, lm, kv_1536, monkeypatch, config):
    """Consecutive entries with one set of shared tables are planned as one file (a job
    and a target per stream, :mod:`kvcodec.format.stacked`): the same bits as decoding
    each entry alone, with each entry's own centering offsets (the model-free default
    centers keys) and its own fp16 first row, rotated at its position."""
    import kvcodec.store.batch as batch

    cfg = kvcodec.load_config("default") if config == "model-free" else "default"
    store = ChunkStore(tmp_path / "store", lm.fingerprint, cfg)
    store.put(kv_1536)
    ids, locs = kv_1536.token_ids, store.lookup(kv_1536.token_ids)
    stacked, real = [], batch.plan_stack
    monkeypatch.setattr(batch, "plan_stack", lambda *a: stacked.append(real(*a)) or stacked[-1])
    kv = store.load_prefix(ids)
    assert kv.num_tokens == 1536 and len(stacked) == 1 and stacked[0] is not None
    assert len(stacked[0].targets) == 2 * kv.num_layers  # not one per entry and stream
    with store.open_entry(locs[1], ids[256:512], 256) as f:
        centered = f.meta.quant[(0, "key")].center
    assert centered == (config == "model-free")
    for i, loc in enumerate(locs):
        with store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256) as f:
            one = f.decode()
        for l in range(kv.num_layers):
            assert torch.equal(kv.keys[l][:, :, i * 256:(i + 1) * 256], one.keys[l])
            assert torch.equal(kv.values[l][:, :, i * 256:(i + 1) * 256], one.values[l])


def test_a_stacked_prefix_decodes_alike_on_every_path(tmp_path, lm, kv_600):
    """Entries loaded as one stacked plan, the decoder writing each entry's fp16 first
    row (rotated at its position, without the entry's offsets), decode the bits of each
    entry decoded alone, on every CPU path, into float32 and into bfloat16."""
    from conftest import stacks_alike_on_every_path

    store = ChunkStore(tmp_path / "s", lm.fingerprint, kvcodec.load_config("default"))
    assert store.put(kv_600) == 3
    ids, locs = kv_600.token_ids, store.lookup(kv_600.token_ids, partial=True)
    files = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
             for i, loc in enumerate(locs)]
    assert len(files) == 3 and sum(f.num_tokens for f in files) == 600
    assert files[0].meta.sink_tokens
    assert files[0].meta.quant[(0, "key")].center  # offsets the sink rows must not take
    stacks_alike_on_every_path(files)


def test_a_stacked_plan_of_some_layers_takes_each_entrys_offsets_and_sinks(tmp_path, lm,
                                                                          kv_1536):
    """A vLLM step's layer group: a stacked plan of a few layers, in no particular order,
    gathers for each of its streams every entry's centering offsets and fp16 first row
    (for all entries at once, not entry by entry) and decodes the bits of each entry
    decoded alone."""
    from kvcodec.format.plan import execute
    from kvcodec.format.stacked import plan_stack

    store = ChunkStore(tmp_path / "store", lm.fingerprint, kvcodec.load_config("default"))
    store.put(kv_1536)
    ids, locs = kv_1536.token_ids, store.lookup(kv_1536.token_ids)
    files = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
             for i, loc in enumerate(locs)]
    m, layers = files[0].meta, [29, 3, 17]
    assert m.quant[(3, "key")].center and m.sink_tokens  # what is gathered is there
    shape = (1, m.num_kv_heads, 1536, m.head_dim)
    bufs = {l: (torch.zeros(shape), torch.zeros(shape)) for l in layers}
    plan = plan_stack(files, bufs, [(i * 256, (i + 1) * 256) for i in range(len(files))])
    assert plan is not None and len(plan.targets) == 2 * len(layers)
    execute(plan, 2)
    for i, f in enumerate(files):
        one = f.decode()
        for l in layers:
            rows = slice(i * 256, (i + 1) * 256)
            assert torch.equal(bufs[l][0][:, :, rows], one.keys[l])
            assert torch.equal(bufs[l][1][:, :, rows], one.values[l])
        f.close()


@pytest.mark.parametrize("where", ["checksum", "decoder"])
def test_a_damaged_entry_in_a_stacked_prefix(filled, caplog, where):
    """The stacked decode of a prefix fails on a damaged entry; the entries are then
    decoded one by one, so those before it land and it alone is moved aside."""
    store, ids, locs = filled
    locs[3].write_bytes(_damaged(locs[3].read_bytes(), where))
    with caplog.at_level("WARNING", logger="kvcodec"):
        kv = store.load_prefix(ids)
    assert kv.num_tokens == 768 and not locs[3].exists() and "moved it to" in caplog.text
    for i in range(3):
        with store.open_entry(locs[i], ids[i * 256:(i + 1) * 256], i * 256) as f:
            one = f.decode()
        assert torch.equal(kv.keys[0][:, :, i * 256:(i + 1) * 256], one.keys[0])


@pytest.mark.parametrize("where", [None, "checksum", "decoder"])
def test_documents_of_a_step_decode_as_one_plan(filled, lm, where, caplog, monkeypatch):
    """What the vLLM worker does each step: the entries of several requests, some layers
    at a time, into one buffer at each request's rows (``decode_documents``). Each
    document stacks; a damaged entry stops only its document, after the entries before
    it landed, and is moved aside."""
    import kvcodec.store.batch as batch
    from kvcodec.store.batch import Document, decode_documents

    stacked, real = [], batch.plan_stack
    monkeypatch.setattr(batch, "plan_stack", lambda *a: stacked.append(real(*a)) or stacked[-1])
    store, ids, locs = filled
    if where:
        locs[2].write_bytes(_damaged(locs[2].read_bytes(), where))
    fp, layers = lm.fingerprint, [4, 5, 29]
    shape = (1, fp["num_kv_heads"], 1536 + 512, fp["head_dim"])
    bufs = {l: (torch.zeros(shape), torch.zeros(shape)) for l in layers}

    def doc(n, at):
        files = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
                 for i, loc in enumerate(locs[:n])]
        return Document(files, locs[:n], bufs, [(at + i * 256, at + (i + 1) * 256)
                                                 for i in range(n)])
    docs = [doc(2, 0), doc(6, 512)]  # a short request first, then the whole document
    with caplog.at_level("WARNING", logger="kvcodec"):
        landed = decode_documents(store, docs, threads=2)
    assert landed == ([2, 6] if where is None else [2, 2])
    if where != "checksum":  # a checksum is checked while planning: that one is not stacked
        assert len(stacked) == 2 and None not in stacked
        assert len(stacked[1].targets) == 2 * len(layers)  # a target per stream, not entry
    assert (where is None) == locs[2].exists()
    for d, at in zip(docs, (0, 512)):
        for i in range(landed[docs.index(d)]):
            one = d.files[i].decode()
            for l in layers:
                rows = slice(at + i * 256, at + (i + 1) * 256)
                assert torch.equal(bufs[l][0][:, :, rows], one.keys[l])
                assert torch.equal(bufs[l][1][:, :, rows], one.values[l])
        for f in d.files:
            f.close()


def test_a_requests_own_last_entry_stacks_alone(tmp_path, lm, kv_1536, monkeypatch):
    """Two requests of a step over one document, different questions: the second's own
    last entry (a partial chunk after the entries it shares) is one document of one
    entry. It is planned stacked like the others (one native call for the step, its
    sink rows set with one NumPy call per kind), at its rows of the buffer, and decodes
    the bits of the entry decoded alone."""
    import kvcodec.store.batch as batch
    from kvcodec.store.batch import Document, decode_documents

    store = ChunkStore(tmp_path / "store", lm.fingerprint, "default")
    kv = kv_1536.slice(0, 1500)  # 5 whole chunks and a partial one of 220 tokens
    store.put(kv)
    ids, locs = kv.token_ids, store.lookup(kv.token_ids, partial=True)
    assert len(locs) == 6
    stacked, real = [], batch.plan_stack
    monkeypatch.setattr(batch, "plan_stack", lambda *a: stacked.append(real(*a)) or stacked[-1])
    runs, real_run = [], batch.run
    monkeypatch.setattr(batch, "run", lambda p, t=0: runs.append(p) or real_run(p, t))
    fp, layers = lm.fingerprint, [0, 7, 29]
    shape = (1, fp["num_kv_heads"], 1500 + 220 + 5, fp["head_dim"])
    bufs = {l: (torch.full(shape, 7.0), torch.full(shape, 7.0)) for l in layers}
    files = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
             for i, loc in enumerate(locs)]
    docs = [Document(files, locs, bufs, [(i * 256, min(1500, (i + 1) * 256))
                                         for i in range(6)]),
            Document(files[5:], locs[5:], bufs, [(1505, 1725)])]  # after 5 spare rows
    assert decode_documents(store, docs, threads=2) == [6, 1]
    assert len(stacked) == 2 and None not in stacked and len(runs) == 1
    assert len(stacked[1].targets) == 2 * len(layers)
    one = files[5].decode()
    assert one.num_tokens == 220
    for l in layers:
        for got, want in ((bufs[l][0], one.keys[l]), (bufs[l][1], one.values[l])):
            assert torch.equal(got[:, :, 1505:1725], want)
            assert torch.equal(got[:, :, 1280:1500], want)  # the first document's copy
            assert (got[:, :, 1500:1505] == 7.0).all()  # rows between: not touched
    for f in files:
        f.close()


def test_a_stacked_plans_float32_rows_start_no_openmp_team():
    """The entries' centering offsets and sink rows become float32 in the calling thread,
    in copies no larger than torch's grain size: one parallel copy started (or woke) the
    process's OpenMP workers, which then spin beside the native decode that follows (a
    store load of 8 entries on 2 cores ~3 ms slower). In a fresh process, where no
    parallel region has run yet, converting 8 entries' rows of 60 streams leaves the
    process's thread count as it was, and the values are torch's exact casts."""
    import subprocess
    import sys

    code = """
import os, numpy as np, torch
torch.set_num_threads(2)
from kvcodec.format.stacked import _float32
a = np.random.default_rng(0).standard_normal((60, 8, 192)).astype(np.float16)
before = len(os.listdir("/proc/self/task"))
got = _float32(a)
after = len(os.listdir("/proc/self/task"))
assert np.array_equal(got, torch.from_numpy(a).float().numpy()) and got.dtype == np.float32
print(before, after, len(os.listdir("/proc/self/task")))
"""
    out = [int(n) for n in subprocess.run([sys.executable, "-c", code], capture_output=True,
                                          text=True, check=True).stdout.split()]
    assert out[0] == out[1] < out[2], out  # torch's own cast of them starts one


def test_table_fit_sums_what_numpy_sums():
    """The native sums behind SharedTables.fits (one pass over the mostly zero tables)
    against the same sums in NumPy: entropy, cross-entropy less entropy, symbols used,
    and a symbol absent from the shared tables."""
    from kvcodec.core.tables import native

    rng = np.random.default_rng(0)
    own, shared, tokens = [], [], [256.0, 17.0, 1.0]
    for rows in (5, 3, 1):
        lv = np.zeros((rows, 256), dtype=np.uint8)
        for r in range(rows):
            lo = int(rng.integers(0, 240))
            lv[r, lo:lo + int(rng.integers(1, 16))] = rng.integers(1, 8, size=1)[0]
        wide = SharedTables.from_levels([lv]).freqs[0]
        own.append(native().normalize_freqs(lv))
        shared.append(wide)
    present, extra, payload, used = native().table_fit(own, shared, tokens)
    ref_extra = ref_payload = 0.0
    for f, g, n in zip(own, shared, tokens):
        u = f > 0
        p = f[u] / 4096.0
        ref_payload -= n * float(p @ np.log2(p))
        ref_extra += n * float(p @ (np.log2(p) - np.log2(g[u] / 4096.0)))
    assert present and used == sum(int((f > 0).sum()) for f in own)
    assert extra == pytest.approx(ref_extra, rel=1e-12, abs=1e-9)
    assert payload == pytest.approx(ref_payload, rel=1e-12)
    gone = [g.copy() for g in shared]
    gone[2][own[2] > 0] = 0  # the last stream's symbols absent from the shared tables
    assert native().table_fit(own, gone, tokens)[0] is False
    with pytest.raises(ValueError):
        native().table_fit(own, shared[:2], tokens)
