"""klt streams (format v7): each KV head coded in the eigenbasis of its vectors, the bases
in a shared, content-addressed codebook that files name (or embed) and stores keep."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.core import codebook
from kvcodec.core.config import load_config
from kvcodec.core.quant import fit_stream, make_quantizer
from kvcodec.errors import CodebookError, CorruptError
from kvcodec.format import container
from kvcodec.quality.simulate import simulate
from kvcodec.quality.transform import klt_config
from kvcodec.store import ChunkStore


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """A user config directory holding nothing yet (codebooks land in it)."""
    root = tmp_path_factory.mktemp("configs")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVCODEC_CONFIG_DIR", str(root))
    yield root
    mp.undo()
    codebook.clear()


@pytest.fixture(scope="module")
def klt(books, lm, texts, kv_600):
    """The embedded model's shipped calibration coded in bases fitted on another text."""
    base = load_config("default", model=kv_600.model)
    cal = kvcodec.capture_kv(lm, texts["gpl3"], max_tokens=512)
    cfg, book = klt_config(base, [cal])
    codebook.save(book)
    return base, cfg, book


def test_a_codebook_is_checked_bytes_named_by_their_hash(books):
    rng = np.random.default_rng(0)
    book = codebook.Codebook(rng.standard_normal((3, 2, 8, 8)), note="test")
    data = book.to_bytes()
    again = codebook.Codebook.from_bytes(data)
    assert again.digest == book.digest and np.array_equal(again.bases, book.bases)
    assert book.basis(2).shape == (2, 8, 8) and book.bases.dtype == np.float32
    damaged = bytearray(data)
    damaged[-10] ^= 1
    for bad, why in [(bytes(damaged), "checksum"), (data[:-1], "bytes"),
                     (b"X" + data[1:], "magic"), (data[:20], "fit")]:
        with pytest.raises(CorruptError, match=why):
            codebook.Codebook.from_bytes(bad)
    # A header claiming a huge codebook is refused before anything is allocated.
    head = json.dumps({"version": 1, "count": 4000, "heads": 256, "head_dim": 1024}).encode()
    huge = codebook.MAGIC + struct.pack("<II", len(head), zlib.crc32(head)) + head + b"\0" * 8
    with pytest.raises(CorruptError, match="expected|bytes"):
        codebook.Codebook.from_bytes(huge)
    with pytest.raises(CorruptError, match="not finite"):
        codebook.Codebook(np.full((1, 1, 2, 2), np.inf))
    with pytest.raises(CorruptError, match="do not hash"):
        codebook.register_bytes(data, "0" * 64)
    with pytest.raises(CodebookError, match="is not here"):
        codebook.get("0" * 64)
    fifo = books / "codebooks" / f"{'1' * 64}{codebook.SUFFIX}"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)  # its open would block until a writer came
    with pytest.raises(CodebookError, match="not a regular file"):
        codebook.get("1" * 64)
    fifo.unlink()
    with pytest.raises(CorruptError, match="not a codebook name"):
        codebook.get("../etc")
    path = codebook.save(book)
    assert path.parent == books / "codebooks" and path.read_bytes() == data
    codebook.clear()
    assert codebook.get(book.digest).digest == book.digest  # found in the folder


