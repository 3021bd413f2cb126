"""Structure-aware mutators (atheris ``custom_mutator``) for .kvc files and corpus inputs.

Every section and payload item of a .kvc file carries a CRC-32 and most sections are
zstd frames, so byte-level mutation alone stops at the checksums. These mutators mostly
mutate *inside* the structure and re-serialize: a JSON header field set to an edge value,
bytes of a decompressed section (config, tokens, kept bitmap, params, tables) mutated and
recompressed, the index or sink rows, one payload item's side bytes or rANS blob (the
index's offsets, sizes and CRCs rewritten to match), the format version; then every
checksum is made valid again, so the input reaches the parsers and the native decoder.
A share of mutations stays plain byte-level (``atheris.Mutate``) on the whole file, which
exercises the container's own checks (magic, lengths, tiling, checksums).
"""
from __future__ import annotations

import json
import random
import struct
import zlib

import atheris

import common

MAGIC = b"\x89KVC\r\n\x1a\n"
PREAMBLE = struct.Struct("<8sIIII")
INDEX = struct.Struct("<QIII")
ZSTD_SECTIONS = ("config", "tokens", "kept", "params", "tables")

INTS = [0, 1, 2, 3, 7, 8, 15, 16, 63, 64, 255, 256, 257, 1023, 1024, 4095, 4096, 65535,
        65536, 1 << 16, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, 1 << 31, 1 << 32, 1 << 34,
        1 << 40, 1 << 63, 1 << 64, -1, -2, -(1 << 31), -(1 << 40), -(1 << 63)]
OTHERS = [None, True, False, "", "x", "float16", "bfloat16", "float32", "rope_strip",
          "uniform", "lossless", "absmax_token", "token", "channel", [], {}, [0], [[1]],
          {"type": "rope_strip"}, 0.5, -0.5, 1e-30, 1e300, -1e300, 1.5]


def _crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def parse(data: bytes):
    """``(version, header, [(name, bytes, checked)])`` of a well-formed .kvc file (checksums
    not checked), or None."""
    if len(data) < PREAMBLE.size:
        return None
    magic, version, hlen, _, _ = PREAMBLE.unpack_from(data)
    if magic != MAGIC or PREAMBLE.size + hlen > len(data):
        return None
    try:
        header = json.loads(data[PREAMBLE.size:PREAMBLE.size + hlen])
        start = _align(PREAMBLE.size + hlen, 64)
        sections = []
        for e in header.pop("sections"):
            off, length = e["offset"], e["length"]
            if not (isinstance(off, int) and isinstance(length, int) and off >= 0
                    and length >= 0 and start + off + length <= len(data)):
                return None
            sections.append((e["name"], data[start + off:start + off + length],
                             e.get("crc32") is not None))
        header.pop("data_length", None)
    except Exception:  # noqa: BLE001 - anything malformed: not parseable
        return None
    if not isinstance(header, dict):
        return None
    return version, header, sections


def build(version: int, header: dict, sections: list, header_bytes: bytes | None = None):
    """Serialize as the writer does (container.build), with valid checksums; or with
    ``header_bytes`` as the header verbatim (its CRC made valid)."""
    table, offset = [], 0
    for name, data, checked in sections:
        table.append({"name": name, "offset": offset, "length": len(data),
                      "crc32": _crc(data) if checked else None})
        offset = _align(offset + len(data), 8)
    if header_bytes is None:
        header_bytes = json.dumps(dict(header, sections=table, data_length=offset),
                                  separators=(",", ":")).encode()
    out = bytearray(PREAMBLE.pack(MAGIC, version & 0xFFFFFFFF, len(header_bytes),
                                  _crc(header_bytes), 0))
    out += header_bytes
    out += b"\0" * (_align(len(out), 64) - len(out))
    for _, data, _ in sections:
        out += b"\0" * (_align(len(out), 8) - len(out))
        out += data
    out += b"\0" * (_align(len(out), 8) - len(out))
    return bytes(out)


