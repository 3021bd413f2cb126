"""Crafted files of a few kilobytes: every one is refused with a KVCodecError (the CLI: one
line, no traceback), within a bounded amount of memory and time."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner

import kvcodec
from kvcodec.errors import CorruptError, KVCodecError
from kvcodec.format import container
from kvcodec_cli.main import main


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    kv = [(torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)) for _ in range(3)]
    return kvcodec.encode(kv, config="default")


def _header(data) -> dict:
    hlen = container.PREAMBLE.unpack_from(data)[2]
    return json.loads(data[24:24 + hlen])


def rebuild(data, header_update=None, replace=None, raw_header=None, version=None) -> bytes:
    """``data`` re-serialized (valid checksums) with header fields or sections replaced,
    or with ``raw_header`` bytes as its whole header (``version``: the original's)."""
    head = _header(data)
    version = version or container.PREAMBLE.unpack_from(data)[1]
    with kvcodec.open(data) as f:
        sections = [(e["name"], (replace or {}).get(e["name"], f.source.read_section(e["name"])),
                     e["crc32"] is not None) for e in head["sections"]]
    for k in ("sections", "data_length"):
        head.pop(k)
    head.update(header_update or {})
    out = container.build(head, sections, version)
    if raw_header is None:
        return out
    hlen = container.PREAMBLE.unpack_from(out)[2]
    body = out[container._align(24 + hlen, container.DATA_ALIGN):]
    start = container._align(24 + len(raw_header), container.DATA_ALIGN)
    pre = container.PREAMBLE.pack(container.MAGIC, version, len(raw_header),
                                  container.crc32(raw_header), 0)
    return pre + raw_header + b"\0" * (start - 24 - len(raw_header)) + body


def refused(data):
    with pytest.raises(KVCodecError):
        with kvcodec.open(data) as f:
            f.decode()


def test_deeply_nested_json_is_refused(small):
    deep = b'{"format": "kvc", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(CorruptError, match="not valid JSON"):
        kvcodec.open(rebuild(small, raw_header=deep))
    cfg = zstandard.ZstdCompressor().compress(b'{"key": ' + b"[" * 100_000 + b"]" * 100_000
                                              + b"}")
    refused(rebuild(small, replace={"config": cfg}))


def test_a_nan_among_the_sinks_is_refused_and_a_sink_past_fp16_stays_finite(small):
    """The sinks section is raw float16 that decodes straight into the cache: a NaN there
    (no encoder writes one; they refuse NaN input) is a crafted file, refused. And an
    encoder clamps a sink to float16's range (a value of 1e6 became infinity, which
    makes attention NaN)."""
    with kvcodec.open(small) as f:
        sinks = np.frombuffer(f.source.read_section("sinks"), "<f2").copy()
    sinks[3] = np.nan
    with pytest.raises(CorruptError, match="sinks section holds NaN"):
        with kvcodec.open(rebuild(small, replace={"sinks": sinks.tobytes()})) as f:
            f.decode()
    torch.manual_seed(0)
    kv = [(torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)) for _ in range(3)]
    kv[1][1][0, 1, 0, 5] = 1e6  # a value of the sink token
    with kvcodec.open(kvcodec.encode(kv, config="default")) as f:
        out = f.decode()
    assert all(torch.isfinite(t).all() for t in out.keys + out.values)
    assert out.values[1][0, 1, 0, 5] == 65504.0


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_parameter_that_is_not_finite_is_refused(small, value):
    """``default``'s per-channel means (float16, the params section) are added to every
    decoded row: a NaN or infinity there (encoders clamp parameters to float16's range)
    decoded to 69 non-finite keys of a layer; it is refused."""
    with kvcodec.open(small) as f:
        raw = zstandard.ZstdDecompressor().decompress(f.source.read_section("params"))
    params = np.frombuffer(raw, "<f2").copy()
    params[7] = value
    crafted = rebuild(small, replace={"params": zstandard.ZstdCompressor().compress(
        params.tobytes())})
    with pytest.raises(CorruptError, match="params section holds NaN or infinity"):
        with kvcodec.open(crafted) as f:
            f.decode()