def test_the_transform_inverts_to_float32_rounding(klt, kv_600):
    _, cfg, _ = klt
    spec = cfg["key"][5]["quantizer"]
    q = make_quantizer(spec)
    x = kv_600.keys[5][0].permute(1, 0, 2).reshape(600, -1).float()
    mean = torch.from_numpy(fit_stream(q, x, 1)["mean"]).float()
    fwd, inv = q.matrices(x.shape[1])
    h, d = fwd.shape[:2]
    xc = (x - mean).reshape(-1, h, d).transpose(0, 1)
    back = torch.bmm(torch.bmm(xc, torch.tensor(fwd)), torch.tensor(inv))
    back = back.transpose(0, 1).reshape(x.shape) + mean
    assert torch.allclose(back, x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_a_klt_file_decodes_alike_on_every_path(klt, kv_600, decode_on_every_cpu_path):
    base, cfg, book = klt
    data = kvcodec.encode(kv_600, config=cfg)
    with kvcodec.open(data) as f:
        s = f.meta.summary()
        assert s["format_version"] == container.TRANSFORM_VERSION == 7
        assert s["codebook"] == book.digest and "codebook" not in s["sections"]
        part = f.decode(chunks=1)
    outs = decode_on_every_cpu_path(data)  # bit-identical on scalar, AVX2, AVX-512
    ref = simulate(kv_600, cfg)  # the Python path: quantizer.dequantize
    for a, b in zip(outs[0].keys + outs[0].values, ref.keys + ref.values):
        assert torch.equal(a, b)
    for a, b in zip(part.keys + part.values, outs[0].keys + outs[0].values):
        assert torch.equal(a, b[:, :, 256:512])  # one chunk alone, the same bits
    # The same steps in the bases take fewer bits than in the channels (about 10% on
    # real text); the error stays of the same order.
    plain = kvcodec.encode(kv_600, config=base)
    assert len(data) < 0.95 * len(plain)
    err = [float((a - b).pow(2).mean() / b.pow(2).mean())
           for dec in (outs[0], kvcodec.decode(plain)) for a, b in zip(dec.keys, kv_600.keys)]
    n = len(kv_600.keys)
    assert np.mean(err[:n]) < 3 * np.mean(err[n:])


def test_a_missing_codebook_is_a_clear_error(klt, kv_600, tmp_path, monkeypatch):
    from kvcodec_cli.main import main

    _, cfg, book = klt
    named = tmp_path / "named.kvc"
    kvcodec.encode(kv_600, named, config=cfg)
    embedded = kvcodec.encode(kv_600, config=cfg, embed_codebook=True)
    assert len(embedded) > named.stat().st_size + len(book.to_bytes()) - 1000
    r = CliRunner().invoke(main, ["inspect", str(named)])
    line = next(x for x in r.output.splitlines() if x.startswith("codebook"))
    assert r.exit_code == 0 and line.split()[1:3] == [book.digest, "(named;"]
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "elsewhere"))
    codebook.clear()
    with pytest.raises(CodebookError, match=book.digest[:16]):
        kvcodec.open(named)
    r = CliRunner().invoke(main, ["inspect", str(named)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "codebook" in r.output and len(r.output.strip().splitlines()) == 1
    with kvcodec.open(embedded) as f:  # carries its codebook
        assert f.meta.summary()["sections"]["codebook"] > 0
        for a, b in zip(f.decode().keys, kvcodec.decode(named).keys):
            assert torch.equal(a, b)
    codebook.register(book)
    monkeypatch.setattr(container, "TRANSFORM_VERSION", 6)
    v6 = kvcodec.encode(kv_600, config=cfg, embed_codebook=True)
    with pytest.raises(CorruptError, match="format v7"):  # klt streams in a v6 container
        kvcodec.open(v6)


def test_an_evicted_cache_codes_each_heads_basis(klt, kv_600, decode_on_every_cpu_path):
    _, cfg, _ = klt
    kv = kvcodec.evict.evict(kv_600, "knorm", 0.5)
    data = kvcodec.encode(kv, config=cfg)
    out = decode_on_every_cpu_path(data)[0]
    for layer in (0, 17):
        for h in range(kv.num_kv_heads):
            pos = kv.kept[layer][h]
            n = int((pos >= 0).sum())
            a, b = out.keys[layer][0, h, :n], kv.keys[layer][0, h, :n]
            assert torch.equal(out.kept[layer][h, :n], pos[:n])
            assert float((a - b).pow(2).mean() / b.pow(2).mean()) < 0.05


def test_a_klt_stores_entries_share_its_tables_and_decode_as_one_plan(klt, kv_600, tmp_path):
    """Every entry of a klt store, the document's first included (its first tokens lie
    far from the document's mean, and each entry is centered on its own: the store's
    tables admit what each chunk codes), is coded with the store's shared tables, so
    the prefix is one stacked plan (the decoder writing each entry's fp16 first row over
    its sums): the bits of each entry decoded alone, on every CPU path, into float32 and
    bfloat16."""
    from conftest import stacks_alike_on_every_path

    _, cfg, _ = klt
    store = ChunkStore(tmp_path / "s", kv_600.model, config=cfg)
    assert store.put(kv_600) == 3
    ids, locs = kv_600.token_ids, store.lookup(kv_600.token_ids, partial=True)
    files = [store.open_entry(loc, ids[i * 256:(i + 1) * 256], i * 256)
             for i, loc in enumerate(locs)]
    assert len(files) == 3 and sum(f.num_tokens for f in files) == 600
    assert files[0].meta.sink_tokens and all(f.meta.shared_tables for f in files)
    stacks_alike_on_every_path(files)


def test_a_store_keeps_the_codebook_its_entries_name(klt, kv_600, tmp_path, monkeypatch):
    _, cfg, book = klt
    store = ChunkStore(tmp_path / "s", kv_600.model, config=cfg)
    assert store.put(kv_600) == 3
    rel = f"codebooks/{book.digest}.kvcb"
    assert store.read_object(rel) == book.to_bytes()
    want = [kvcodec.decode(kvcodec.encode(kv_600.slice(0, 256), config=cfg))]
    # Elsewhere (no codebook installed), the store's copy serves.
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "elsewhere"))
    codebook.clear()
    reader = ChunkStore(tmp_path / "s", kv_600.model, config=cfg)
    ids = kv_600.token_ids[:256]
    loc = reader.path(reader.keys(ids)[0])
    buf = {l: (torch.empty(1, 3, 256, 64), torch.empty(1, 3, 256, 64)) for l in range(30)}
    assert reader.read_chunk(loc, ids, 0, buf)
    for l in (0, 29):
        assert torch.equal(buf[l][0], want[0].keys[l])
    # Gone from everywhere: an error of the environment (a miss), and the entries stay.
    codebook.clear()
    (tmp_path / "s" / rel).unlink()
    fresh = ChunkStore(tmp_path / "s", kv_600.model, config=cfg)
    with pytest.raises(CodebookError, match="neither here nor in the store"):
        fresh.open_entry(loc, ids, 0)
    assert not fresh.read_chunk(loc, ids, 0, buf)
    assert not list((tmp_path / "s").rglob("*.bad")) and loc.exists()
    failures = fresh.metrics.snapshot()["kvcodec_load_failures_total"]
    assert failures.get("environment") == 2 and not failures.get("damaged")


