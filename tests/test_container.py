"""Bad input never crashes, hangs or returns silently wrong tensors: it raises a typed error."""
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcodec
from kvcodec.format import container
from kvcodec.errors import (CorruptError, FormatError, KVCodecError, ModelMismatchError,
                            ShapeError, TruncatedError)


@pytest.fixture(scope="module")
def small_kvc(kv_600):
    """A small real file: 3 layers x 70 tokens in 16-token chunks (5 chunks)."""
    kv = kvcodec.KVCache([k[:, :, :70] for k in kv_600.keys[:3]],
                         [v[:, :, :70] for v in kv_600.values[:3]],
                         kv_600.token_ids[:70], dict(kv_600.model, num_layers=3))
    return kvcodec.encode(kv, chunk_tokens=16)


def split(data):
    _, _, hlen, _, _ = container.PREAMBLE.unpack_from(data)
    header = json.loads(data[24:24 + hlen])
    start = (24 + hlen + 63) // 64 * 64
    return header, data[start:]


def join(header, body):
    h = json.dumps(header).encode()
    pre = container.PREAMBLE.pack(container.MAGIC, container.FORMAT_VERSION, len(h),
                                  container.crc32(h), 0)
    out = pre + h
    return out + b"\0" * ((len(out) + 63) // 64 * 64 - len(out)) + body


def decode_all(data):
    with kvcodec.open(data) as f:
        return f.decode()


def test_valid_file_round_trips_through_split_and_join(small_kvc):
    header, body = split(small_kvc)
    assert decode_all(join(header, body)).num_tokens == 70


@pytest.mark.parametrize("n", [0, 3, 8, 23, 24, 100, -1000, -100, -1])
def test_truncated_files(small_kvc, n):
    data = small_kvc[:n] if n >= 0 else small_kvc[:len(small_kvc) + n]
    with pytest.raises((TruncatedError, CorruptError)) as info:
        decode_all(data)
    assert "truncat" in str(info.value) or "short" in str(info.value) or n < 24


def test_extra_bytes_are_rejected(small_kvc):
    with pytest.raises(CorruptError):
        decode_all(small_kvc + b"\0" * 8)


def test_wrong_magic_and_version(small_kvc):
    with pytest.raises(FormatError, match="not a .kvc"):
        decode_all(b"PK\x03\x04" + small_kvc[4:])
    bumped = bytearray(small_kvc)
    struct.pack_into("<I", bumped, 8, container.FORMAT_VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        decode_all(bytes(bumped))


def test_every_section_is_checksummed(small_kvc):
    header, _ = split(small_kvc)
    start = len(small_kvc) - header["data_length"]
    positions = [30]  # inside the JSON header
    for sec in header["sections"]:
        positions += [start + sec["offset"], start + sec["offset"] + sec["length"] - 1]
    for pos in positions:
        bad = bytearray(small_kvc)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptError):
            decode_all(bytes(bad))


LIES = {
    "more tokens": lambda h: h.update(num_tokens=h["num_tokens"] + 16),
    "fewer tokens": lambda h: h.update(num_tokens=h["num_tokens"] - 16),
    "chunking": lambda h: h.update(chunk_tokens=32),
    "huge tokens": lambda h: h.update(num_tokens=10 ** 12),
    "huge geometry": lambda h: h.update(num_kv_heads=60000, head_dim=60000),
    "layers": lambda h: h.update(num_layers=4),
    "negative": lambda h: h.update(num_layers=-1),
    "float": lambda h: h.update(head_dim=64.0),
    "dtype": lambda h: h.update(dtype="int8"),
    "no token ids": lambda h: h.update(has_token_ids=False),
    "token ids flag": lambda h: h.update(has_token_ids="yes"),
    "coder": lambda h: h["coder"].update(prob_bits=15),
    "section length": lambda h: h["sections"][1].update(length=h["sections"][1]["length"] + 1),
    "section offset": lambda h: h["sections"][2].update(offset=h["sections"][2]["offset"] + 8),
    "data length": lambda h: h.update(data_length=h["data_length"] + 8),
    "no sections": lambda h: h.pop("sections"),
    "swapped": lambda h: h["sections"].reverse(),
    "not an object": lambda h: h.clear(),
    "anchor not a list": lambda h: h.update(anchor="<bos>"),
    "empty anchor": lambda h: h.update(anchor=[]),
    "anchor ids": lambda h: h.update(anchor=[1, -2]),
    "huge anchor": lambda h: h.update(anchor=[1] * 5000),
    "position": lambda h: h.update(position_offset="zero"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_headers_that_lie(small_kvc, lie):
    header, body = split(small_kvc)
    LIES[lie](header)
    with pytest.raises(KVCodecError):
        decode_all(join(header, body))


def rebuild(data, config=None, tokens=None):
    """Re-serialize a file with its config or token section replaced: valid checksums,
    lying contents."""
    import zstandard

    header, _ = split(data)
    with kvcodec.open(data) as f:
        sections = [(e["name"], f.source.read_section(e["name"]), e["crc32"] is not None)
                    for e in header["sections"]]
    z = zstandard.ZstdCompressor().compress
    out = []
    for name, body, checked in sections:
        if name == "config" and config is not None:
            body = z(json.dumps(config).encode())
        if name == "tokens" and tokens is not None:
            body = z(tokens)
        out.append((name, body, checked))
    for k in ("sections", "data_length"):
        header.pop(k)
    return container.build(header, out)


def test_sections_that_lie(small_kvc):
    with kvcodec.open(small_kvc) as f:
        cfg, ids = f.config, f.token_ids
    assert decode_all(rebuild(small_kvc, config=cfg)).num_tokens == 70
    bins = json.loads(json.dumps(cfg))
    bins["key"][0]["quantizer"]["bins"] = 31
    for bad in ({"key": "x"}, bins, ["not", "an", "object"]):
        with pytest.raises(KVCodecError):
            decode_all(rebuild(small_kvc, config=bad))
    # Writers apply a model-dependent field (config.for_model): a file still carrying one
    # was not written by an encoder, and its steps would be ambiguous.
    with pytest.raises(CorruptError, match="full_attention_key_scale is not applied"):
        decode_all(rebuild(small_kvc, config=dict(cfg, full_attention_key_scale=0.5)))
    for tokens in (np.asarray(ids[:-1], "<u4").tobytes(), b"\1\2\3", b""):
        with pytest.raises(CorruptError, match="tokens"):
            decode_all(rebuild(small_kvc, tokens=tokens))


def test_header_size_cap(small_kvc):
    bad = bytearray(small_kvc)
    struct.pack_into("<I", bad, 12, container.MAX_HEADER_BYTES + 1)
    with pytest.raises(CorruptError, match="cap"):
        decode_all(bytes(bad))


def test_wrong_model_is_refused(small_kvc, lm):
    with kvcodec.open(small_kvc) as f:
        stored = f.model
    kvcodec.check_fingerprint(dict(stored, num_layers=30), lm.fingerprint)
    other = dict(lm.fingerprint, head_dim=128, tokenizer_hash="0" * 16)
    with pytest.raises(ModelMismatchError, match="head_dim"):
        kvcodec.check_fingerprint(stored, other)
    with pytest.raises(ModelMismatchError):
        kvcodec.check_fingerprint(None, lm.fingerprint)


def test_wrong_shapes_are_refused(kv_600):
    k, v = kv_600.keys[0], kv_600.values[0]
    with pytest.raises(ShapeError, match="batch"):
        kvcodec.encode([(k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1))])
    with pytest.raises(ShapeError, match="shape"):
        kvcodec.encode([(k, v), (k[:, :1], v[:, :1])])  # another head count
    with pytest.raises(ShapeError, match="shape"):
        kvcodec.encode([(k, v), (k, v[:, :, :10])])  # keys and values of other spans
    with pytest.raises(ShapeError, match="dtype"):
        kvcodec.encode([(k.to(torch.int32), v.to(torch.int32))])
    with pytest.raises(ShapeError, match="NaN"):
        kvcodec.encode([(k * float("nan"), v)])
    with pytest.raises(ShapeError):
        kvcodec.encode("not a cache")
    with pytest.raises(ShapeError):
        kvcodec.KVCache([k], [v], token_ids=[1, 2, 3])
    with pytest.raises(ShapeError, match="kv heads and channels"):  # an IndexError deep inside
        kvcodec.encode([(k[:, :0], v[:, :0])])
    with pytest.raises(ShapeError, match="kv heads and channels"):
        kvcodec.encode([(k[..., :0], v[..., :0])])
    n = k.shape[2]
    # A string, a value past 64 bits: numpy's ValueError and OverflowError escaped; 1.5
    # was cut to 1 without a word.
    for ids in (["a"] * n, [2**70] * n, [1.5] * n, {"a": 1}, [[1]] * n, [True] * n):
        with pytest.raises(ShapeError, match="token ids must be a list of integers"):
            kvcodec.KVCache([k], [v], token_ids=ids)
        with pytest.raises(ShapeError, match="token ids must be a list of integers"):
            kvcodec.encode([(k, v)], token_ids=ids)  # given to the encoder, not the cache
    with pytest.raises(ShapeError, match=r"in \[0, 2\*\*32\)"):
        kvcodec.KVCache([k], [v], token_ids=[-1] * n)
    for ids in (list(range(n)), tuple(range(n)), torch.arange(n), np.arange(n, dtype=np.uint32)):
        assert kvcodec.KVCache([k], [v], token_ids=ids).num_tokens == n
    with pytest.raises(ShapeError, match="fingerprint dict"):  # an AttributeError later
        kvcodec.KVCache([k], [v], model=[1, 2])
    # A fingerprint stating another geometry than the tensors': the file was written,
    # and every load into a model refused it.
    fp = {"architecture": "LlamaForCausalLM", "num_layers": 1, "num_kv_heads": k.shape[1],
          "head_dim": k.shape[3]}
    for field, wrong in (("num_layers", 5), ("num_kv_heads", 7), ("head_dim", 3)):
        with pytest.raises(ModelMismatchError, match=f"{field}: the tensors have"):
            kvcodec.encode(kvcodec.KVCache([k], [v], model={**fp, field: wrong}))
        with pytest.raises(ModelMismatchError, match="contradicts"):
            enc = kvcodec.format.Encoder("default", {**fp, field: wrong})
            enc.encode(kvcodec.KVCache([k], [v]))
    assert kvcodec.decode(kvcodec.encode(kvcodec.KVCache([k], [v], model=fp))).model == fp
    for chunk in (0, True, 1.5, "8", 2 ** 17):  # 0 took the config's, True 1, 1.5 was cut
        with pytest.raises(kvcodec.ConfigError, match="chunk_tokens must be an integer"):
            kvcodec.encode(kvcodec.KVCache([k], [v]), chunk_tokens=chunk)
    # A negative position rotated keys to positions no model gives; 1.5 and True were
    # taken as 1, and a position past 2**40 was written and then refused by every reader.
    data = kvcodec.encode(kvcodec.KVCache([k], [v]))
    dst = {0: (torch.empty_like(k), torch.empty_like(v))}
    for offset in (-1, -(2 ** 30), 1.5, True, "3", 2 ** 40, torch.tensor([1, 2])):
        with pytest.raises(ShapeError, match=r"position_offset must be an integer in \[0, "):
            kvcodec.encode(kvcodec.KVCache([k], [v]), position_offset=offset)
        with pytest.raises(ShapeError, match=r"position_offset must be an integer in \[0, "):
            kvcodec.open(data).decode_into(dst, position_offset=offset)
    from test_hostile import rebuild

    old = rebuild(data, {"position_offset": -5})  # as encoders once wrote: still decodes
    with kvcodec.open(old) as f:
        assert f.meta.position_offset == -5
        assert torch.equal(f.decode().keys[0], kvcodec.decode(data).keys[0])
    for offset in (5, np.int64(5), torch.tensor(5)):  # numpy's and torch's integers are
        with kvcodec.open(kvcodec.encode(kvcodec.KVCache([k], [v]),
                                         position_offset=offset)) as f:
            assert f.meta.position_offset == 5 and type(f.meta.position_offset) is int
            f.decode_into(dst, position_offset=offset)


def test_bad_chunk_and_layer_requests(small_kvc):
    import io

    with kvcodec.open(small_kvc) as f:
        # A float, a string or a numpy integer as chunks was a TypeError; numpy integers
        # now work as Python's do, as layers too.
        for chunks in (0.0, "0", [0.5], slice("a")):
            with pytest.raises(ShapeError, match="chunks must be integers"):
                f.decode(chunks)
        assert torch.equal(f.decode(np.int64(1)).keys[0], f.decode(1).keys[0])
        assert list(f.decode_layers([np.int64(2)])) == [2]
        # A destination that is not {layer: (keys, values)} of tensors was a CorruptError,
        # the file's damage, which a store answers by moving its entry aside.
        for dst in ({0: (1, 2)}, [1, 2], {0: (torch.zeros(1),)}):
            with pytest.raises(ShapeError, match="dst must be"):
                f.decode_into(dst)
            with pytest.raises(ShapeError, match="dst must be"):
                f.plan(dst)
    with pytest.raises(KVCodecError, match="open it with mode 'rb'"):  # a TypeError
        kvcodec.open(io.StringIO("KVC"))
    with kvcodec.open(small_kvc) as f:
        for chunks in (5, -1, slice(4, 2), [0, 2]):
            with pytest.raises(ShapeError):
                f.decode(chunks)
        with pytest.raises(ShapeError, match=r"chunks slice\(4, 2, None\) are not a range"):
            f.decode(slice(4, 2))  # said "chunk range range(2, 2) is outside 0..N"
        with pytest.raises(ShapeError):
            f.decode_layers([3])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(KVCodecError, match="cannot open"):
        kvcodec.open(tmp_path / "nope.kvc")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_mutated_files(small_kvc, data):
    """Random damage to a real file: a typed error or tensors of the promised shape."""
    buf = bytearray(small_kvc)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos:pos + data.draw(st.integers(1, 64))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        kv = decode_all(bytes(buf))
    except KVCodecError:
        return
    assert kv.num_layers == 3 and kv.keys[0].shape == (1, 3, 70, 64)
    assert all(torch.isfinite(k).all() for k in kv.keys + kv.values)


def test_a_file_held_in_bytes_is_read_in_place(small_kvc):
    """Bytes are not copied into a file object: the payload is read as views of them,
    which stay valid after the file closes, while reads through the closed file fail."""
    data = bytes(small_kvc)
    f = kvcodec.open(data, name="entry-7.kvc")
    sec = f.sections
    run = sec.read_run(0, len(f.meta.streams) - 1)
    assert isinstance(run, memoryview) and run.obj is data
    blobs = sec.chunk_blobs(0)
    items = sec.read_items([(0, s) for s in range(len(f.meta.streams))])
    assert [bytes(b) for b in blobs] == [bytes(items[0, s][1]) for s in range(len(blobs))]
    assert all(b.obj is data for b in blobs)
    assert sec.chunk_blobs(0) is blobs  # read and checked once per file
    expect = decode_all(data)
    f.close()
    assert bytes(blobs[-1]) == bytes(items[0, len(blobs) - 1][1])
    with pytest.raises(ValueError, match="closed"):
        f.source.read_section("config")
    with kvcodec.open(bytearray(data)) as g:  # a mutable buffer is copied, as before
        assert g.sections.read_run(0, 0).obj is not data
        assert torch.equal(g.decode().keys[0], expect.keys[0])


def test_chunk_blobs_name_the_damaged_item(small_kvc):
    with kvcodec.open(small_kvc) as f:
        streams = len(f.meta.streams)
        off, side, blob, _ = f.sections.item_lists()
        at = f.source.section_offset("payload") + off[2 * streams + 3] + side[2 * streams + 3]
    data = bytearray(small_kvc)
    data[at + blob[2 * streams + 3] // 2] ^= 0x10
    with kvcodec.open(bytes(data), name="damaged.kvc") as f:
        assert len(f.sections.chunk_blobs(1)) == streams  # other chunks still read
        with pytest.raises(CorruptError, match=r"damaged.kvc: checksum mismatch in chunk 2, "
                                               r"layer 1 values"):
            f.sections.chunk_blobs(2)


def test_a_thread_decompresses_every_section_with_one_context_and_survives_bad_frames():
    """Sections are decompressed with one zstd context per thread (:mod:`.bounded`): a
    damaged frame, a frame past its limit, or one cut short leaves it fit for the next
    section, in this thread and in others, each getting the right bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from kvcodec.format.bounded import unzstd, zstd

    good = [zstd(bytes([i]) * (1000 + i)) for i in range(4)]
    bad = bytearray(good[0])
    bad[len(bad) // 2] ^= 0xFF

    def all_good():
        return all(unzstd(g, 1 << 20, "s") == bytes([i]) * (1000 + i)
                   for i, g in enumerate(good))
    for frame, limit in ((bytes(bad), 1 << 20), (good[1], 100)):
        with pytest.raises(CorruptError):
            unzstd(frame, limit, "section")
        assert all_good()
    # A frame cut short gives what it holds (read_zstd's sizes refuse that), no more.
    assert unzstd(good[2][:-6], 1 << 20, "section") != bytes([2]) * 1002
    assert all_good()

    def each(i):
        return unzstd(good[i % 4], 1 << 20, "s") == bytes([i % 4]) * (1000 + i % 4)
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(each, range(200)))