@pytest.mark.parametrize("field,value", [
    ("layer_tokens", {"a": 1}), ("layer_tokens", [70, "70", 70]), ("anchor", "1,2"),
    ("anchor", [[1]]), ("key_transform", ["junk"]), ("key_transform", {"type": 5}),
    ("key_transform", {"type": "rope_strip", "layers": "x"}), ("model", [1, 2]),
    ("sink_tokens", 1.5), ("position_offset", "0"), ("dtype", ["float32"]),
    ("coder", None), ("evicted", "yes"), ("format", {"kvc": 1}), ("has_token_ids", 1),
])
def test_header_fields_of_wrong_types_are_refused(small, field, value):
    refused(rebuild(small, {field: value}))


@pytest.mark.parametrize("config", [
    {"key": "x"}, {"key": [{"layers": "all", "quantizer": {}}], "value": []},
    {"key": [{"layers": [0, None], "quantizer": {"type": "uniform", "step": "1",
                                                 "bins": 255}}]},
    {"key": [{"layers": [0, None], "quantizer": {"type": "uniform", "step": 0.3,
                                                 "bins": 255, "head_scale": [1e300]}}]},
    {"chunk_tokens": -1}, ["not", "a", "dict"], None, 1e999 if False else "string",
])
def test_configs_of_wrong_types_are_refused(small, config):
    cfg = zstandard.ZstdCompressor().compress(json.dumps(config).encode())
    refused(rebuild(small, replace={"config": cfg}))