def test_calibrate_klt_writes_a_codebook_and_its_rate_curve(tmp_path, monkeypatch, texts,
                                                            kv_600):
    """``kvcodec calibrate --from ... --klt``: the calibration's steps in bases fitted on
    its texts, the codebook beside the config, the curve measured again (so --target-kl
    works), and ``encode`` of the model picks it up as ``default``."""
    from kvcodec.core.config import calibrated_config_path
    from kvcodec_cli.main import main

    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "configs"))
    codebook.clear()
    src = tmp_path / "t.txt"
    src.write_text(texts["gpl3"])
    r = CliRunner().invoke(main, ["calibrate", "--from", str(calibrated_config_path(
        kv_600.model)), "--text", str(src), "--prefill", "320", "--continuation", "48",
        "--no-query-weights", "--klt"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(next((tmp_path / "configs").glob("*.json")).read_text())
    digest = cfg["calibration"]["refined"]["codebook"]
    assert (tmp_path / "configs" / "codebooks" / f"{digest}.kvcb").is_file()
    assert {r["quantizer"]["type"] for r in cfg["key"] + cfg["value"]} == {"klt"}
    assert {r["quantizer"]["rms"] for r in cfg["key"]} == {"raw"}  # the steps it chose
    curve = cfg["rate_curve"]
    assert [p[0] for p in curve] == [0.5, 0.7, 1.0, 1.4, 2.0]
    assert all(a[2] > b[2] for a, b in zip(curve, curve[1:]))
    fine, coarse = (kvcodec.encode(kv_600, config="default", target_kl=t) for t in (0.002, 0.02))
    assert len(fine) > len(coarse)
    with kvcodec.open(coarse) as f:
        assert f.meta.summary()["codebook"] == digest


def test_a_crafted_codebook_decodes_or_fails_cleanly(klt, kv_600):
    """A codebook whose bases are singular (all zeros here) parses; a file naming it
    decodes (every component times zero: the channel means), and coding with it is a
    clear error, not numpy's."""
    from kvcodec.format.bounded import zstd

    _, cfg, book = klt
    zero = codebook.register(codebook.Codebook(np.zeros(book.bases.shape)))
    bad = json.loads(json.dumps(cfg).replace(book.digest, zero.digest))
    with pytest.raises(CodebookError, match="cannot be inverted"):
        kvcodec.encode(kv_600, config=bad)
    good = kvcodec.encode(kv_600, config=cfg)
    r = container.Reader(good)
    names = [t["name"] for t in r.header["sections"]]
    recorded = json.loads(json.dumps(kvcodec.open(good).meta.config))
    recorded = json.loads(json.dumps(recorded).replace(book.digest, zero.digest))
    sections = [(n, zstd(json.dumps(recorded).encode()) if n == "config" else
                 r.read_section(n), n != "payload") for n in names]
    header = {k: v for k, v in r.header.items() if k not in ("sections", "data_length")}
    crafted = container.build(header, sections, r.version)
    out = kvcodec.decode(crafted)
    with kvcodec.open(crafted) as f:
        params = f.sections.params()
    mean = torch.from_numpy(np.asarray(params[(3, "value")]["mean"], dtype=np.float32))
    got = out.values[3][0].permute(1, 0, 2).reshape(600, -1)
    assert torch.equal(got[1:], mean.expand(599, -1))  # the sink row is stored exactly


def test_a_codebook_save_that_fails_leaves_no_file(tmp_path, monkeypatch):
    """A full disk while a codebook is written: an OSError, and neither a partial
    codebook nor its temp file in the folder (before: the temp file stayed)."""
    import errno

    from kvcodec.core import paths

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    book = codebook.Codebook(np.eye(8)[None, None].repeat(2, 0))
    monkeypatch.setattr(paths.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        codebook.save(book, tmp_path / "books")
    assert list((tmp_path / "books").iterdir()) == []
    monkeypatch.undo()
    path = codebook.save(book, tmp_path / "books")
    assert list((tmp_path / "books").iterdir()) == [path]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode == plain.stat().st_mode  # as open() makes a file, not 0600


def _fma32(a, b, c):
    """float32 fused multiply-add, emulated: the product of two float32 is exact in
    float64, and so are the sums of the case below (its values have few bits and close
    exponents), so the result is rounded once, as a fused multiply-add rounds it."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def _inverse_reference(x, basis):
    """dequant.h's order: nonzero terms ascending, alternately into two sums, then added."""
    sums = np.zeros((2, x.shape[0]), np.float32)
    for n, j in enumerate(np.flatnonzero(x)):
        sums[n & 1] = _fma32(x[j], basis[j], sums[n & 1])
    return sums[0] + sums[1]


@pytest.mark.parametrize("head_dim", [16, 48, 64, 80, 128, 256])
def test_the_inverse_basis_sums_in_the_documented_order_on_every_path(head_dim):
    """Every CPU path's inverse transform, bit for bit against dequant.h's order, over
    rows of every count of nonzero terms (none, one, odd, even, all), next to rows of
    other counts (the AVX-512 kernel sums two rows in one loop and pads the shorter: its
    pad terms must leave even a sum of -0 as it is), in head dims that fill the kernels'
    register blocks whole and with a tail."""
    from kvcodec import _native as nat

    rng = np.random.default_rng(head_dim)
    heads, r, d = 2, 7, head_dim
    counts = [0, 1, 2, 3, d // 2, d - 1, d, 5, 1, d, 2, 0, 2, d - 1]
    rows = len(counts) + 1
    sym = np.full((rows, heads * d + 1), r, np.uint8)
    for t, n in enumerate(counts):
        for k in range(heads):
            at = rng.choice(d, n, replace=False)
            sym[t, k * d + at] = rng.integers(0, 2 * r + 1, n)
            sym[t, k * d + at[sym[t, k * d + at] == r]] = r + 1  # nonzero, all of them
    sym[:, -1] = 1
    sym[2, -1] = sym[10, -1] = 2  # rows of two terms whose products underflow to -0
    sym[2, :-1] = sym[10, :-1] = r
    sym[2, [0, 1]] = sym[10, [0, 1]] = r + 1
    grid = np.zeros(256, np.float32)
    grid[1], grid[2] = 0.25, 1e-20
    basis = (rng.integers(-(1 << 20), 1 << 20, (heads, d, d)) / (1 << 20)).astype(np.float32)
    basis[0, :2] = -1e-30
    x = (sym[:, :-1].astype(np.float32) - r) * grid[sym[:, -1]][:, None]
    want = np.stack([[_inverse_reference(x[t, k * d:(k + 1) * d], basis[k])
                      for t in range(rows)] for k in range(heads)])
    assert np.signbit(want[0, 2]).all() and (want[0, 2] == 0).all()
    for path in ("scalar", "avx2", "avx512"):
        if not nat.set_simd_path(path):
            continue
        try:
            out = np.full((heads, rows, d), np.nan, np.float32)
            err = nat.dequant_symbols(sym, (grid, np.ones(heads * d, np.float32), r, heads,
                                            out, None, None, None, 0, basis))
        finally:
            nat.set_simd_path("auto")
        assert err == ""
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), path


def test_a_klt_head_listed_straight_from_its_symbols_matches_every_path():
    """AVX-512 lists a klt head's terms straight from its symbols, its values never stored
    (``basis_load_terms``): the same bits as the other paths, with per-channel step
    multipliers and mostly-zero rows, and a symbol past 2R reported as they report it."""
    from kvcodec import _native as nat
    from kvcodec.core.quant import STEP_GRID

    rng = np.random.default_rng(3)
    heads, r, d, rows = 3, 7, 64, 41
    sym = rng.integers(0, 2 * r + 1, (rows, heads * d + 1)).astype(np.uint8)
    sym[:, :-1][rng.random((rows, heads * d)) < 0.6] = r  # most components are zero
    sym[:, -1] = rng.integers(100, 140, rows)
    mult = rng.uniform(0.5, 2.0, heads * d).astype(np.float32)
    basis = rng.normal(size=(heads, d, d)).astype(np.float32)
    bad = sym.copy()
    bad[17, d + 5] = 2 * r + 1
    outs, errs = {}, {}
    for path in ("scalar", "avx2", "avx512"):
        if not nat.set_simd_path(path):
            continue
        try:
            outs[path] = np.full((heads, rows, d), np.nan, np.float32)
            assert nat.dequant_symbols(sym, (STEP_GRID, mult, r, heads, outs[path], None,
                                             None, None, 0, basis)) == ""
            errs[path] = nat.dequant_symbols(bad, (STEP_GRID, mult, r, heads,
                                                   np.zeros((heads, rows, d), np.float32),
                                                   None, None, None, 0, basis))
        finally:
            nat.set_simd_path("auto")
    assert "17" in errs["scalar"]
    for path in outs:
        assert np.array_equal(outs[path].view(np.uint32), outs["scalar"].view(np.uint32)), path
        assert errs[path] == errs["scalar"], path