def mutate_json(value, rng: random.Random, depth: int = 0):
    """``value`` with one node somewhere inside replaced, removed or added."""
    if isinstance(value, dict) and value and rng.random() < 0.8 and depth < 6:
        key = rng.choice(list(value))
        out = dict(value)
        r = rng.random()
        if r < 0.08:
            del out[key]
        elif r < 0.14:
            out[rng.choice(["evicted", "anchor", "layer_tokens", "key_transform", "x",
                            "sink_tokens", "position_offset"])] = _edge(rng, None)
        else:
            out[key] = mutate_json(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8 and depth < 6:
        out = list(value)
        i = rng.randrange(len(out))
        r = rng.random()
        if r < 0.1:
            del out[i]
        elif r < 0.2:
            out.insert(i, out[i])
        elif r < 0.25:
            out = out * rng.choice([2, 3])
        else:
            out[i] = mutate_json(out[i], rng, depth + 1)
        return out
    return _edge(rng, value)


def _edge(rng: random.Random, value):
    r = rng.random()
    if isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int) and r < 0.5:
        return value + rng.choice([-2, -1, 1, 2, value, -value, 1 << 8, 1 << 16])
    elif isinstance(value, float) and r < 0.5:
        return rng.choice([value * 2, -value, value / 3, float("inf"), float("nan"), 0.0])
    elif isinstance(value, str) and r < 0.3:
        return value[: rng.randrange(len(value) + 1)] + rng.choice(["", "x", "\u00e9"])
    if rng.random() < 0.6:
        return rng.choice(INTS)
    return rng.choice(OTHERS)


def _zstd(data: bytes, checksum: bool) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=1, write_checksum=checksum).compress(data)


def _unzstd(data: bytes) -> bytes | None:
    return common.decompress("zstd", data, 1 << 20)


def _items(sections: dict):
    """Payload items ``[(side, blob)]`` as the index cuts them, or None."""
    index, payload = sections.get("index"), sections.get("payload")
    if index is None or payload is None or len(index) % INDEX.size:
        return None
    items = []
    for off, side, blob, _ in INDEX.iter_unpack(index):
        if off + side + blob > len(payload):
            return None
        items.append((payload[off:off + side], payload[off + side:off + side + blob]))
    return items


def _index_payload(items) -> tuple:
    index, payload, off = [], [], 0
    for side, blob in items:
        index.append(INDEX.pack(off, len(side), len(blob), _crc(side + blob)))
        payload.append(side + blob)
        off += len(side) + len(blob)
    return b"".join(index), b"".join(payload)


