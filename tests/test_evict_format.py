"""Evicted caches in .kvc files (format version 4): each head's kept positions round trip
exactly, only kept tokens are coded, keys are re-rotated at their true positions, chunk
ranges decode their token spans, damaged files fail with typed errors, and the dense
paths (vLLM, the GPU decoder, the chunk store) refuse evicted caches."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import zstandard

import kvcodec
from kvcodec.core.config import load_config, resolve_layers
from kvcodec.core.kvcache import KVCache
from kvcodec.core.quant import fit_stream, make_quantizer
from kvcodec.core.streams import KINDS, step_multipliers
from kvcodec.core.transforms import applied_key_transform, layer_ropes, rope, shift
from kvcodec.errors import BackendError, CorruptError, FormatError, ShapeError
from kvcodec.format import container
from kvcodec.format.kept import head_spec

L, H, T, D = 2, 3, 100, 16
CHUNK = 32  # 4 chunks, the last partial
THETA = {"rope_theta": 10000.0}  # a fingerprint recording default RoPE: keys rope_strip'ed
# A head keeping 1 token, one keeping all, one keeping a few; then 0, 40 and 7.
COUNTS = [[1, T, 17], [0, 40, 7]]
# Per-token steps fine enough that a key rotated at a wrong position shows.
FINE = {"key_transform": {"type": "rope_strip"}, "sink_tokens": 1,
        "key": [{"quantizer": {"type": "uniform", "scale": "token", "step": 0.04, "bins": 255}}],
        "value": [{"quantizer": {"type": "uniform", "scale": "token", "step": 0.04,
                                 "bins": 255}}]}


def dense(dtype=torch.float32, seed=0, n=T, heads=H, dim=D, layers=L) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    kv = [torch.randn(1, heads, n, dim, generator=gen).to(dtype) for _ in range(2 * layers)]
    imp = torch.rand(layers, n, generator=gen) + 0.01
    return KVCache(kv[:layers], kv[layers:], list(range(n)), importance=imp)


def evict(kv: KVCache, counts, seed=0) -> KVCache:
    """``kv`` keeping ``counts[l][h]`` random positions of each head (position 0, the
    attention sink, always among them where a head keeps any)."""
    gen = torch.Generator().manual_seed(seed)
    n = kv.num_tokens
    kept, keys, values = [], [], []
    for k, v, per_head in zip(kv.keys, kv.values, counts):
        pos = torch.full((len(per_head), max(per_head)), -1, dtype=torch.int64)
        for h, c in enumerate(per_head):
            chosen = torch.cat([torch.zeros(1, dtype=torch.int64),
                                1 + torch.randperm(n - 1, generator=gen)[:c - 1]])[:c]
            pos[h, :c] = torch.sort(chosen).values
        idx = pos.clamp(min=0)[None, :, :, None].expand(1, -1, -1, k.shape[3])
        valid = (pos >= 0)[None, :, :, None]
        keys.append(torch.where(valid, k.gather(2, idx), 0))
        values.append(torch.where(valid, v.gather(2, idx), 0))
        kept.append(pos)
    return KVCache(keys, values, kv.token_ids, kv.model, kv.importance, length=n, kept=kept)


def reference(kv: KVCache, config, model=None, offset: int = 0) -> dict:
    """What decoding an evicted cache must return, in plain PyTorch: per head, its kept
    rows un-rotated at their true positions, quantized, dequantized, sink rows restored
    from fp16 and rotated back (the coder is lossless, so decode must match exactly)."""
    cfg = load_config(config, model=model)
    specs = resolve_layers(cfg, kv.num_layers)
    xform, cfg = applied_key_transform(cfg, model, kv.num_layers, offset, kv.num_tokens)
    ropes = layer_ropes(xform, kv.num_layers, kv.head_dim)
    n_sink = min(cfg.get("sink_tokens", 0), kv.num_tokens)
    out = {k: [] for k in KINDS}
    for l, kept in enumerate(kv.kept):
        for kind, src in zip(KINDS, (kv.keys, kv.values)):
            layer = torch.zeros(src[l].shape)
            for h, row in enumerate(kept):
                pos = row[row >= 0]
                r = ropes[l] if kind == "key" else None
                x = src[l][:, h:h + 1, :len(pos)].float()
                x = (x if r is None else rope(x, r, pos + offset, inverse=True))[0, 0]
                q = make_quantizer(head_spec(specs[kind][l], h, kv.num_kv_heads,
                                             kv.head_dim), kv.dtype)
                sinks = int((pos < n_sink).sum())
                params = fit_stream(q, x, sinks)
                mult = step_multipliers(cfg, kv.importance[:, pos], l, sinks)
                y = q.dequantize(torch.from_numpy(q.quantize(x, params, mult)[0]), params, None)
                y[:sinks] = x[:sinks].half().float()
                layer[0, h, :len(pos)] = y if r is None else rope(y[None, None], r, pos + offset)[0, 0]
            out[kind].append(layer)
    return out


def held(kv: KVCache, l: int, h: int, kind: str = "key"):
    """``(positions, rows)`` head ``h`` of layer ``l`` keeps."""
    pos = kv.kept[l][h]
    src = kv.keys if kind == "key" else kv.values
    return pos[pos >= 0], src[l][0, h, :int((pos >= 0).sum())]


@pytest.fixture(scope="module")
def cache():
    return evict(dense(), COUNTS)


@pytest.fixture(scope="module")
def default_file(cache):
    return kvcodec.encode(cache, config="default", model=THETA, chunk_tokens=CHUNK)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lossless_round_trip_is_exact(dtype):
    kv = evict(dense(dtype), COUNTS)
    data = kvcodec.encode(kv, config="lossless", chunk_tokens=CHUNK)
    assert int.from_bytes(data[8:12], "little") == 4
    with kvcodec.open(data) as f:
        assert f.evicted and f.header["evicted"] is True and f.num_tokens == T
        assert torch.equal(f.kept_counts(), kv.kept_counts())
        assert f.numel() == kv.numel() == 2 * L * H * T * D
        assert f.bits_per_element() == len(data) * 8 / kv.numel()
        out = f.decode()
    assert out.evicted and out.dtype == dtype and out.length == T
    assert out.token_ids == kv.token_ids
    for l in range(L):
        assert torch.equal(out.kept[l], kv.kept[l])
        assert torch.equal(out.keys[l], kv.keys[l]) and torch.equal(out.values[l], kv.values[l])


def test_default_matches_the_plain_pytorch_reference(cache, default_file):
    with kvcodec.open(default_file) as f:
        assert f.key_transform == {"type": "rope_strip", "theta": 10000.0}
        assert f.sink_tokens == 1
        out = f.decode()
    ref = reference(cache, "default", THETA)
    for l in range(L):
        assert torch.equal(out.kept[l], cache.kept[l])
        assert torch.equal(out.keys[l], ref["key"][l])
        assert torch.equal(out.values[l], ref["value"][l])


def test_default_error_is_small_and_sinks_are_fp16(cache, default_file):
    out = kvcodec.decode(default_file)
    for l in range(L):
        for kind in KINDS:
            src = cache.keys if kind == "key" else cache.values
            dec = out.keys if kind == "key" else out.values
            err = (dec[l] - src[l]).pow(2).mean().sqrt() / src[l].pow(2).mean().sqrt()
            # The default's value step is 1.1 token RMS: uniform rounding error is
            # step / sqrt(12) = 0.32 of it on this random data.
            assert err < 0.35, (l, kind, float(err))
            for h in range(H):
                pos, rows = held(out, l, h, kind)
                if len(pos):  # position 0 is kept, and an fp16 sink
                    assert pos[0] == 0
                    exact = held(cache, l, h, kind)[1][0]
                    assert torch.allclose(rows[0], exact, atol=2e-3, rtol=1e-3)


def test_a_calibrated_head_scale_applies_per_head():
    cfg = load_config("default")
    cfg["key"] = [{"quantizer": {"type": "uniform", "scale": "token", "step": 0.3, "bins": 255,
                                 "head_scale": [0.5, 1.0, 2.0]}}]
    kv = evict(dense(), COUNTS)
    out = kvcodec.decode(kvcodec.encode(kv, config=cfg, model=THETA, chunk_tokens=CHUNK))
    ref = reference(kv, cfg, THETA)
    for l in range(L):
        assert torch.equal(out.keys[l], ref["key"][l])
    assert head_spec(cfg["key"][0]["quantizer"], 2, 3, D)["head_scale"] == [2.0]
    spread = head_spec({"head_scale": [1.0, 2.0]}, 1, 4, 2)  # two heads per entry
    assert spread["head_scale"] == [1.0]


def test_keys_come_back_rotated_at_their_true_positions():
    kv = evict(dense(), COUNTS)
    for offset in (0, 1000):
        data = kvcodec.encode(kv, config=FINE, model=THETA, chunk_tokens=CHUNK,
                              position_offset=offset)
        with kvcodec.open(data) as f:
            out = f.decode()
            moved = f.decode(position_offset=offset + 77)
        for l in range(L):
            scale = kv.keys[l].abs().max()
            assert (out.keys[l] - kv.keys[l]).abs().max() < 0.05 * scale
            # Placed 77 positions later: each key is turned by 77 positions.
            turned = shift(kv.keys[l], layer_ropes({"type": "rope_strip", "theta": 1e4},
                                                   1, D)[0], 77)
            assert (moved.keys[l] - turned).abs().max() < 0.05 * scale
            assert torch.equal(moved.values[l], out.values[l])
    # Rotated back at slot indices instead of positions, the keys would be far off.
    pos, rows = held(kv, 0, 2)
    wrong = rope(rope(rows[None, None], 10000.0, pos, inverse=True), 10000.0)
    assert (wrong - rows).abs().max() > 0.5 * rows.abs().max()


def test_chunk_ranges_decode_their_token_spans(default_file):
    with kvcodec.open(default_file) as f:
        full = f.decode()
        for chunks, (t0, t1) in [(0, (0, 32)), (range(1, 3), (32, 96)), (3, (96, 100)),
                                 (slice(2, None), (64, 100))]:
            part = f.decode(chunks=chunks)
            assert part.length == t1 - t0 and part.token_ids == list(range(t0, t1))
            for l in range(L):
                for h in range(H):
                    pos, rows = held(full, l, h)
                    inside = (pos >= t0) & (pos < t1)
                    ppos, prows = held(part, l, h)
                    assert torch.equal(ppos, pos[inside] - t0)
                    assert torch.equal(prows, rows[inside])
                    assert torch.equal(held(part, l, h, "value")[1],
                                       held(full, l, h, "value")[1][inside])


def test_only_kept_tokens_are_coded():
    kv = dense(n=512, dim=64, heads=2)
    full = [[512, 512]] * L
    tenth = [[51, 51]] * L
    size = {name: len(kvcodec.encode(evict(kv, counts), config="default", model=THETA))
            for name, counts in (("full", full), ("tenth", tenth))}
    assert size["tenth"] < 0.2 * size["full"]
    # Keeping everything costs about what the dense file does.
    assert size["full"] < 1.1 * len(kvcodec.encode(kv, config="default", model=THETA))
    with kvcodec.open(kvcodec.encode(evict(kv, tenth), config="default", model=THETA)) as f:
        info = f.summary()
        assert info["evicted"] and info["kept_fraction"] == pytest.approx(51 / 512)
        assert info["elements"] == 2 * L * 2 * 512 * 64
        assert info["bits_per_element"] < 0.2 * 16


def test_dense_files_stay_version_3(cache):
    """Dense files are version 3 (5 where the config centers a stream: the default)."""
    data = kvcodec.encode(dense(), config="cachegen", model=THETA, chunk_tokens=CHUNK)
    assert int.from_bytes(data[8:12], "little") == 3
    data = kvcodec.encode(dense(), config="default", model=THETA, chunk_tokens=CHUNK)
    assert int.from_bytes(data[8:12], "little") == 5
    with kvcodec.open(data) as f:
        assert not f.evicted and "evicted" not in f.header and "kept" not in f.source.sections
        assert f.summary()["kept_fraction"] == 1.0
        assert torch.equal(f.kept_counts(), torch.full((L, H), T))


# -- damaged files --------------------------------------------------------------------

def split(data):
    hlen = container.PREAMBLE.unpack_from(data)[2]
    return json.loads(data[24:24 + hlen])


def rebuild(data, replace: dict, header=None, version: int | None = None) -> bytes:
    """``data`` re-serialized with sections replaced (valid checksums, lying contents), as
    format ``version`` (default: the original's)."""
    head = split(data)
    version = version or int.from_bytes(data[8:12], "little")
    with kvcodec.open(data) as f:
        sections = [(e["name"], replace.get(e["name"], f.source.read_section(e["name"])),
                     e["crc32"] is not None) for e in head["sections"]
                    if replace.get(e["name"], b"") is not None]
    for k in ("sections", "data_length"):
        head.pop(k)
    head.update(header or {})
    return container.build(head, sections, version)


def kept_bits(data) -> np.ndarray:
    with kvcodec.open(data) as f:
        return f.meta.kept.copy()


def open_all(data):
    with kvcodec.open(data) as f:
        return f.decode()


def test_damaged_kept_section_names_the_file(tmp_path, default_file):
    head = split(default_file)
    start = len(default_file) - head["data_length"]
    entry = next(e for e in head["sections"] if e["name"] == "kept")
    bad = bytearray(default_file)
    bad[start + entry["offset"] + entry["length"] // 2] ^= 0x10
    path = tmp_path / "bad.kvc"
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptError, match=r"bad\.kvc.*kept"):
        kvcodec.open(path)


@pytest.mark.parametrize("cut", [100, 2000, -1])
def test_truncated_evicted_files(default_file, cut):
    with pytest.raises(CorruptError, match="truncat"):
        open_all(default_file[:cut])


def test_kept_sections_that_lie(default_file):
    z = zstandard.ZstdCompressor().compress
    bits = kept_bits(default_file)
    past = bits.copy()
    past[0, 0, -1] |= 1  # position 103 of 100
    cases = {
        "past": z(past.tobytes()),
        "size": z(bits.tobytes()[:-1]),
        "not zstd": b"\x00" * 16,
    }
    for what, body in cases.items():
        with pytest.raises(CorruptError, match="kept") as info:
            open_all(rebuild(default_file, {"kept": body}))
        assert "numpy" not in str(info.value), what
    fewer = bits.copy()
    fewer[0, 1, :] = 0  # a head's rows dropped from the bitmap but not from the payload
    more = bits.copy()
    more[1, 0, :4] = 0xFF  # rows the payload does not hold
    for lie in (fewer, more):
        with pytest.raises(CorruptError):
            open_all(rebuild(default_file, {"kept": z(lie.tobytes())}))
    with pytest.raises(CorruptError, match="missing section 'kept'"):
        open_all(rebuild(default_file, {"kept": None}))
    with pytest.raises(CorruptError, match="evicted"):
        open_all(rebuild(default_file, {}, version=3))
    with pytest.raises(CorruptError, match="evicted"):
        open_all(rebuild(default_file, {}, header={"evicted": 1}))


def test_a_huge_kept_bitmap_is_refused_before_it_is_allocated(default_file):
    # 2 layers x 2048 heads x 2**19 tokens of head_dim 2: under the element cap, but a
    # 256 MiB bitmap that a few bytes of zstd could claim.
    z = zstandard.ZstdCompressor().compress
    huge = {"num_layers": 2, "num_kv_heads": 2048, "head_dim": 2, "num_tokens": 1 << 19,
            "layer_tokens": [1 << 19] * 2, "has_token_ids": False}
    with pytest.raises(CorruptError, match="kept-position bits"):
        kvcodec.open(rebuild(default_file, {"tokens": z(b"")}, header=huge))


def test_evicted_files_decode_from_a_stream(default_file):
    class Pipe:  # forward-only, like a socket
        def __init__(self, data):
            self.left = data

        def read(self, n=-1):
            n = len(self.left) if n is None or n < 0 else n
            out, self.left = self.left[:n], self.left[n:]
            return out

    with kvcodec.open(Pipe(default_file)) as f:
        assert f.streaming
        part = f.decode(chunks=range(1, 3))
    ref = kvcodec.open(default_file).decode(chunks=range(1, 3))
    for l in range(L):
        assert torch.equal(part.kept[l], ref.kept[l])
        assert torch.equal(part.keys[l], ref.keys[l])


# -- refusals -------------------------------------------------------------------------

def test_dense_decoders_refuse_evicted_files(default_file):
    with kvcodec.open(default_file) as f:
        for call in (lambda: f.decode_layers([0]), lambda: next(f.iter_chunks()),
                     lambda: f.decode_into({0: (torch.empty(1, H, T, D),) * 2})):
            with pytest.raises(FormatError, match="evicted.*decode\\(\\)"):
                call()
        from kvcodec.integrations.cuda import DeviceFile

        with pytest.raises(BackendError, match="evicted"):
            DeviceFile(f)


def test_the_store_and_safetensors_refuse_evicted_caches(tmp_path, cache):
    from kvcodec.format.io import save_safetensors
    from kvcodec.store import ChunkStore

    store = ChunkStore(tmp_path / "store", {"architecture": "test"}, config="lossless")
    with pytest.raises(ShapeError, match="evicted"):
        store.put(cache)
    anchored = KVCache(cache.keys, cache.values, cache.token_ids, length=T, kept=cache.kept,
                       anchor=[1, 2])
    with pytest.raises(ShapeError, match="evicted"):
        store.put_document(anchored)
    with pytest.raises(ShapeError, match="evicted"):
        save_safetensors(cache, tmp_path / "kv.safetensors")


def test_vllm_refuses_evicted_caches(cache, default_file):
    pytest.importorskip("vllm")
    from kvcodec.integrations.vllm import check_dense

    with kvcodec.open(default_file) as f:
        for evicted in (cache, f):
            with pytest.raises(FormatError, match="cannot be loaded into vLLM's paged cache"):
                check_dense(evicted)
    check_dense(dense())


# -- the real model ---------------------------------------------------------------------

def test_real_kv_codes_as_well_as_dense(kv_600):
    """SmolLM2's KV, a third of each head's tokens kept, its calibrated config (per-head
    steps, rope_strip, importance): kept tokens decode as accurately as in the dense
    file, in far fewer bytes. Per-token steps follow each head's own magnitude here (a
    token's other heads may be evicted), so error moves between heads, not in total."""
    gen = torch.Generator().manual_seed(1)
    counts = [[int(c) for c in torch.randint(150, 250, (kv_600.num_kv_heads,), generator=gen)]
              for _ in range(kv_600.num_layers)]
    kv = evict(kv_600, counts)
    data, dense_data = kvcodec.encode(kv), kvcodec.encode(kv_600)
    assert len(data) < 0.45 * len(dense_data)
    out, ref = kvcodec.decode(data), kvcodec.decode(dense_data)
    for kind in KINDS:
        err = base = 0.0
        for l in range(kv.num_layers):
            full = (ref.keys if kind == "key" else ref.values)[l][0]
            for h in range(kv.num_kv_heads):
                pos, orig = held(kv, l, h, kind)
                err += float((held(out, l, h, kind)[1] - orig).float().pow(2).sum())
                base += float((full[h, pos] - orig).float().pow(2).sum())
        assert err < 1.1 * base, (kind, err / base)


def test_per_head_kept_importance_sizes_each_kept_tokens_step(kv_600):
    """An evicted cache's per-head importance (``extra[KEPT_IMPORTANCE]``, what an
    attention-based eviction records) sets each kept token's step within its head:
    the head's low-scored tokens decode coarser than its high-scored ones, and a layout
    that does not match ``kept`` is refused."""
    from kvcodec.core.kvcache import KEPT_IMPORTANCE
    from kvcodec.errors import ShapeError

    counts = [[200] * kv_600.num_kv_heads for _ in range(kv_600.num_layers)]
    kv = evict(kv_600, counts)
    # Per head: the first half of its kept tokens scored 100x the second half.
    imp = []
    for pos in kv.kept:
        s = torch.ones(pos.shape)
        s[:, :pos.shape[1] // 2] = 100.0
        imp.append(torch.where(pos >= 0, s, torch.zeros(())))
    kv.extra[KEPT_IMPORTANCE] = imp
    data = kvcodec.encode(kv)
    plain = kvcodec.encode(dataclasses.replace(kv, extra={}))
    assert data != plain
    out = kvcodec.decode(data)
    hi = lo = 0.0
    for l in range(1, kv.num_layers):
        for h in range(kv.num_kv_heads):
            pos, orig = held(kv, l, h, "value")
            err = (held(out, l, h, "value")[1] - orig).float().pow(2).sum(dim=-1)
            hi += float(err[:100].sum())
            lo += float(err[100:].sum())
    assert hi < 0.5 * lo, (hi, lo)
    kv.extra[KEPT_IMPORTANCE] = imp[:-1]
    with pytest.raises(ShapeError, match=KEPT_IMPORTANCE):
        kvcodec.encode(kv)


def test_an_evicted_files_chunks_span_more_positions_as_it_keeps_fewer():
    """At a quarter of the tokens kept, the default chunk spans 4x the positions, so
    each head's job still codes ~256 rows: the same values decode (chunking moves no
    step), in fewer bytes (fewer lane states and index entries). An explicit
    chunk_tokens is kept as given."""
    kv = evict(dense(n=1024), [[256] * H for _ in range(L)])
    wide = kvcodec.encode(kv, config="default")
    narrow = kvcodec.encode(kv, config="default", chunk_tokens=256)
    with kvcodec.open(wide) as f, kvcodec.open(narrow) as g:
        assert f.header["chunk_tokens"] == 1024 and g.header["chunk_tokens"] == 256
    assert len(wide) < len(narrow)
    a, b = kvcodec.decode(wide), kvcodec.decode(narrow)
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    dense_file = kvcodec.encode(dense(n=1024), config="default")
    with kvcodec.open(dense_file) as f:
        assert f.header["chunk_tokens"] == 256  # dense caches: the config's