def _rss_growth(code: str) -> tuple:
    """``(returncode, stdout, peak RSS growth in MB)`` of ``code`` run in a new
    interpreter after kvcodec is imported."""
    probe = ("import resource, kvcodec\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n" + code +
             "\nafter = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "print('GROWTH', (after - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    growth = [float(l.split()[1]) for l in out.stdout.splitlines() if l.startswith("GROWTH")]
    return out.returncode, out.stdout + out.stderr, growth[0] if growth else None


def test_a_zstd_bomb_is_refused_without_allocating_it(small, tmp_path):
    """A config frame that expands to 1 GiB (and one that declares 1 TiB) in a file of a
    few kilobytes: refused after reading at most the config cap (16 MiB)."""
    c = zstandard.ZstdCompressor(level=19)
    bomb = c.compress(b" " * (1 << 30))
    assert len(bomb) < 64 << 10
    liar = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(b"{}"))
    # Frame header: magic, descriptor (content size in 8 bytes), then the size.
    liar[4] = (liar[4] & 0x3F) | 0xC0
    liar = bytes(liar[:5]) + (1 << 40).to_bytes(8, "little") + bytes(liar[6:])
    for i, frame in enumerate((bomb, liar)):
        path = tmp_path / f"bomb{i}.kvc"
        path.write_bytes(rebuild(small, replace={"config": frame}))
        rc, out, growth = _rss_growth(
            f"try:\n    kvcodec.open({str(path)!r})\nexcept kvcodec.KVCodecError as e:\n"
            f"    print('REFUSED', type(e).__name__)")
        assert rc == 0 and "REFUSED CorruptError" in out, out[-2000:]
        assert growth < 100, f"opening a {path.stat().st_size}-byte file grew RSS {growth} MB"


def test_an_evicted_header_of_many_heads_is_refused_before_building_streams(small):
    t = _header(small)
    bits = np.zeros(1, dtype=np.uint8).tobytes()
    data = rebuild(small, {"evicted": True, "num_layers": 4096, "num_kv_heads": 4096,
                           "num_tokens": 1, "head_dim": 1, "layer_tokens": [1] * 4096},
                   replace={"kept": zstandard.ZstdCompressor().compress(bits)}, version=4)
    assert t  # the original header parsed
    with pytest.raises(CorruptError, match="streams"):
        kvcodec.open(data)


def test_a_header_of_many_streams_is_refused_by_its_index_size(small):
    """Under the stream cap, 4096 layers x 16 heads claimed by a file of a few kilobytes:
    the index's size (in the section table) is checked before 131072 streams are built
    (found by fuzz/fuzz_stream.py: over a second to refuse before)."""
    head = _header(small)
    with kvcodec.open(small) as f:
        sections = [(e["name"], f.source.read_section(e["name"]), e["crc32"] is not None)
                    for e in head.pop("sections")]
    bits = np.zeros(4096 * 16 * 9, dtype=np.uint8).tobytes()  # 70 positions: 9 bytes each
    sections.insert(2, ("kept", zstandard.ZstdCompressor().compress(bits), True))
    head.update(evicted=True, num_layers=4096, num_kv_heads=16, head_dim=16,
                layer_tokens=[70] * 4096)
    data = container.build(head, sections, 4)
    assert len(data) < 64 << 10
    # Refused by the index's size, which is checked before any stream is built.
    with pytest.raises(CorruptError, match="index has .* for 131072 streams"):
        kvcodec.open(data)


def test_the_cli_prints_one_line_for_crafted_files(small, tmp_path):
    deep = tmp_path / "deep.kvc"
    deep.write_bytes(rebuild(small, raw_header=b"[" * 100_000 + b"]" * 100_000))
    odd = tmp_path / "odd.kvc"
    odd.write_bytes(rebuild(small, {"layer_tokens": {"a": 1}}))
    for path in (deep, odd):
        for cmd in (["inspect", str(path)], ["decode", str(path), "-o", str(tmp_path / "o")]):
            r = CliRunner().invoke(main, cmd)
            assert r.exit_code == 1 and r.output.startswith("error: "), r.output
            assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_a_tables_bomb_is_cut_at_a_budget_proportional_to_its_size(small, tmp_path):
    """The tables section may expand to what the header's geometry allows, but never more
    than a floor plus a fixed ratio of its compressed size."""
    from kvcodec.format.header import ZSTD_FLOOR, ZSTD_RATIO

    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (1 << 30))
    path = tmp_path / "tables-bomb.kvc"
    path.write_bytes(rebuild(small, {"num_kv_heads": 64, "head_dim": 512},
                             replace={"tables": bomb}))
    rc, out, growth = _rss_growth(
        f"try:\n    kvcodec.open({str(path)!r}).decode()\n"
        f"except kvcodec.KVCodecError as e:\n    print('REFUSED', type(e).__name__, e)")
    assert rc == 0 and "REFUSED CorruptError" in out, out[-2000:]
    budget = (ZSTD_FLOOR + ZSTD_RATIO * len(bomb)) / 2 ** 20
    assert growth < budget + 64, f"{growth} MB for a {len(bomb)}-byte section (budget {budget})"


def test_inspect_escapes_every_string_from_the_file(small, tmp_path):
    """Header and config strings with terminal escapes (clear screen, set the title, a
    CR/LF that would fake a row) are printed escaped, each row on one line; the JSON
    output keeps them exact (JSON escapes them)."""
    with kvcodec.open(small) as f:
        config = dict(f.config)
    name = "evil\x1b[2J\x1b]0;title\x07\u202e"
    config.update(name=name, model_key="key", model_name="m\x1b[31m")
    arch = "Llama\x1b[2J\r\nfake: row"
    path = tmp_path / "evil.kvc"
    path.write_bytes(rebuild(small, {"model": {"architecture": arch}}, replace={
        "config": zstandard.ZstdCompressor().compress(json.dumps(config).encode())}))
    plain = tmp_path / "plain.kvc"
    plain.write_bytes(small)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert not any(c in r.output for c in "\x1b\x07\r\u202e")
    assert "Llama\\x1b[2J\\r\\nfake: row layers=3" in r.output
    assert "evil\\x1b[2J\\x1b]0;title\\x07\\u202e (calibrated for m\\x1b[31m)" in r.output
    rows = CliRunner().invoke(main, ["inspect", str(plain)]).output.splitlines()
    assert len(r.output.splitlines()) == len(rows)
    r = CliRunner().invoke(main, ["inspect", "--json", str(path)])
    assert "\x1b" not in r.output
    info = json.loads(r.output)
    assert info["config"] == name and info["model"]["architecture"] == arch


@pytest.mark.parametrize("value", [None, "", 5])
def test_inspect_of_a_config_without_a_name(small, tmp_path, value):
    """A config whose name is absent, empty or not a string: `inspect` prints its table
    (it raised TypeError on concatenating None)."""
    with kvcodec.open(small) as f:
        config = dict(f.config)
    if value is None:
        config.pop("name")
    else:
        config["name"] = value
    path = tmp_path / "unnamed.kvc"
    path.write_bytes(rebuild(small, replace={
        "config": zstandard.ZstdCompressor().compress(json.dumps(config).encode())}))
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.exception
    config_row = next(line for line in r.output.splitlines() if line.startswith("config"))
    assert config_row.split()[1] == ("5" if value == 5 else "unnamed")


@pytest.fixture(scope="module")
def chunked():
    """3 layers x 65 tokens in 16-token chunks: the last chunk holds 1 row."""
    torch.manual_seed(1)
    kv = [(torch.randn(1, 2, 65, 64), torch.randn(1, 2, 65, 64)) for _ in range(3)]
    return kvcodec.encode(kv, config="default", chunk_tokens=16)


INDEX = np.dtype([("off", "<u8"), ("side", "<u4"), ("blob", "<u4"), ("crc", "<u4")])


def _crafted_index(data, edit) -> bytes:
    with kvcodec.open(data) as f:
        idx = np.frombuffer(f.source.read_section("index"), dtype=INDEX).copy()
        streams = len(f.meta.streams)
    edit(idx, streams)
    return rebuild(data, replace={"index": idx.tobytes()})


def _side(idx, streams):  # two bytes of a blob claimed as side information
    idx[1]["side"] += 2
    idx[1]["blob"] -= 2


def _swallow(idx, streams):  # the 1-row chunk's first blob takes in the blob before it
    i = 4 * streams
    idx[i - 1]["blob"], idx[i]["blob"] = 0, idx[i]["blob"] + idx[i - 1]["blob"]
    idx[i]["off"] = idx[i - 1]["off"] + idx[i - 1]["side"]


@pytest.mark.parametrize("edit,match", [(_side, "side information has the wrong size"),
                                        (_swallow, "chunk 4 blob is larger than possible")])
def test_an_index_that_tiles_but_lies_is_refused_cold_or_warm(chunked, edit, match):
    """An index that still tiles the payload but gives an item side information of the
    wrong size, or a blob larger than its rows and columns allow, is refused, also after
    a good file of the same layout was read (its bounds are then kept, not recomputed)."""
    bad = _crafted_index(chunked, edit)
    for _ in range(2):
        with pytest.raises(CorruptError, match=match):
            with kvcodec.open(bad) as f:
                f.decode()
        with kvcodec.open(chunked) as f:
            assert f.decode().num_tokens == 65


def _with_nan_side(data, item, at):
    """``data`` with side value ``at`` of payload item ``item`` set to NaN, its checksum
    made valid again."""
    with kvcodec.open(data) as f:
        idx = np.frombuffer(f.source.read_section("index"), dtype=INDEX).copy()
        payload = bytearray(f.source.read_section("payload"))
    o, s, b = (int(idx[item][k]) for k in ("off", "side", "blob"))
    np.frombuffer(payload, "<f2", count=s // 2, offset=o)[at] = np.nan
    idx[item]["crc"] = container.crc32(bytes(payload[o:o + s + b]))
    return rebuild(data, replace={"payload": bytes(payload), "index": idx.tobytes()})


def test_a_nan_in_side_information_or_a_lossless_value_is_refused(small, monkeypatch):
    """A cachegen file's per-token scales (float16 side information) and a lossless
    file's values are stored as they decode: a NaN there (no encoder writes one; they
    refuse NaN input) is a crafted file, refused rather than decoded into the cache."""
    torch.manual_seed(0)
    kv = [(torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)) for _ in range(3)]
    cachegen = kvcodec.encode(kv, config="cachegen")
    with pytest.raises(CorruptError, match="decodes to NaN or infinity"):
        with kvcodec.open(_with_nan_side(cachegen, item=1, at=5)) as f:
            f.decode()
    from kvcodec.core.quant import Lossless

    write = Lossless.quantize_layers

    def nan_planes(qs, x, params, step_mults, threads=0):
        out = write(qs, x, params, step_mults, threads)
        sym = out[0][0].copy()
        sym[9, 32 + 3] = 0x7E  # the high byte of a value: a NaN, whatever its low byte
        return [(sym, out[0][1])] + out[1:]

    monkeypatch.setattr(Lossless, "quantize_layers", staticmethod(nan_planes))
    half = [(k.half(), v.half()) for k, v in kv]  # two byte planes: the high one is plane 1
    crafted = kvcodec.encode(half, config="lossless")
    monkeypatch.undo()
    with pytest.raises(CorruptError, match="decodes to NaN or infinity"):
        with kvcodec.open(crafted) as f:
            f.decode()
    for data in (cachegen, kvcodec.encode(half, config="lossless")):  # as encoders write
        with kvcodec.open(data) as f:
            assert f.decode().num_tokens == 70
    # bfloat16 values near its largest, whose sum overflows float32: finite, decoded.
    big = [(k.bfloat16() * 1e37, v.bfloat16() * 1e37) for k, v in kv]
    with kvcodec.open(kvcodec.encode(big, config="lossless")) as f:
        out = f.decode()
    assert torch.isinf(out.keys[0].float().sum()) and torch.equal(out.keys[0], big[0][0])