def _mutate_bytes(data: bytes, rng: random.Random, grow: int = 64) -> bytes:
    if not data or rng.random() < 0.85:
        return atheris.Mutate(data, len(data) + grow)
    # Whole-value edits libFuzzer rarely makes: all zeros, all ones, repeated.
    return rng.choice([bytes(len(data)), b"\xff" * len(data), data * 2, data[:len(data) // 2]])


def mutate_kvc(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    parsed = parse(data) if rng.random() < 0.8 else None
    if parsed is None:
        return atheris.Mutate(data, max_size)
    version, header, sections = parsed
    names = [s[0] for s in sections]
    by_name = {n: d for n, d, _ in sections}
    op = rng.random()
    header_bytes = None
    if op < 0.25:  # a header field (structured)
        header = mutate_json(header, rng)
        if not isinstance(header, dict):
            header = {"format": header}
    elif op < 0.33:  # the header's JSON text
        text = json.dumps(header, separators=(",", ":")).encode()
        header_bytes = atheris.Mutate(text, len(text) + 64)
        by_name = None  # the section table is in the text: keep the data as it was
    elif op < 0.38:
        version = rng.choice([2, 3, 4, 4, 5, 0, 1 << 31])
    elif op < 0.65 and names:  # a section's contents
        name = rng.choice(names)
        raw = by_name[name]
        if name in ZSTD_SECTIONS and rng.random() < 0.85:
            plain = _unzstd(raw)
            if plain is not None:
                if name == "config" and rng.random() < 0.6:
                    try:
                        cfg = mutate_json(json.loads(plain), rng)
                        new = json.dumps(cfg).encode()
                    except ValueError:
                        new = _mutate_bytes(plain, rng)
                else:
                    new = _mutate_bytes(plain, rng)
                by_name[name] = _zstd(new, rng.random() < 0.5)
            else:
                by_name[name] = _mutate_bytes(raw, rng)
        else:
            by_name[name] = _mutate_bytes(raw, rng)
    else:  # one payload item: side bytes or the rANS blob, the index rewritten to match
        items = _items(by_name)
        if not items:
            return atheris.Mutate(data, max_size)
        i = rng.randrange(len(items))
        side, blob = items[i]
        if rng.random() < 0.25:
            side = _mutate_bytes(side, rng, 8)
        else:
            blob = _mutate_bytes(blob, rng, 32)
        items[i] = (side, blob)
        if rng.random() < 0.05:  # an item moved or dropped
            j = rng.randrange(len(items))
            items.insert(j, items.pop(i)) if rng.random() < 0.5 else items.pop(i)
        by_name["index"], by_name["payload"] = _index_payload(items)
    if by_name is None:
        _, hlen = PREAMBLE.unpack_from(data)[1:3]
        body = data[_align(PREAMBLE.size + hlen, 64):]
        out = build(version, header, [], header_bytes)
        out = out[:_align(PREAMBLE.size + len(header_bytes), 64)] + body
    else:
        new_sections = [(n, by_name[n], checked) for n, _, checked in sections]
        if rng.random() < 0.03 and new_sections:  # a section dropped or duplicated
            k = rng.randrange(len(new_sections))
            if rng.random() < 0.5:
                new_sections.pop(k)
            else:
                new_sections.insert(k, new_sections[k])
        out = build(version, header, new_sections)
    if len(out) > max_size:
        return atheris.Mutate(data, max_size)
    return out


def mutate_corpus(data: bytes, max_size: int, seed: int) -> bytes:
    """Corpus inputs (mode byte + file): mostly the decompressed file mutated (lines of
    JSONL as JSON, Parquet as its rows) and compressed again."""
    rng = random.Random(seed)
    if not data or rng.random() < 0.3:
        return atheris.Mutate(data, max_size)
    mode = data[0]
    if rng.random() < 0.05:
        mode = rng.randrange(256)
    kind, comp, _ = common.corpus_unmode(mode)
    plain = common.decompress(comp, data[1:], 1 << 18)
    if plain is None:
        return atheris.Mutate(data, max_size)
    if kind == "parquet" and rng.random() < 0.7:
        new = _mutate_parquet(plain, rng)
    elif kind == "jsonl" and rng.random() < 0.6:
        lines = plain.split(b"\n")
        i = rng.randrange(len(lines))
        try:
            lines[i] = json.dumps(mutate_json(json.loads(lines[i]), rng)).encode()
        except (ValueError, RecursionError):
            lines[i] = _mutate_bytes(lines[i], rng, 32)
        new = b"\n".join(lines)
    else:
        new = _mutate_bytes(plain, rng, 64)
    out = bytes([mode]) + common.compress(comp, new)
    if len(out) > max_size:
        return atheris.Mutate(data, max_size)
    return out


PARQUET_VALUES = [None, "", " ", "text", "\ud800", 0, -1, 1 << 62, 1.5, True, b"\xff", [1],
                  {"a": 1}, "x" * 100]


def _mutate_parquet(data: bytes, rng: random.Random) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
        rows = table.to_pylist()
    except Exception:  # noqa: BLE001 - not readable: mutate its bytes instead
        return _mutate_bytes(data, rng, 64)
    cols = table.column_names or ["text"]
    if not rows or rng.random() < 0.2:
        rows.append({c: rng.choice(PARQUET_VALUES) for c in cols})
    row = rng.choice(rows)
    col = rng.choice(cols + ["text", "id", "other"])
    row[col] = rng.choice(PARQUET_VALUES) if rng.random() < 0.7 else mutate_json(row.get(col), rng)
    buf = io.BytesIO()
    try:
        # One type per column, from the first row: other rows' values that do not fit it
        # make the conversion fail, and then a column of strings.
        pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=rng.choice([1, 2, 1024]))
    except Exception:  # noqa: BLE001
        try:
            rows = [{k: None if v is None else str(v) for k, v in r.items()} for r in rows]
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buf)
        except Exception:  # noqa: BLE001
            return _mutate_bytes(data, rng, 64)
    return buf.getvalue()
