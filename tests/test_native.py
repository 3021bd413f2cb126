"""The native coder against a pure-Python reference of the bitstream (csrc/common/rans.h)."""
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SIMD_GATHER_PATHS, use_cpu_path
from kvcodec import _native as nat
from kvcodec.core import tables

L, PROB_BITS, LANES = 1 << 16, 12, 16
WEIGHTS = [0] + [round(2 ** (16 + (k - 63) / 4.0 + 15.5)) for k in range(1, 64)]


def ref_normalize(levels):
    """The table builder, re-implemented from its specification."""
    total = sum(WEIGHTS[v] for v in levels)
    f = [max(1, WEIGHTS[v] * 4096 // total) if v else 0 for v in levels]
    d = 4096 - sum(f)
    while d:
        best = max(range(len(f)), key=lambda s: (f[s], -s))
        take = d if d > 0 else -min(-d, f[best] - 1)
        f[best] += take
        d -= take
    return f


def ref_decode(blob, rows, channels, freqs):
    """Slow, obviously-correct decoder of one blob."""
    states = [int.from_bytes(blob[4 * j:4 * j + 4], "little") for j in range(LANES)]
    words = np.frombuffer(blob[4 * LANES:], dtype="<u2")
    cums = np.concatenate([np.zeros((channels, 1), np.int64), np.cumsum(freqs, 1)], 1)
    out = np.zeros((rows, channels), np.uint8)
    pos = 0
    for t in range(rows):
        for c in range(channels):  # steps (t, g) with lanes ascending == channels ascending
            j = c % LANES
            x = states[j]
            slot = x & 4095
            s = int(np.searchsorted(cums[c], slot, side="right") - 1)
            x = int(freqs[c, s]) * (x >> 12) + slot - int(cums[c, s])
            if x < L:
                x = (x << 16) | int(words[pos])
                pos += 1
            states[j] = x
            out[t, c] = s
    assert pos == len(words) and all(x == L for x in states[:min(channels, LANES)])
    return out


def random_case(rng, rows, channels, alphabet, skew=1.0):
    logits = rng.normal(0, 3 * skew, (channels, alphabet))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sym = np.stack([rng.choice(alphabet, size=rows, p=p[c]) for c in range(channels)], 1)
    sym = sym.astype(np.uint8)
    counts = tables.channel_counts(sym, alphabet)
    return sym, nat.normalize_freqs(tables.levels_from_counts(counts))


def roundtrip(sym, freqs, chunk):
    blobs = nat.encode(sym, freqs, chunk)
    out = np.empty_like(sym)
    assert nat.decode_many([(blobs, freqs, out)], chunk) == [None]
    np.testing.assert_array_equal(out, sym)
    return blobs


def test_normalize_matches_reference_and_invariants():
    rng = np.random.default_rng(1)
    for alphabet in (1, 2, 7, 63, 256):
        for _ in range(20):
            lv = rng.integers(0, 64, (1, alphabet)).astype(np.uint8)
            if lv.max() == 0:
                lv[0, 0] = 5
            f = nat.normalize_freqs(lv)[0]
            assert f.sum() == 4096 and ((f > 0) == (lv[0] > 0)).all()
            assert list(f) == ref_normalize(list(lv[0]))
    # Monotone in level, deterministic, and a full alphabet at the lowest level still fits.
    f = nat.normalize_freqs(np.arange(1, 64, dtype=np.uint8)[None])[0]
    assert (np.diff(f.astype(int)) >= 0).all()
    assert nat.normalize_freqs(np.ones((1, 256), np.uint8))[0].tolist() == [16] * 256


def test_normalize_many_equals_one_by_one():
    rng = np.random.default_rng(2)
    arrays = [rng.integers(1, 64, (rows, a)).astype(np.uint8)
              for rows, a in [(3, 7), (192, 63), (1, 256), (50, 16)] * 3]
    for threads in (1, 2, 5):
        got = nat.normalize_many(arrays, threads)
        assert len(got) == len(arrays)
        for lv, f in zip(arrays, got):
            assert f.dtype == np.uint16 and np.array_equal(f, nat.normalize_freqs(lv))
    bad = arrays[1].copy()
    bad[7] = 0
    with pytest.raises(ValueError, match=r"levels\[1\]: row 7"):
        nat.normalize_many([arrays[0], bad], 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        nat.normalize_many([arrays[1][:, ::2]])


@pytest.mark.parametrize("rows,channels,alphabet", [
    (1, 1, 1), (255, 5, 2), (256, 32, 16), (257, 33, 63), (1000, 192, 256), (300, 193, 31),
])
def test_exact_round_trips(rows, channels, alphabet):
    rng = np.random.default_rng(rows * 7 + channels)
    sym, freqs = random_case(rng, rows, channels, alphabet)
    blobs = roundtrip(sym, freqs, 256)
    assert len(blobs) == (rows + 255) // 256
    assert all(len(b) <= nat.max_encoded_size(min(256, rows), channels) for b in blobs)


def test_reference_decoder_reads_the_native_bytes():
    rng = np.random.default_rng(3)
    for rows, channels, alphabet in [(40, 3, 5), (17, 45, 20), (9, 70, 256)]:
        sym, freqs = random_case(rng, rows, channels, alphabet)
        (blob,) = nat.encode(sym, freqs, rows)
        np.testing.assert_array_equal(ref_decode(blob, rows, channels, freqs), sym)


def test_one_symbol_and_extremely_skewed_tables():
    sym = np.full((500, 40), 3, np.uint8)  # every channel constant: freq 4096
    freqs = nat.normalize_freqs(tables.levels_from_counts(tables.channel_counts(sym, 8)))
    blobs = roundtrip(sym, freqs, 128)
    assert all(len(b) == 4 * LANES for b in blobs)  # only lane states: no bits per symbol
    rng = np.random.default_rng(4)
    sym, freqs = random_case(rng, 2000, 8, 256, skew=4.0)
    roundtrip(sym, freqs, 256)


def test_entropy_efficiency():
    rng = np.random.default_rng(5)
    sym = (np.clip(np.round(rng.laplace(0, 2, (4096, 64))), -20, 20) + 20).astype(np.uint8)
    counts = tables.channel_counts(sym, 41)
    freqs = nat.normalize_freqs(tables.levels_from_counts(counts))
    bits = sum(len(b) for b in roundtrip(sym, freqs, 256)) * 8
    assert bits < tables.entropy_bits(counts) * 1.02


def test_many_streams_in_parallel():
    rng = np.random.default_rng(6)
    items = [random_case(rng, int(rng.integers(1, 600)), int(rng.integers(1, 70)), 16)
             for _ in range(12)]
    blobs = nat.encode_many(items, 100, threads=2)
    outs = [np.empty_like(s) for s, _ in items]
    errs = nat.decode_many([(b, f, o) for b, (_, f), o in zip(blobs, items, outs)], 100, 2)
    assert errs == [None] * 12
    for o, (s, _) in zip(outs, items):
        np.testing.assert_array_equal(o, s)


def test_bad_arguments_raise_value_errors_naming_them():
    sym = np.zeros((4, 3), np.uint8)
    freqs = nat.normalize_freqs(np.full((3, 4), 10, np.uint8))
    with pytest.raises(ValueError, match="symbols"):
        nat.encode(sym.astype(np.int16), freqs, 4)
    with pytest.raises(ValueError, match="symbols"):
        nat.encode(np.zeros((4, 6), np.uint8)[:, ::2], freqs, 4)
    with pytest.raises(ValueError, match="freqs"):
        nat.encode(sym, freqs[:2], 4)
    bad = freqs.copy()
    bad[1, 0] += 1
    with pytest.raises(ValueError, match="sums to"):
        nat.encode(sym, bad, 4)
    with pytest.raises(ValueError, match="zero frequency"):
        nat.encode(np.full((4, 3), 3, np.uint8), nat.normalize_freqs(
            np.array([[5, 5, 5, 0]] * 3, np.uint8)), 4)
    with pytest.raises(ValueError, match="levels"):
        nat.normalize_freqs(np.zeros((2, 4), np.uint8))
    with pytest.raises(ValueError, match="levels"):
        nat.normalize_freqs(np.full((1, 4), 64, np.uint8))
    blobs = nat.encode(sym, freqs, 4)
    with pytest.raises(ValueError, match="blobs"):
        nat.decode_many([(blobs * 2, freqs, np.empty((4, 3), np.uint8))], 4)
    with pytest.raises(ValueError, match="out"):
        nat.decode_many([(blobs, freqs, np.empty((4, 3), np.float32))], 4)


def test_damaged_blobs_give_error_strings():
    rng = np.random.default_rng(7)
    sym, freqs = random_case(rng, 256, 40, 16)
    (blob,) = nat.encode(sym, freqs, 256)
    out = np.empty_like(sym)

    def dec(b):
        return nat.decode_many([([b], freqs, out)], 256)[0]

    assert dec(blob) is None
    assert "shorter" in dec(blob[:60])
    assert "odd" in dec(blob[:-1])
    assert "truncated" in dec(blob[:-2]) or "corrupt" in dec(blob[:-2])
    assert "corrupt" in dec(blob + b"\0\0")
    assert "initial lane state" in dec(b"\0" * 4 + blob[4:])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    assert dec(bytes(flipped)) is not None


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_decoder_never_crashes(data):
    """Random and mutated blobs: an error string or symbols, never a crash or a hang."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    rows, channels = data.draw(st.integers(1, 64)), data.draw(st.integers(1, 40))
    sym, freqs = random_case(rng, rows, channels, data.draw(st.integers(1, 32)))
    (blob,) = nat.encode(sym, freqs, rows)
    assert nat.LANES == LANES
    if data.draw(st.booleans()):
        blob = data.draw(st.binary(max_size=600))
    else:
        buf = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 6))):
            if buf:
                buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(buf[:data.draw(st.integers(0, len(buf)))])
    out = np.empty_like(sym)
    err = nat.decode_many([([blob], freqs, out)], rows)[0]
    assert err is None or isinstance(err, str)
    assert int(out.max(initial=0)) < 256


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), alphabet=st.sampled_from([1, 2, 3, 17, 61, 256]),
       skew=st.sampled_from([0.2, 1.0, 3.0]))
def test_prebuilt_tables_decode_like_freqs(seed, alphabet, skew):
    """Prebuilt (bucketed) decode tables give the same symbols as tables built per call,
    including tables with many tiny symbols that share one bucket."""
    rng = np.random.default_rng(seed)
    sym, freqs = random_case(rng, 40, 21, alphabet, skew)
    blobs = nat.encode(sym, freqs, 16)
    built, = nat.build_decode_tables([freqs])
    assert (built.channels, built.alphabet) == (21, alphabet)
    a, b = np.empty_like(sym), np.empty_like(sym)
    assert nat.decode_many([(blobs, freqs, a), (blobs, built, b)], 16, 2) == [None, None]
    assert np.array_equal(a, sym) and np.array_equal(b, sym)
    assert np.array_equal(ref_decode(blobs[0], 16, 21, freqs), sym[:16])


def test_prebuilt_tables_must_match_the_channels():
    freqs = nat.normalize_freqs(np.full((3, 4), 10, np.uint8))
    built, = nat.build_decode_tables([freqs])
    with pytest.raises(ValueError, match="built for 3 channels"):
        nat.decode_many([([b"\0" * 64], built, np.empty((4, 5), np.uint8))], 16)
    with pytest.raises(ValueError, match="sums to"):
        nat.build_decode_tables([np.full((2, 4), 7, np.uint16)])


@pytest.mark.parametrize("spans", [[(100, 110), (104, 130), (90, 101)],  # shipped-like
                                   [(0, 0), (255, 255), (7, 7)],           # the edges
                                   [(0, 255), (128, 129), (3, 3)]])
def test_narrow_spans_of_a_wide_alphabet(spans):
    """Tables cover only the symbols a stream uses (decode tables start at its lowest
    symbol); symbols outside every channel's span never appear, edges included."""
    rng = np.random.default_rng(len(spans[0]) + spans[0][0])
    rows = 300
    sym = np.stack([rng.integers(lo, hi + 1, rows) for lo, hi in spans * 7], 1).astype(np.uint8)
    levels = tables.levels_from_counts(tables.channel_counts(sym, 256))
    freqs = nat.normalize_freqs(levels)
    for row in range(len(levels)):
        assert list(freqs[row]) == ref_normalize(list(levels[row]))
    blobs = nat.encode(sym, freqs, 128)
    built, = nat.build_decode_tables([freqs])
    out = np.empty_like(sym)
    assert nat.decode_many([(blobs, built, out)], 128) == [None]
    np.testing.assert_array_equal(out, sym)
    np.testing.assert_array_equal(ref_decode(blobs[0], 128, sym.shape[1], freqs), sym[:128])


# -- the SIMD decoders against the scalar one (the same bitstream, bit for bit) ---------

def _use(path):
    return use_cpu_path(nat, path)


def _decode_with(path, items, chunk):
    assert _use(path)
    try:
        return nat.decode_many(items, chunk, 1)
    finally:
        _use("auto")


SIMD_PATHS = [p for p in SIMD_GATHER_PATHS if _use(p)]
_use("auto")
PATHS = ["scalar"] + SIMD_PATHS


@pytest.mark.parametrize("path", SIMD_GATHER_PATHS)
@pytest.mark.parametrize("seed", range(6))
def test_simd_decoder_equals_scalar(path, seed):
    """Random tables (wide and span-limited), channel counts with partial lane groups (of
    1 to 15 lanes, both sides of the few-lane scalar step), chunk ends so that up to 8
    blobs decode together, and damaged blobs: the same symbols or the same error."""
    if path not in SIMD_PATHS:
        pytest.skip(f"this CPU has no {path}")
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 300))
    channels = int(rng.choice([1, 4, 5, 15, 16, 17, 48, 192, 200]))
    alphabet = int(rng.choice([2, 16, 256]))
    sym, freqs = random_case(rng, rows, channels, alphabet, skew=float(rng.uniform(0.2, 3)))
    chunk = int(rng.choice([1, 7, 64, 256]))
    blobs = nat.encode(sym, freqs, chunk)
    damaged = []
    for b in blobs[:3]:
        if len(b) > 64:
            flipped = bytearray(b)
            flipped[int(rng.integers(64, len(b)))] ^= int(rng.integers(1, 256))
            damaged.append(bytes(flipped))
        damaged += [b[:-2], b + b"\0\0"]
    cases = [blobs] + [[d] for d in damaged]
    for blob_list in cases:
        n = min(rows, chunk * len(blob_list))
        outs = {}
        for p in ("scalar", path):
            out = np.zeros((n, channels), np.uint8)
            outs[p] = (_decode_with(p, [(blob_list, freqs, out)], chunk), out)
        assert outs["scalar"][0] == outs[path][0]
        if outs["scalar"][0] == [None]:
            np.testing.assert_array_equal(outs["scalar"][1], outs[path][1])
    out = np.empty_like(sym)
    assert _decode_with(path, [(blobs, freqs, out)], chunk) == [None]
    np.testing.assert_array_equal(out, sym)


@pytest.mark.parametrize("path", SIMD_GATHER_PATHS)
def test_simd_decoder_every_partial_group_width(path):
    """Every width of the last lane group (0-15 lanes: scalar steps up to 4, a masked
    vector step above), 9 blobs of a stream so that groups of 8, 4 and 1 decode."""
    if path not in SIMD_PATHS:
        pytest.skip(f"this CPU has no {path}")
    rng = np.random.default_rng(7)
    for rest in range(16):
        sym, freqs = random_case(rng, 63, 32 + rest, 256, skew=1.0)
        blobs = nat.encode(sym, freqs, 7)
        out = np.zeros_like(sym)
        assert _decode_with(path, [(blobs, freqs, out)], 7) == [None]
        np.testing.assert_array_equal(out, sym)


@pytest.mark.parametrize("path", PATHS)
def test_buckets_of_many_symbols_decode_on_every_path(path):
    """Widened tables (a store's shared tables: one-slot symbols beside each tail's most
    frequent symbol) make buckets of several symbols whose slots mostly belong to one of
    them, not to the first: every symbol of such a bucket decodes, on every path, with
    the one-slot ones too (walked to from the most frequent symbol, backwards and on)."""
    from kvcodec.format.shared import widen

    rng = np.random.default_rng(11)
    rows, channels = 400, 37
    centre = rng.integers(40, 200, channels)
    sym = np.clip(centre + np.rint(rng.normal(0, 1.5, (rows, channels))), 0, 255)
    levels = widen(tables.levels_from_counts(tables.channel_counts(sym.astype(np.uint8), 256)))
    freqs = nat.normalize_freqs(levels)
    # Every present symbol once per channel (rows 0..): the one-slot tails included.
    for c in range(channels):
        present = np.flatnonzero(freqs[c])
        sym[:len(present), c] = present
    sym = sym.astype(np.uint8)
    multi = [(freqs[c] == 1).sum() for c in range(channels)]
    assert min(multi) >= 4  # one-slot symbols on both sides of every channel
    blobs = nat.encode(sym, freqs, 64)
    out = np.zeros_like(sym)
    assert _decode_with(path, [(blobs, freqs, out)], 64) == [None]
    np.testing.assert_array_equal(out, sym)
    np.testing.assert_array_equal(ref_decode(blobs[0], 64, channels, freqs), sym[:64])


def test_tables_built_in_recycled_memory_decode_exactly():
    """Decode tables come from a pool of freed ones (no page faults on reuse): tables of
    other shapes and spans, built after the first ones are dropped, decode exactly."""
    rng = np.random.default_rng(12)
    first = [random_case(rng, 40, c, 256, skew=1.0)[1] for c in (193, 48, 385)]
    built = nat.build_decode_tables(first, 1)
    del built  # back to the pool
    for channels, alphabet in ((192, 256), (49, 16), (385, 256), (17, 2)):
        sym, freqs = random_case(rng, 70, channels, alphabet, skew=float(rng.uniform(0.3, 2)))
        tabs, = nat.build_decode_tables([freqs], 1)
        blobs = nat.encode(sym, freqs, 32)
        for path in PATHS:
            out = np.zeros_like(sym)
            assert _decode_with(path, [(blobs, tabs, out)], 32) == [None]
            np.testing.assert_array_equal(out, sym)


def test_simd_path_switch():
    assert nat.simd_path() == PATHS[-1].partition(":")[0]  # the best the CPU has
    for path in PATHS:
        simd, _, gather = path.partition(":")
        assert _use(path) and nat.simd_path() == simd
        assert nat.simd_gather() == (gather or nat.simd_gather())
    assert not nat.set_simd_path("neon")
    assert not nat.set_simd_gather("vector")
    assert _use("auto")


def test_gather_follows_the_environment_else_the_faster_on_this_cpu():
    """KVCODEC_GATHER picks how the SIMD paths read their tables for a process; without
    it (or with a name it does not know), each path's first decode times both ways on
    synthetic blobs and keeps the faster: on a 2-core Xeon VM whose gathers are slow,
    no CPU model list named it, and the AVX2 path ran 2.2x slower with gathers."""
    import subprocess
    import sys

    code = ("from kvcodec.core.tables import native; n = native()\n"
            "for p in ('avx512', 'avx2'):\n"
            "    if n.set_simd_path(p): print(p, n.simd_gather(), *n.gather_probe())")

    def run(value):
        env = {k: v for k, v in os.environ.items() if k != "KVCODEC_GATHER"}
        if value is not None:
            env["KVCODEC_GATHER"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.split("\n")
        return [line.split() for line in out if line]

    if not SIMD_PATHS:
        pytest.skip("no SIMD decode path on this CPU")
    for forced in ("loads", "hardware"):
        assert {g for _, g, *_ in run(forced)} == {forced}
    for value in (None, "bogus"):
        for path, gather, hardware_s, loads_s in run(value):
            hardware_s, loads_s = float(hardware_s), float(loads_s)
            assert hardware_s > 0 and loads_s > 0, path  # the probe decoded both ways
            assert gather == ("loads" if loads_s < hardware_s else "hardware"), path
    # The scalar path has no tables to gather from: nothing measured.
    try:
        assert _use("scalar") and nat.gather_probe() == (0.0, 0.0)
    finally:
        _use("auto")


# -- decoding many blobs at once, fused dequantization, table unpacking -----------------

def _fused_case(rng, rows, heads, head_dim, half_range=7, add=None):
    """Symbols of a per-token-step uniform stream (last column: the step code) and its
    dequantizer arguments (``add``: a centered stream's channel means), writing into a
    fresh [heads, rows, head_dim] array."""
    c = heads * head_dim
    sym = np.concatenate([rng.integers(0, 2 * half_range + 1, (rows, c)),
                          rng.integers(0, 256, (rows, 1))], 1).astype(np.uint8)
    levels = tables.levels_from_counts(tables.channel_counts(sym, 256))
    freqs = nat.normalize_freqs(levels)
    grid = np.geomspace(1e-3, 10, 256).astype(np.float32)
    mult = rng.uniform(0.5, 2, c).astype(np.float32)
    ang = rng.uniform(0, 6.3, (rows, head_dim // 2))
    cos = np.ascontiguousarray(np.concatenate([np.cos(ang)] * 2, 1), dtype=np.float32)
    sin = np.ascontiguousarray(np.concatenate([np.sin(ang)] * 2, 1), dtype=np.float32)

    def deq(out):
        return (grid, mult, half_range, heads, out, cos, sin) + (() if add is None else (add,))
    return sym, freqs, deq


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: not a multiple of 16, scalar only
def test_fused_dequant_same_on_both_paths_and_without_kept_symbols(head_dim, centered):
    """Every path, symbols kept or not, into an output aligned for the AVX2 path's
    streaming stores or one float off (its plain stores): the same bits."""
    rng = np.random.default_rng(head_dim)
    rows, heads, chunk = 300, 3, 128
    add = rng.normal(0, 50, heads * head_dim).astype(np.float32) if centered else None
    sym, freqs, deq = _fused_case(rng, rows, heads, head_dim, add=add)
    blobs = nat.encode(sym, freqs, chunk)
    got = {}
    for path in PATHS:
        for keep, shift in ((True, 0), (False, 0), (False, 1)):
            base = np.zeros(heads * rows * head_dim + 16, np.float32)
            at = (-base.ctypes.data // 4) % 8 + shift  # 32-byte aligned, plus shift floats
            out = base[at:at + heads * rows * head_dim].reshape(heads, rows, head_dim)
            assert (out.ctypes.data % 32 == 0) == (shift == 0)
            target = np.empty_like(sym) if keep else sym.shape
            assert _decode_with(path, [(blobs, freqs, target, deq(out))], chunk) == [None]
            if keep:
                np.testing.assert_array_equal(target, sym)
            got[path, keep, shift] = out
    ref = next(iter(got.values()))
    for out in got.values():
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))  # bit for bit
    # The reconstruction itself: (s - R) * (grid[code] * mult) (+ add), then rotate_half
    # RoPE.
    x = ((sym[:, :-1].astype(np.float32) - 7)
         * (deq(None)[0][sym[:, -1]][:, None] * deq(None)[1]))
    if centered:
        x = x + add
    x = x.reshape(rows, heads, head_dim)
    cos, sin = deq(None)[5], deq(None)[6]
    half = head_dim // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    np.testing.assert_allclose(ref, (x * cos[:, None] + rot * sin[:, None]).transpose(1, 0, 2),
                               rtol=1e-5, atol=1e-5)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as PyTorch casts (round to nearest even)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: the scalar path on every CPU
def test_fused_dequant_writes_bfloat16_and_rows_heads_apart(head_dim, rotate):
    """The decoder writes float32 or bfloat16 (uint16 bits, rounded as PyTorch casts,
    ties to even included), into [heads, rows, head_dim] or [rows, heads, head_dim]
    (vLLM's order): the same values as float32 [heads, rows, head_dim], on every path."""
    rng = np.random.default_rng(head_dim)
    rows, heads, chunk = 300, 3, 128
    sym, freqs, deq = _fused_case(rng, rows, heads, head_dim)
    grid, mult, r, h, _, cos, sin = deq(None)
    if not rotate:  # steps whose values are exact bfloat16 ties (1 + k/256, k odd)
        grid = np.float32(1) + np.arange(256, dtype=np.float32) / 256
        mult = np.ones_like(mult)
        cos = sin = None
    blobs = nat.encode(sym, freqs, chunk)
    for path in PATHS:
        outs = {"ref": np.zeros((heads, rows, head_dim), np.float32),
                "bf16": np.zeros((heads, rows, head_dim), np.uint16),
                "rows f32": np.zeros((rows, heads, head_dim), np.float32).transpose(1, 0, 2),
                "rows bf16": np.zeros((rows, heads, head_dim), np.uint16).transpose(1, 0, 2)}
        for out in outs.values():
            assert _decode_with(path, [(blobs, freqs, sym.shape,
                                        (grid, mult, r, h, out, cos, sin))], chunk) == [None]
        ref = outs["ref"]
        assert np.array_equal(outs["rows f32"].view(np.uint32), ref.view(np.uint32)), path
        for name in ("bf16", "rows bf16"):
            assert np.array_equal(outs[name], _bf16_bits(ref)), (path, name)
        if not rotate:  # ties were there to round, and went to the even neighbour
            ties = (ref.view(np.uint32) & 0x1FFFF) == 0x8000
            assert ties.any() and not (outs["bf16"][ties] & 1).any()


@pytest.mark.parametrize("klt", [False, True])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: the scalar path on every CPU
def test_fused_dequant_places_rows_in_a_paged_cache(head_dim, klt):
    """``(flat, head_stride, chan, row_at)``: each row lands where ``row_at`` says in a
    flat array (vLLM's CPU blocks: values ``[heads, block, head_dim]``, keys ``[heads,
    head_dim, block]``, channels ``block`` apart; its AMX blocks, ``chan`` a table of
    each channel's place: keys ``[head_dim / 2, block, 2]``, values by sixteen channels
    with two tokens interleaved), in any block order, rows with a negative entry not
    stored: the same bits as the plain output there, float32 and bfloat16, every path,
    and nothing written anywhere else."""
    rng = np.random.default_rng(head_dim + klt)
    rows, heads, chunk, bs = 300, 3, 128, 16
    sym, freqs, deq = _fused_case(rng, rows, heads, head_dim)
    extra = (None, 0, rng.normal(size=(heads, head_dim, head_dim)).astype(np.float32)) \
        if klt else ()
    blobs = nat.encode(sym, freqs, chunk)
    nb = -(-rows // bs) + 2
    order = rng.permutation(nb)[:-(-rows // bs)]  # each block of rows somewhere
    slot = order[np.arange(rows) // bs] * bs + np.arange(rows) % bs
    skip = rng.random(rows) < 0.1
    t, c, d16 = slot % bs, np.arange(head_dim), -(-head_dim // 16) * 16  # AMX: tiles of 16
    layouts = {"values": (2 * bs * head_dim, 1, bs * head_dim + t * head_dim),
               "keys": (2 * bs * head_dim, bs, t),
               "amx keys": (2 * bs * d16, (c >> 1) * 2 * bs + (c & 1), 2 * t),
               "amx values": (2 * bs * d16, (c >> 4) * 16 * bs + (c & 15) * 2,
                              bs * d16 + (t >> 1) * 32 + (t & 1))}
    for path in PATHS:
        ref = np.zeros((heads, rows, head_dim), np.float32)
        assert _decode_with(path, [(blobs, freqs, sym.shape, deq(ref) + extra)],
                            chunk) == [None]
        for name, (hs, cs, inner) in layouts.items():
            block = heads * hs  # [heads, 2 * block, head_dim] per block
            at = (slot // bs) * block + inner
            at[skip] = -1
            chans = c * cs if np.isscalar(cs) else cs
            idx = (at[None, :, None] + np.arange(heads)[:, None, None] * hs
                   + chans[None, None, :])[:, ~skip]
            for dtype, want in ((np.float32, ref), (np.uint16, _bf16_bits(ref))):
                flat = np.full(nb * block, 7, dtype)
                assert _decode_with(path, [(blobs, freqs, sym.shape,
                                            deq((flat, hs, cs, at)) + extra)], chunk) == [None]
                assert np.array_equal(flat[idx], want[:, ~skip]), (path, name, dtype)
                rest = np.ones(flat.shape, bool)
                rest[idx.ravel()] = False
                assert (flat[rest] == 7).all(), (path, name, dtype)


@pytest.mark.parametrize("klt", [False, True])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: the scalar path on every CPU
def test_fused_dequant_writes_sink_rows(head_dim, klt):
    """``(..., sinks, sink_every, sink_rows)``: the first ``sink_rows`` rows of every
    ``sink_every`` (entries decoded as one stream) take their exact values, not their
    symbols' (no basis, no channel offsets), rotated and stored as any row, in chunks
    that start inside a block; the other rows as without sinks, bit for bit, on every
    path, float32 and bfloat16."""
    rng = np.random.default_rng(7 + klt)
    rows, heads, chunk, every, n = 300, 3, 128, 100, 2
    c, half = heads * head_dim, head_dim // 2
    sym, freqs, deq = _fused_case(rng, rows, heads, head_dim)
    grid, mult, r, h, _, cos, sin = deq(None)
    add = rng.normal(0, 5, (3, c)).astype(np.float32)  # each block's offsets
    basis = rng.normal(size=(heads, head_dim, head_dim)).astype(np.float32) if klt else None
    sinks = rng.normal(0, 3, (3 * n, c)).astype(np.float32)
    blobs = nat.encode(sym, freqs, chunk)
    at = np.flatnonzero(np.arange(rows) % every < n)
    x = sinks.reshape(3 * n, heads, head_dim).transpose(1, 0, 2)
    cs, sn = cos[at], sin[at]
    want = np.concatenate([x[..., :half] * cs[:, :half] + -x[..., half:] * sn[:, :half],
                           x[..., half:] * cs[:, half:] + x[..., :half] * sn[:, half:]], -1)
    args = (grid, mult, r, h)
    for path in PATHS:
        plain = np.zeros((heads, rows, head_dim), np.float32)
        assert _decode_with(path, [(blobs, freqs, sym.shape,
                                    args + (plain, cos, sin, add, every, basis))],
                            chunk) == [None]
        plain[:, at] = want
        for dtype, exp in ((np.float32, plain), (np.uint16, _bf16_bits(plain))):
            out = np.zeros((heads, rows, head_dim), dtype)
            assert _decode_with(path, [(blobs, freqs, sym.shape, args + (
                out, cos, sin, add, every, basis, sinks, every, n))], chunk) == [None]
            assert np.array_equal(out.view(np.uint8), exp.view(np.uint8)), (path, dtype)
    with pytest.raises(ValueError, match="sink"):
        nat.decode_many([(blobs, freqs, sym.shape, args + (
            plain, cos, sin, add, every, basis, sinks[:-1], every, n))], chunk)


def test_fused_dequant_refuses_placed_rows_past_the_end():
    rng = np.random.default_rng(2)
    rows, heads, d, chunk = 40, 2, 16, 64
    sym, freqs, deq = _fused_case(rng, rows, heads, d)
    blobs = nat.encode(sym, freqs, chunk)
    flat = np.zeros(rows * heads * d, np.float32)
    at = np.arange(rows, dtype=np.int64) * heads * d
    last = at.copy()
    last[-1] += 1  # its last head's last channel one past the end
    bad = {"past the end": (flat, d, 1, last),
           "int64": (flat, d, 1, at.astype(np.int32)),
           "1-D": (flat.reshape(rows, -1), d, 1, at),
           "strides": (flat, -1, 1, at),
           "expected an array or": (flat, d, at),
           # a channel table: each place inside the output, one per channel, int64
           "chan_at: out of the output": (flat, d, np.r_[-1, np.arange(1, d)], at),
           "16 channels": (flat, d, np.arange(d - 1), at),
           "chan_at: expected": (flat, d, np.arange(d, dtype=np.int32), at),
           "written past the end": (flat, d, np.r_[np.arange(d - 1), len(flat) - 1], at)}
    for why, out in bad.items():
        with pytest.raises(ValueError, match=why):
            nat.decode_many([(blobs, freqs, sym.shape, deq(out))], chunk)
    assert nat.decode_many([(blobs, freqs, sym.shape, deq((flat, d, 1, at)))], chunk) == [None]


def test_fused_dequant_refuses_outputs_it_cannot_write():
    rng = np.random.default_rng(1)
    rows, heads, d, chunk = 40, 2, 16, 64
    sym, freqs, deq = _fused_case(rng, rows, heads, d)
    blobs = nat.encode(sym, freqs, chunk)
    base = np.zeros(rows * heads * d * 2, np.float32)
    bad = {
        "float32 or uint16": np.zeros((heads, rows, d), np.float16),
        "overlap": np.lib.stride_tricks.as_strided(base, (heads, rows, d), (4 * d, 4 * d, 4)),
        "contiguous": np.zeros((heads, rows, 2 * d), np.float32)[:, :, ::2],
    }
    for why, out in bad.items():
        with pytest.raises(ValueError, match=why):
            nat.decode_many([(blobs, freqs, sym.shape, deq(out))], chunk)


@pytest.mark.parametrize("head_dim", [64, 24])
def test_fused_dequant_with_one_offset_row_per_block_of_rows(head_dim):
    """``add_rows``: entries decoded as one stream, each centered on its own means, add
    offset row ``i`` to rows ``[i * add_rows, (i + 1) * add_rows)``: the same bits as
    decoding each block with its own row, on every path; a wrong size is refused."""
    rng = np.random.default_rng(3)
    rows, heads, chunk = 300, 2, 128
    c = heads * head_dim
    adds = rng.normal(0, 50, (3, c)).astype(np.float32)
    sym, freqs, deq = _fused_case(rng, rows, heads, head_dim)
    blobs = nat.encode(sym, freqs, chunk)
    for path in PATHS:
        out = np.zeros((heads, rows, head_dim), np.float32)
        assert _decode_with(path, [(blobs, freqs, sym.shape, deq(out) + (adds, chunk))],
                            chunk) == [None]
        for i in range(3):
            one = np.zeros((heads, rows, head_dim), np.float32)
            assert _decode_with(path, [(blobs, freqs, sym.shape, deq(one) + (adds[i],))],
                                chunk) == [None]
            block = slice(i * chunk, (i + 1) * chunk)
            assert np.array_equal(out[:, block].view(np.uint32), one[:, block].view(np.uint32))
    for bad in ((adds[:2], chunk), (adds, -1), (adds[0], chunk)):
        with pytest.raises(ValueError, match="add"):
            nat.decode_many([(blobs, freqs, sym.shape,
                              deq(np.zeros((heads, rows, head_dim), np.float32)) + bad)], chunk)


def test_fused_dequant_reports_symbols_outside_the_quantizer_range():
    rng = np.random.default_rng(5)
    sym, freqs, deq = _fused_case(rng, 40, 3, 64)
    sym[17, 5 + 64] = sym[20, 5] = 200  # > 2R, in the second head first
    levels = tables.levels_from_counts(tables.channel_counts(sym, 256))
    freqs = nat.normalize_freqs(levels)
    blobs = nat.encode(sym, freqs, 16)
    placed = (np.zeros(40 * 3 * 64, np.float32), 64, 40, np.arange(40, dtype=np.int64))
    for out in (np.zeros((3, 40, 64), np.float32), placed):  # placed: channels apart
        errs = {path: _decode_with(path, [(blobs, freqs, sym.shape, deq(out))], 16)
                for path in PATHS}
        for err in errs.values():
            assert err[0] is not None and "token 17" in err[0] and "outside the quantizer" \
                in err[0]


def test_many_one_blob_jobs_decode_together_and_fail_alone():
    """A chunk of many streams (one blob each, different tables, as the streaming loader
    decodes): the SIMD paths decode up to 4 (AVX2) or 8 (AVX-512) of the same channels at
    a time; a damaged blob fails only its own job, with the error the scalar path gives."""
    rng = np.random.default_rng(11)
    items, syms = [], []
    for j, channels in enumerate([193] * 10 + [48, 193, 48] + [193] * 6):
        sym, freqs = random_case(rng, 64, channels, 256, skew=float(rng.uniform(0.5, 2)))
        blob = nat.encode(sym, freqs, 64)
        if j == 4:
            blob = [blob[0][:-2]]  # truncated
        items.append((blob, freqs))
        syms.append(sym)
    results = {}
    for path in PATHS:
        outs = [np.zeros_like(s) for s in syms]
        errs = _decode_with(path, [(b, f, o) for (b, f), o in zip(items, outs)], 64)
        results[path] = errs
        for j, (err, out, sym) in enumerate(zip(errs, outs, syms)):
            if j == 4:
                assert err is not None and err.startswith("blob 0:")
            else:
                assert err is None
                np.testing.assert_array_equal(out, sym)
    assert len(set(map(tuple, results.values()))) == 1


@pytest.mark.parametrize("path", SIMD_GATHER_PATHS)
def test_blobs_of_different_rows_decode_together(path):
    """Streams whose last chunk is shorter than the others (1 to 9 chunks of 16 rows, the
    last of 1 to 16), beside one-chunk streams of other lengths: a SIMD group takes blobs
    of the same channels whatever their rows, all of them over the rows they share, then
    the longer ones on. The scalar path's symbols; a damaged short blob (truncated, or a
    flipped byte) fails its own stream only, with the scalar path's error."""
    if path not in SIMD_PATHS:
        pytest.skip(f"this CPU has no {path}")
    rng = np.random.default_rng(23)
    rows = [16 * int(rng.integers(0, 9)) + int(rng.integers(1, 17)) for _ in range(14)]
    rows += [int(rng.integers(1, 17)) for _ in range(9)]
    items, syms = [], []
    for j, n in enumerate(rows):
        sym, freqs = random_case(rng, n, 48 if j % 7 == 3 else 193, 256,
                                 skew=float(rng.uniform(0.5, 2)))
        blobs = nat.encode(sym, freqs, 16)
        if j == 5:
            blobs[-1] = blobs[-1][:-2]
        if j == 16 and len(blobs[-1]) > 64:
            flipped = bytearray(blobs[-1])
            flipped[len(flipped) // 2] ^= 0x5A
            blobs[-1] = bytes(flipped)
        items.append((blobs, freqs))
        syms.append(sym)
    results = {}
    for p in ("scalar", path):
        outs = [np.zeros_like(s) for s in syms]
        results[p] = _decode_with(p, [(b, f, o) for (b, f), o in zip(items, outs)], 16)
        for j, (err, out, sym) in enumerate(zip(results[p], outs, syms)):
            if j == 5:
                assert err is not None and err.startswith(f"blob {len(items[j][0]) - 1}:")
            elif err is None:
                np.testing.assert_array_equal(out, sym)
    assert results["scalar"] == results[path]
    assert sum(e is None for e in results[path]) >= len(rows) - 2


def test_level_tables_pack_and_unpack():
    rng = np.random.default_rng(3)
    levels = np.zeros((50, 256), np.uint8)
    for r in range(50):
        lo = int(rng.integers(0, 200))
        hi = lo + int(rng.integers(0, 56))
        levels[r, lo:hi + 1] = rng.integers(0, 64, hi - lo + 1)
        levels[r, lo] = levels[r, hi] = int(rng.integers(1, 64))
    packed = tables.pack_levels(levels)
    np.testing.assert_array_equal(tables.unpack_levels(packed, 50, 256), levels)
    spans = 2 * 50
    bad = {
        "table spans are truncated": packed[:spans - 1],
        "table codes do not match their spans": packed[:-1],
        "a table span lies outside the alphabet": bytes([5, 3]) + packed[2:],
        "a table level is out of range": packed[:spans] + bytes([64]) + packed[spans + 1:],
        "does not start and end on present symbols": packed[:spans] + b"\0" + packed[spans + 1:],
    }
    for message, data in bad.items():
        with pytest.raises(ValueError, match=message):
            tables.unpack_levels(data, 50, 256)


def test_crc32_is_zlibs():
    """The container's checksums (native, folded 16 bytes at a time where the CPU can)
    equal zlib.crc32 for every length around the fold's steps, any start and any
    initial value; a buffer that is not contiguous is refused as zlib refuses it."""
    import zlib

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    lengths = list(range(0, 300)) + [1023, 1024, 1025, 65535, 65536, 65537, 1 << 20]
    for n in lengths:
        start = int(rng.integers(0, 17)) if n < len(data) - 16 else 0
        view = memoryview(data)[start:start + n]
        for crc in (0, int(rng.integers(0, 1 << 32))):
            assert nat.crc32(view, crc) == zlib.crc32(view, crc), (n, start, crc)
    assert nat.crc32(np.arange(12, dtype=np.int64)) == zlib.crc32(np.arange(12, dtype=np.int64))
    with pytest.raises(BufferError):
        nat.crc32(memoryview(data)[::2])


def test_crc32_items_names_the_first_item_that_does_not_check():
    import zlib

    data = bytes(range(256)) * 40
    starts = np.array([0, 100, 100, 5000], dtype=np.uint64)
    sizes = np.array([100, 0, 4900, 5240], dtype=np.uint64)
    crcs = np.array([zlib.crc32(data[s:s + z]) for s, z in zip(starts, sizes)], np.uint32)
    assert nat.crc32_items(data, starts, sizes, crcs) == -1
    flipped = bytearray(data)
    flipped[5001] ^= 1
    assert nat.crc32_items(bytes(flipped), starts, sizes, crcs) == 3
    assert nat.crc32_items(data[:10239], starts, sizes, crcs) == 3  # not whole: short
    huge = sizes.copy()
    huge[2] = np.uint64(1 << 63)  # start + size would wrap around
    assert nat.crc32_items(data, starts, huge, crcs) == 2
    with pytest.raises(ValueError):
        nat.crc32_items(data, starts, sizes[:3], crcs)
