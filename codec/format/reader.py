"""Encode a KV cache into .kvc bytes and decode it back, whole or by chunk and layer."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from . import container, tables
from .config import MAX_CHUNK_TOKENS, load_config, resolve_layers
from .container import Reader, StreamBuffer, atomic_write, crc32
from .errors import ConfigError, CorruptError, FormatError, KVCodecError, ShapeError
from .model import KVCache
from .quant import MAX_ALPHABET, STEP_GRID, Uniform, make_quantizer, token_step_multipliers
from .transforms import key_transform, rope, rope_tables

INDEX_ENTRY = struct.Struct("<QIII")  # payload offset, side bytes, blob bytes, CRC-32
KINDS = ("key", "value")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_LAYERS = 4096
MAX_TOKENS = 1 << 24
MAX_CHANNELS = 65535
MAX_ELEMENTS = 1 << 34
MAX_CONFIG_BYTES = 16 << 20
# Level 12 is within 0.05% of 19 on the tables and 7x faster to write.
_zstd_level = 12


def _flatten(t: torch.Tensor) -> torch.Tensor:
    """``[1, H, T, D]`` -> float32 ``[T, H*D]``."""
    _, h, n, d = t.shape
    return t[0].detach().to("cpu", torch.float32).permute(1, 0, 2).reshape(n, h * d)


def stream_input(t: torch.Tensor, kind: str, xform: dict | None, offset: int = 0) -> torch.Tensor:
    """What a quantizer sees for one layer's keys or values: ``[T, C]`` float32, keys
    un-rotated first when the config strips RoPE."""
    if kind == "key" and xform:
        t = rope(t, xform["theta"], offset, inverse=True)
    return _flatten(t)


def stream_counts(q, symbols: np.ndarray, channels: int) -> np.ndarray:
    """Per-column symbol histograms, pooled where the quantizer shares tables."""
    counts = tables.channel_counts(symbols, q.table_alphabet)
    groups = q.table_groups(channels)
    if groups is not None:
        pooled = np.zeros_like(counts)
        np.add.at(pooled, groups, counts)
        counts = pooled[groups]
    return counts


def step_multipliers(cfg: dict, importance, layer: int, n_sink: int):
    """Per-token step multipliers for one layer, or None (no importance, or the config
    does not use it)."""
    spec = cfg.get("token_importance")
    if spec is None or importance is None:
        return None
    return token_step_multipliers(importance[layer], spec, skip=n_sink)


def _unflatten(x: torch.Tensor, h: int, d: int) -> torch.Tensor:
    return x.reshape(x.shape[0], h, d).permute(1, 0, 2).unsqueeze(0).contiguous()


def _coder_info() -> dict:
    nat = tables.native()
    return {"name": "rans32x16", "bitstream": int(nat.BITSTREAM_VERSION),
            "prob_bits": int(nat.PROB_BITS), "lanes": int(nat.LANES),
            "table_levels_per_octave": tables.LEVELS_PER_OCTAVE}


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=_zstd_level, write_checksum=True).compress(data)


def encode(kv, path=None, *, config="default", chunk_tokens: int | None = None,
           threads: int = 0, token_ids=None, model: dict | None = None,
           position_offset: int = 0, importance=None) -> bytes:
    """Compress a KV cache into .kvc bytes.

    Parameters
    ----------
    kv : KVCache, transformers DynamicCache, or list of (key, value) pairs
        Per layer, keys and values ``[1, kv_heads, tokens, head_dim]`` (fp16, bf16 or fp32).
    path : str or Path, optional
        Also write the result there, crash-safely (temp file + fsync + rename).
    config : str, Path or dict
        Codec config name (``"default"``, ``"cachegen"``), JSON path, or dict.
    chunk_tokens : int, optional
        Tokens per independently decodable chunk (default: the config's, else 256).
    threads : int
        Coder threads; 0 = all cores.
    token_ids, model : optional
        Token ids and model fingerprint to record, overriding those carried by ``kv``.
    position_offset : int
        Position of the cache's first token (for configs that strip RoPE from keys).
    importance : Tensor, optional
        ``[layers, tokens]`` attention importance, overriding ``kv.importance`` (which
        :func:`kvcodec.capture_kv` fills in). Configs with ``token_importance`` give
        attended tokens finer steps; without importance every token gets the config's
        step. The decoder needs nothing: the steps are coded in the payload.

    Returns
    -------
    bytes
        The .kvc file contents.
    """
    kv = _as_kvcache(kv)
    cfg = load_config(config)
    chunk = int(chunk_tokens or cfg.get("chunk_tokens", 256))
    if not 1 <= chunk <= MAX_CHUNK_TOKENS:
        raise ConfigError(f"chunk_tokens must be in [1, {MAX_CHUNK_TOKENS}], got {chunk}")
    token_ids = kv.token_ids if token_ids is None else list(token_ids)
    model = kv.model if model is None else model
    n_layers, h, d, n = kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.num_tokens
    _check_geometry(n_layers, n, h * d)
    if token_ids is not None and len(token_ids) != n:
        raise ShapeError(f"{len(token_ids)} token ids for a cache of {n} tokens")
    specs = resolve_layers(cfg, n_layers)
    xform = key_transform(cfg, model)
    n_sink = min(cfg.get("sink_tokens", 0), n)
    importance = kv.importance if importance is None else torch.as_tensor(importance)
    if importance is not None and tuple(importance.shape) != (n_layers, n):
        raise ShapeError(f"importance has shape {tuple(importance.shape)}; expected "
                         f"[layers, tokens] = [{n_layers}, {n}]")

    params_blob, levels_blob, jobs, sides, sinks = [], [], [], [], []
    for layer in range(n_layers):
        for kind, src in zip(KINDS, (kv.keys, kv.values)):
            q = make_quantizer(specs[kind][layer], kv.dtype)
            x = stream_input(src[layer], kind, xform, position_offset)
            if not torch.isfinite(x).all():
                raise ShapeError(f"{kind}s of layer {layer} contain NaN or infinity")
            sinks.append(x[:n_sink].half().numpy().astype("<f2").tobytes())
            params = q.fit(x)
            symbols, side = q.quantize(x, params, step_multipliers(cfg, importance, layer, n_sink))
            for name in q.param_names:
                params_blob.append(params[name].astype("<f2").tobytes())
            levels = tables.levels_from_counts(stream_counts(q, symbols, x.shape[1]))
            # Padded to 256 symbols: the packing stores only each row's present span.
            levels_blob.append(np.pad(levels, ((0, 0), (0, MAX_ALPHABET - levels.shape[1]))))
            jobs.append((np.ascontiguousarray(symbols), tables.freqs_from_levels(levels)))
            sides.append(side)
    blobs = tables.native().encode_many(jobs, chunk, threads)

    n_chunks = (n + chunk - 1) // chunk
    index, payload, offset = [], [], 0
    for c in range(n_chunks):
        rows = slice(c * chunk, min(n, (c + 1) * chunk))
        for s, side in enumerate(sides):
            side_bytes = b"" if side is None else side[rows].astype("<f2").tobytes()
            item = side_bytes + blobs[s][c]
            index.append(INDEX_ENTRY.pack(offset, len(side_bytes), len(blobs[s][c]), crc32(item)))
            payload.append(item)
            offset += len(item)
    header = {
        "format": "kvc",
        "created_by": f"kvcodec {_version()}",
        "model": model,
        "num_layers": n_layers, "num_kv_heads": h, "head_dim": d, "num_tokens": n,
        "dtype": str(kv.dtype).replace("torch.", ""),
        "chunk_tokens": chunk,
        "has_token_ids": token_ids is not None,
        "key_transform": xform,
        "position_offset": int(position_offset),
        "sink_tokens": n_sink,
        "coder": _coder_info(),
    }
    ids = np.asarray([] if token_ids is None else token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ShapeError("token ids must be in [0, 2**32)")
    data = container.build(header, [
        ("config", _zstd(json.dumps(cfg, separators=(",", ":")).encode()), True),
        ("tokens", _zstd(ids.astype("<u4").tobytes()), True),
        ("index", b"".join(index), True),
        ("params", _zstd(b"".join(params_blob)), True),
        ("tables", _zstd(tables.pack_levels(np.concatenate(levels_blob))), True),
        ("sinks", b"".join(sinks), True),
        ("payload", b"".join(payload), False),
    ])
    if path is not None:
        atomic_write(path, data)
    return data


def _version() -> str:
    from . import __version__

    return __version__


def _as_kvcache(kv) -> KVCache:
    if isinstance(kv, KVCache):
        return kv
    if hasattr(kv, "layers"):  # a transformers Cache
        return KVCache.from_dynamic_cache(kv)
    if isinstance(kv, (list, tuple)):
        try:
            keys, values = [p[0] for p in kv], [p[1] for p in kv]
        except (TypeError, IndexError):
            raise ShapeError("expected a list of (key, value) tensor pairs") from None
        return KVCache(keys, values)
    raise ShapeError(f"cannot encode a {type(kv).__name__}; pass a KVCache, DynamicCache "
                     "or list of (key, value) pairs")


def _check_geometry(n_layers: int, n_tokens: int, channels: int) -> None:
    if n_layers > MAX_LAYERS or n_tokens > MAX_TOKENS or channels > MAX_CHANNELS:
        raise ShapeError(
            f"{n_layers} layers x {n_tokens} tokens x {channels} channels exceeds the format "
            f"limits ({MAX_LAYERS} layers, {MAX_TOKENS} tokens, {MAX_CHANNELS} channels)")
    if 2 * n_layers * n_tokens * channels > MAX_ELEMENTS:
        raise ShapeError(f"a cache of more than {MAX_ELEMENTS} elements is over the format cap")


def decode(source, *, dtype: torch.dtype | None = None, threads: int = 0) -> KVCache:
    """Decode a whole .kvc file (path, bytes or binary file object) into a :class:`KVCache`."""
    with open(source) as f:
        return f.decode(dtype=dtype, threads=threads)


def open(source) -> "KVCFile":  # noqa: A001 - mirrors builtins.open on purpose
    """Open a .kvc file lazily for random access by chunk and layer.

    ``source`` is a path, bytes, a seekable binary file object, or any readable stream
    (a socket file, a pipe, a rate-limited reader): with a stream, the header is parsed
    as soon as it arrives and chunks decode while later bytes are still in flight
    (see :meth:`KVCFile.iter_chunks`).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            f = path.open("rb")
        except OSError as exc:
            raise KVCodecError(f"cannot open {path}: {exc.strerror}") from None
        try:
            return KVCFile(Reader(f, str(path)))
        except BaseException:
            f.close()
            raise
    if isinstance(source, (bytes, bytearray, memoryview)):
        return KVCFile(Reader(source))
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        seekable = getattr(source, "seekable", None)
        if hasattr(source, "seek") and (seekable is None or seekable()):
            return KVCFile(Reader(source, name))
        return KVCFile(Reader(StreamBuffer(source), name))
    raise KVCodecError(f"cannot open a {type(source).__name__}; give a path, bytes or a "
                       "readable (seekable or streaming) file object")


class KVCFile:
    """A parsed .kvc file. Header fields are checked on open; sections are read lazily.

    Attributes
    ----------
    num_layers, num_kv_heads, head_dim, num_tokens, chunk_tokens, num_chunks : int
    dtype : torch.dtype
        The dtype the cache had when encoded (the default decode dtype).
    token_ids : list of int or None
    model : dict or None
        Fingerprint of the model that made the cache.
    config : dict
        The full codec config used.
    """

    def __init__(self, reader: Reader):
        self._r = reader
        h = reader.header
        name = reader.name
        if h.get("format") != "kvc":
            raise FormatError(f"{name}: header does not describe a kvc cache")
        g = _HeaderFields(h, name)
        self.num_layers = g.int("num_layers", 1, MAX_LAYERS)
        self.num_kv_heads = g.int("num_kv_heads", 1, MAX_CHANNELS)
        self.head_dim = g.int("head_dim", 1, MAX_CHANNELS)
        self.num_tokens = g.int("num_tokens", 1, MAX_TOKENS)
        self.chunk_tokens = g.int("chunk_tokens", 1, MAX_CHUNK_TOKENS)
        self.channels = self.num_kv_heads * self.head_dim
        try:
            _check_geometry(self.num_layers, self.num_tokens, self.channels)
        except ShapeError as exc:
            raise CorruptError(f"{name}: {exc}") from None
        if h.get("dtype") not in DTYPES:
            raise CorruptError(f"{name}: unknown dtype {h.get('dtype')!r}")
        self.dtype = DTYPES[h["dtype"]]
        self.num_chunks = (self.num_tokens + self.chunk_tokens - 1) // self.chunk_tokens
        has_ids = h.get("has_token_ids")
        if not isinstance(has_ids, bool):
            raise CorruptError(f"{name}: has_token_ids must be true or false")
        try:
            cfg = json.loads(self._unzstd("config", MAX_CONFIG_BYTES, exact=False))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptError(f"{name}: the config section is not JSON: {exc}") from None
        raw = self._unzstd("tokens", 4 * self.num_tokens if has_ids else 0)
        self.token_ids = (np.frombuffer(raw, dtype="<u4").astype(np.int64).tolist()
                          if has_ids else None)
        self.model = h.get("model") if isinstance(h.get("model"), dict) else None
        coder = h.get("coder")
        if coder != _coder_info():
            raise FormatError(f"{name}: coded with {coder!r}, which this build does not decode")
        try:
            self.config = load_config(cfg, copy_dict=False)  # parsed from this header
            specs = resolve_layers(self.config, self.num_layers)
        except ConfigError as exc:
            raise CorruptError(f"{name}: invalid codec config in header: {exc}") from None
        self._quant = {(l, k): make_quantizer(specs[k][l], self.dtype)
                       for l in range(self.num_layers) for k in KINDS}
        self._streams = [(l, k) for l in range(self.num_layers) for k in KINDS]
        self.position_offset = g.int("position_offset", -(1 << 40), 1 << 40)
        self.sink_tokens = g.int("sink_tokens", 0, min(64, self.num_tokens))
        try:
            self.key_transform = key_transform(
                {"key_transform": h.get("key_transform")}, self.model) if h.get(
                "key_transform") is not None else None
        except ConfigError as exc:
            raise CorruptError(f"{name}: {exc}") from None
        if (self.key_transform is None) != (self.config.get("key_transform") is None):
            raise CorruptError(f"{name}: key_transform does not match the codec config")
        self._sinks = None
        self._index = None
        self._params = None
        self._levels = None
        self._dtables = None

    # -- metadata -------------------------------------------------------------------
    @property
    def header(self) -> dict:
        return self._r.header

    @property
    def size_bytes(self) -> int:
        return self._r.size

    def numel(self) -> int:
        return 2 * self.num_layers * self.num_tokens * self.channels

    def bits_per_element(self) -> float:
        """All-in size (header, tables, index, checksums, payload) per K/V element."""
        return self.size_bytes * 8 / self.numel()

    def close(self) -> None:
        self._r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _coded(self, q) -> int:
        """Symbol columns per token: the channels plus the quantizer's coded side columns."""
        return q.coded_columns(self.channels)

    # -- lazily parsed sections -------------------------------------------------------
    def _unzstd(self, section: str, expected: int, exact: bool = True) -> bytes:
        """A zstd section's contents: exactly ``expected`` bytes, or at most that many
        with ``exact=False``."""
        import zstandard

        data = self._r.read_section(section)
        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(expected, 1))
        except zstandard.ZstdError as exc:
            raise CorruptError(f"{self._r.name}: section {section!r} does not decompress: {exc}") from None
        if len(out) != expected if exact else len(out) > expected:
            raise CorruptError(f"{self._r.name}: section {section!r} holds {len(out)} bytes, "
                               f"expected {expected}")
        return out

    def _load_sinks(self):
        if self._sinks is None:
            raw = self._r.read_section("sinks")
            n = self.sink_tokens * self.channels
            if len(raw) != 2 * n * len(self._streams):
                raise CorruptError(f"{self._r.name}: sinks section has the wrong size")
            arr = np.frombuffer(raw, dtype="<f2").reshape(len(self._streams), self.sink_tokens,
                                                          self.channels)
            self._sinks = torch.from_numpy(arr.astype(np.float32))
        return self._sinks

    def _load_index(self):
        if self._index is not None:
            return self._index
        n_items = self.num_chunks * len(self._streams)
        raw = self._r.read_section("index")
        if len(raw) != n_items * INDEX_ENTRY.size:
            raise CorruptError(f"{self._r.name}: index has {len(raw)} bytes, expected "
                               f"{n_items * INDEX_ENTRY.size}")
        idx = np.frombuffer(raw, dtype=np.dtype([("off", "<u8"), ("side", "<u4"),
                                                  ("blob", "<u4"), ("crc", "<u4")]))
        ends = idx["off"] + idx["side"].astype(np.uint64) + idx["blob"]
        _, payload_len = self._r.section_bounds("payload")
        if n_items and (idx["off"][0] != 0 or np.any(idx["off"][1:] != ends[:-1])
                        or int(ends[-1]) != payload_len):
            raise CorruptError(f"{self._r.name}: index entries do not tile the payload")
        nat = tables.native()
        for i, entry in enumerate(idx):
            chunk, s = divmod(i, len(self._streams))
            rows = min(self.chunk_tokens, self.num_tokens - chunk * self.chunk_tokens)
            q = self._quant[self._streams[s]]
            if int(entry["side"]) != rows * q.side_per_token * 2:
                raise CorruptError(f"{self._r.name}: chunk {chunk} side information has the wrong size")
            if int(entry["blob"]) > nat.max_encoded_size(rows, self._coded(q)):
                raise CorruptError(f"{self._r.name}: chunk {chunk} blob is larger than possible")
        self._index = idx
        return idx

    def _load_tables(self):
        if self._levels is not None:
            return
        c = self.channels
        psizes = [len(self._quant[s].param_names) * c * 2 for s in self._streams]
        lrows = [self._coded(self._quant[s]) for s in self._streams]
        praw = self._unzstd("params", sum(psizes))
        # Packed tables: 2 span bytes per row plus at most one code per symbol.
        lraw = self._unzstd("tables", sum(lrows) * (2 + MAX_ALPHABET), exact=False)
        try:
            lall = tables.unpack_levels(lraw, sum(lrows), MAX_ALPHABET)
        except ValueError as exc:
            raise CorruptError(f"{self._r.name}: invalid probability tables: {exc}") from None
        params, levels, po, lo = {}, {}, 0, 0
        for s, ps, ls in zip(self._streams, psizes, lrows):
            q = self._quant[s]
            arr = np.frombuffer(praw, dtype="<f2", count=ps // 2, offset=po).reshape(-1, c)
            params[s] = {name: arr[i].astype(np.float16) for i, name in enumerate(q.param_names)}
            lv = lall[lo:lo + ls]
            if lv[:, q.table_alphabet:].any():
                raise CorruptError(f"{self._r.name}: a table of layer {s[0]} {s[1]}s has "
                                   "symbols outside its quantizer's alphabet")
            lv = np.ascontiguousarray(lv[:, :q.table_alphabet])
            if lv.max(initial=0) > tables.MAX_LEVEL or np.any(lv.max(axis=1) == 0):
                raise CorruptError(f"{self._r.name}: invalid probability table for layer {s[0]} {s[1]}s")
            levels[s] = lv
            po += ps
            lo += ls
        self._params, self._levels = params, levels
        # Tables are built once per file, not per decoded chunk.
        self._freqs = dict(zip(levels, tables.native().normalize_many(list(levels.values()))))

    # -- decoding -----------------------------------------------------------------------
    def _chunk_range(self, chunks) -> range:
        if chunks is None:
            return range(self.num_chunks)
        if isinstance(chunks, int):
            chunks = range(chunks, chunks + 1)
        elif isinstance(chunks, slice):
            chunks = range(self.num_chunks)[chunks]
        elif not isinstance(chunks, range):
            chunks = list(chunks)
            if not chunks or chunks != list(range(chunks[0], chunks[-1] + 1)):
                raise ShapeError("chunks must be a contiguous, increasing range")
            chunks = range(chunks[0], chunks[-1] + 1)
        if len(chunks) == 0 or chunks.step != 1 or chunks[0] < 0 or chunks[-1] >= self.num_chunks:
            raise ShapeError(f"chunk range {chunks} is outside 0..{self.num_chunks - 1}")
        return chunks

    def _span(self, chunks: range) -> tuple:
        """``(first token, token count)`` of a chunk range."""
        t0 = chunks[0] * self.chunk_tokens
        return t0, min(self.num_tokens, (chunks[-1] + 1) * self.chunk_tokens) - t0

    def _read_item(self, chunk: int, stream: int):
        """``(side bytes, blob memoryview)`` of one payload item, checksum verified."""
        e = self._load_index()[chunk * len(self._streams) + stream]
        item = self._r.read_range("payload", int(e["off"]), int(e["side"]) + int(e["blob"]))
        if crc32(item) != int(e["crc"]):
            l, k = self._streams[stream]
            raise CorruptError(f"{self._r.name}: checksum mismatch in chunk {chunk}, "
                               f"layer {l} {k}s; the file is damaged")
        return item[:int(e["side"])], memoryview(item)[int(e["side"]):]

    def _decode_tables(self):
        """Native decode tables of every stream, built once per file (in parallel)."""
        if self._dtables is None:
            self._load_tables()
            built = tables.native().build_decode_tables([self._freqs[s] for s in self._streams])
            self._dtables = dict(zip(self._streams, built))
        return self._dtables

    def _fused_dequant(self, q, kind: str, t0: int, rows: int, dst: torch.Tensor):
        """The native dequantizer's arguments for per-token-step uniform streams (the
        shipped default), or None where the quantizer has no fused path. It writes
        straight into ``dst`` when that is a float32 CPU view with contiguous tokens;
        otherwise into a scratch array that is cast into ``dst`` afterwards."""
        if not (isinstance(q, Uniform) and q.scale == "token"):
            return None
        d = self.head_dim
        if (dst.dtype == torch.float32 and dst.device.type == "cpu" and dst.stride(3) == 1
                and dst.stride(2) == d):
            out = dst[0].numpy()
        else:
            out = np.empty((self.num_kv_heads, rows, d), dtype=np.float32)
        cos = sin = None
        if kind == "key" and self.key_transform:
            c, s = rope_tables(self.position_offset + t0, rows, d, self.key_transform["theta"])
            cos, sin = c.numpy(), s.numpy()
        mult = q._head_mult(self.channels).numpy()
        return (STEP_GRID, mult, q.r, self.num_kv_heads, out, cos, sin)

    def _check_layers(self, layers) -> list:
        layers = list(range(self.num_layers)) if layers is None else list(layers)
        for l in layers:
            if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < self.num_layers:
                raise ShapeError(f"layer {l!r} is outside 0..{self.num_layers - 1}")
        return layers

    def _prepare(self, dst: dict, chunks: range) -> dict:
        """Read and verify the payload items of ``dst``'s layers over ``chunks`` and build
        the native decode jobs (the I/O half of a decode; :meth:`_execute` is the rest)."""
        self._load_index()
        dtab = self._decode_tables()
        t0, rows = self._span(chunks)
        shape = (1, self.num_kv_heads, rows, self.head_dim)
        jobs, work = [], []
        for l, pair in dst.items():
            for k, target in zip(KINDS, pair):
                if tuple(target.shape) != shape or target.dtype not in DTYPES.values():
                    raise ShapeError(f"destination of layer {l} {k}s is {target.dtype} "
                                     f"{tuple(target.shape)}; need a float {shape}")
                s = self._streams.index((l, k))
                items = [self._read_item(c, s) for c in chunks]
                q = self._quant[(l, k)]
                out = np.empty((rows, self._coded(q)), dtype=np.uint8)
                deq = self._fused_dequant(q, k, t0, rows, target)
                jobs.append(([blob for _, blob in items], dtab[(l, k)], out, deq))
                work.append((l, k, target, out, deq, b"".join(side for side, _ in items)))
        return {"t0": t0, "rows": rows, "jobs": jobs, "work": work}

    def _execute(self, prep: dict, threads: int = 0) -> None:
        """Decode prepared jobs (the GIL is released) and finish them into their targets."""
        errors = tables.native().decode_many(prep["jobs"], self.chunk_tokens, threads)
        t0, rows = prep["t0"], prep["rows"]
        n_sink = max(0, min(self.sink_tokens - t0, rows))
        for err, (l, k, target, out, deq, side) in zip(errors, prep["work"]):
            if err is not None:
                raise CorruptError(f"{self._r.name}: layer {l} {k}s: {err}")
            q = self._quant[(l, k)]
            rope_here = k == "key" and self.key_transform
            if deq is not None:
                # Decoded, dequantized and re-rotated natively; only sink rows remain.
                if deq[4].ctypes.data != target.data_ptr():
                    target.copy_(torch.from_numpy(deq[4]).unsqueeze(0))
                if n_sink:
                    x = self._load_sinks()[self._streams.index((l, k)), t0:t0 + n_sink].clone()
                    st = _unflatten(x, self.num_kv_heads, self.head_dim)
                    if rope_here:
                        st = rope(st, self.key_transform["theta"], self.position_offset + t0)
                    target[:, :, :n_sink] = st
                continue
            if q.alphabet < q.table_alphabet and out[:, :self.channels].max(initial=0) >= q.alphabet:
                raise CorruptError(f"{self._r.name}: layer {l} {k}s decode to symbols outside "
                                   "the quantizer's range; the header does not match the data")
            side = (np.frombuffer(side, dtype="<f2").reshape(-1, q.side_per_token)
                    if q.side_per_token else None)
            x = q.dequantize(torch.from_numpy(out), self._params[(l, k)], side)
            if n_sink:
                x[:n_sink] = self._load_sinks()[self._streams.index((l, k)), t0:t0 + n_sink]
            t = _unflatten(x, self.num_kv_heads, self.head_dim)
            if rope_here:
                t = rope(t, self.key_transform["theta"], self.position_offset + t0)
            target.copy_(t)

    def decode_into(self, dst: dict, chunks=None, *, threads: int = 0) -> None:
        """Decode layers straight into caller-owned tensors (no intermediate copies).

        Parameters
        ----------
        dst : dict
            ``{layer: (keys, values)}``, each a float tensor ``[1, kv_heads, tokens,
            head_dim]`` where tokens covers ``chunks``. Views of larger buffers are fine
            (e.g. ``buf[:, :, :n]`` of a cache preallocated with room for a prompt); with
            float32 targets whose tokens are contiguous the native decoder writes into
            them directly, other dtypes are cast into place.
        """
        self._check_layers(dst.keys())
        self._execute(self._prepare(dst, self._chunk_range(chunks)), threads)

    def decode_layers(self, layers=None, chunks=None, *, dtype=None, threads: int = 0):
        """Decode chosen layers over a contiguous chunk range.

        Returns
        -------
        dict
            ``{layer: (keys, values)}``, each ``[1, kv_heads, tokens, head_dim]`` where
            tokens covers ``chunks`` (all chunks by default).
        """
        chunks = self._chunk_range(chunks)
        layers = self._check_layers(layers)
        shape = (1, self.num_kv_heads, self._span(chunks)[1], self.head_dim)
        dtype = dtype or self.dtype
        dst = {l: (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
               for l in layers}
        self.decode_into(dst, chunks, threads=threads)
        return dst

    @property
    def streaming(self) -> bool:
        """True when the source is a forward-only stream (bytes arrive as they are read)."""
        return self._r.streaming

    def iter_chunks(self, chunks=None, *, out: KVCache | None = None, dtype=None,
                    threads: int = 0):
        """Decode chunk by chunk, in file order, into preallocated tensors.

        A reader thread fetches chunk ``i + 1``'s bytes while chunk ``i`` decodes (native
        code, without the GIL), so over a stream decoding overlaps the transfer. Yields ``(chunk, t0, t1)`` once tokens ``[t0, t1)`` of every layer are
        in ``out``.

        Parameters
        ----------
        out : KVCache, optional
            Destination, ``[1, kv_heads, tokens, head_dim]`` per layer covering the chunk
            range; views of larger buffers are fine (allocated when omitted; read it from
            ``self.last_out``).
        """
        from concurrent.futures import ThreadPoolExecutor

        chunks = self._chunk_range(chunks)
        base, total = self._span(chunks)
        dtype = dtype or self.dtype
        if out is None:
            shape = (1, self.num_kv_heads, total, self.head_dim)
            out = KVCache([torch.empty(shape, dtype=dtype) for _ in range(self.num_layers)],
                          [torch.empty(shape, dtype=dtype) for _ in range(self.num_layers)])
        elif out.num_layers != self.num_layers or out.num_tokens != total:
            raise ShapeError(f"out holds {out.num_layers} layers x {out.num_tokens} tokens; "
                             f"need {self.num_layers} x {total}")
        self.last_out = out

        def step(c):
            t0 = c * self.chunk_tokens - base
            t1 = min(self.num_tokens - base, t0 + self.chunk_tokens)
            dst = {l: (out.keys[l][:, :, t0:t1], out.values[l][:, :, t0:t1])
                   for l in range(self.num_layers)}
            return (c, t0, t1), self._prepare(dst, range(c, c + 1))

        # Everything but the payload is read up front, so the reader thread below is the
        # only one touching the source while chunks decode here.
        self._load_index()
        self._decode_tables()
        if self.sink_tokens:
            self._load_sinks()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-read") as pool:
            ahead = pool.submit(step, chunks[0])
            for i in range(len(chunks)):
                span, prep = ahead.result()
                if i + 1 < len(chunks):
                    ahead = pool.submit(step, chunks[i + 1])  # read while this one decodes
                self._execute(prep, threads)
                yield span

    def decode(self, chunks=None, *, dtype=None, threads: int = 0) -> KVCache:
        """Decode every layer over ``chunks`` (default all) into a :class:`KVCache`."""
        chunks = self._chunk_range(chunks)
        layers = self.decode_layers(None, chunks, dtype=dtype, threads=threads)
        t0 = chunks[0] * self.chunk_tokens
        ids = None
        if self.token_ids is not None:
            ids = self.token_ids[t0:t0 + layers[0][0].shape[2]]
        return KVCache([layers[l][0] for l in range(self.num_layers)],
                       [layers[l][1] for l in range(self.num_layers)], ids, self.model)

    def summary(self) -> dict:
        """Sizes and geometry, for ``kvcodec inspect``."""
        sections = {n: length for n, (_, length, _) in self._r.sections.items()}
        return {
            "file_bytes": self.size_bytes,
            "format_version": container.FORMAT_VERSION,
            "created_by": self.header.get("created_by"),
            "model": self.model,
            "config": self.config.get("name"),
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_tokens": self.num_tokens,
            "chunk_tokens": self.chunk_tokens, "num_chunks": self.num_chunks,
            "dtype": str(self.dtype).replace("torch.", ""),
            "elements": self.numel(),
            "bits_per_element": self.bits_per_element(),
            "compression_vs_fp16": self.numel() * 2 / self.size_bytes,
            "sections": sections,
            "header_bytes": self._r.data_start,
        }


class _HeaderFields:
    def __init__(self, header: dict, name: str):
        self.h, self.name = header, name

    def int(self, key: str, lo: int, hi: int) -> int:
        v = self.h.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise CorruptError(f"{self.name}: header field {key!r} = {v!r:.50} is not an "
                               f"integer in [{lo}, {hi}]")
        return v
