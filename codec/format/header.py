"""A .kvc file's header: every field checked on open, before any section is read.

:class:`FileHeader` turns an untrusted JSON header into validated geometry, dtype,
token ids, codec config, per-stream quantizers and key transform, and answers the
geometry questions (chunk ranges, token spans) that decode planning asks.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from ..core import codebook, paths
from ..core.checks import MAX_POSITION
from ..core.config import (FULL_ATTENTION_KEY_SCALE, MAX_CHUNK_TOKENS, load_config,
                           resolve_layers)
from ..core.quant import make_quantizer
from ..core.streams import KINDS
from ..core.transforms import layer_ropes
from ..errors import ConfigError, CorruptError, FormatError, ShapeError
from .bounded import ZSTD_FLOOR, ZSTD_RATIO, read_zstd, unzstd
from .container import Reader
from .shared import DIGEST
from .kept import head_spec, kept_bytes, kept_counts, unpack_kept
from .spec import (DTYPES, INDEX_ENTRY, MAX_ANCHOR_TOKENS, MAX_CHANNELS, MAX_CONFIG_BYTES,
                   MAX_LAYERS, MAX_TOKENS, check_geometry, check_kept_geometry, chunk_range,
                   coder_info)


# Parsed config sections: (section bytes, layers, dtype) -> (config, specs, built).
_PARSED: dict = {}

class FileHeader:
    """The checked header of a .kvc file: every field validated on construction, before
    any section other than the small ``config``, ``tokens`` and ``kept`` ones is read.

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
    layer_tokens : list of int
        Tokens each layer holds: the last that many of ``num_tokens`` (fewer than
        ``num_tokens`` for sliding-window layers; every position of an evicted file,
        whose heads keep their own tokens among them).
    evicted : bool
        True for an evicted cache (format version 4, :mod:`kvcodec.format.kept`): each
        head keeps its own subset of the positions (:meth:`kept_counts`), and only those
        tokens are coded, one stream per (layer, kind, head).
    position_offset : int
        Position of the first token when the cache was computed.
    anchor : list of int or None
        For a position-independent chunk (:mod:`kvcodec.blend`): the token ids of the
        fixed prefix it was computed behind (positions ``0 .. len(anchor) - 1``, rows
        dropped). None for a cache computed in place.
    streams : list of tuple
        The payload's streams in file order: ``(layer, kind)``, or ``(layer, kind, head)``
        in an evicted file; ``quant[stream]`` is its quantizer, ``stream_index[stream]``
        its place and ``stream_channels`` its width.
    ropes : list
        Per layer, the :class:`~kvcodec.core.transforms.Rope` its keys were coded without
        (None where keys are coded as the cache held them).
    starts : list of int
        Per layer, the first position it holds.
    kept : numpy.ndarray or None
        An evicted file's kept bitmap ``[layers, heads, positions]`` (bool).
    shared_tables : str or None
        The digest of the shared probability tables a store entry was coded with (format
        v6, :mod:`kvcodec.format.shared`), which its store keeps; None: the file's own.
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
            check_geometry(self.num_layers, self.num_tokens, self.channels)
        except ShapeError as exc:
            raise CorruptError(f"{name}: {exc}") from None
        if not isinstance(h.get("dtype"), str) or h["dtype"] not in DTYPES:
            raise CorruptError(f"{name}: unknown dtype {h.get('dtype')!r:.50}")
        self.dtype = DTYPES[h["dtype"]]
        self.num_chunks = (self.num_tokens + self.chunk_tokens - 1) // self.chunk_tokens
        has_ids = h.get("has_token_ids")
        if not isinstance(has_ids, bool):
            raise CorruptError(f"{name}: has_token_ids must be true or false")
        raw = read_zstd(self._r, "tokens", 4 * self.num_tokens if has_ids else 0)
        self.token_ids = (np.frombuffer(raw, dtype="<u4").astype(np.int64).tolist()
                          if has_ids else None)
        self.model = h.get("model")
        if self.model is not None and not isinstance(self.model, dict):
            raise CorruptError(f"{name}: header field 'model' must be an object or null")
        coder = h.get("coder")
        if coder != coder_info():
            raise FormatError(f"{name}: coded with {coder!r}, which this build does not decode")
        self.evicted = self._evicted(h.get("evicted"), reader.version)
        self.config, specs, self.shared_parse = self._parse_config()
        self._set_streams(specs)
        self.codebook = self._codebook()
        # Negative ones are read as written (encoders once took any integer).
        self.position_offset = g.int("position_offset", -MAX_POSITION, MAX_POSITION)
        self.sink_tokens = g.int("sink_tokens", 0, min(64, self.num_tokens))
        self.anchor = self._anchor(h.get("anchor"))
        self.key_transform = h.get("key_transform")
        try:
            self.ropes = layer_ropes(self.key_transform, self.num_layers, self.head_dim)
        except ConfigError as exc:
            raise CorruptError(f"{name}: {exc}") from None
        if (self.key_transform is None) != (self.config.get("key_transform") is None):
            raise CorruptError(f"{name}: key_transform does not match the codec config")
        self.layer_tokens = self._layer_tokens(h.get("layer_tokens"), reader.version)
        self.starts = [self.num_tokens - t for t in self.layer_tokens]  # each span's first
        self.shared_tables = self._shared_tables(h.get("shared_tables"))
        self.kept = None
        if self.evicted:
            self.kept = self._load_kept()
            self._kept_counts = kept_counts(self.kept)

    def _codebook(self) -> str | None:
        """The codebook digest of the ``klt`` streams (v7), found now (one the file
        embeds, unless held already): a missing one is a CodebookError at open."""
        klt = {id(q): q for q in self.quant.values() if q.transformed}.values()
        books = {q.codebook for q in klt}
        if not books:
            return None
        name = self._r.name
        if self._r.version < 7 or len(books) > 1:
            raise CorruptError(f"{name}: klt streams need a format v7 file naming one "
                               f"codebook (version {self._r.version}, {len(books)} codebooks)")
        digest = books.pop()
        if "codebook" in self._r.sections and codebook.loaded(digest) is None:
            if self._r.section_bounds("codebook")[1] > codebook.MAX_BYTES:
                raise CorruptError(f"{name}: codebook section larger than a codebook")
            codebook.register_bytes(self._r.read_section("codebook"), digest,
                                    f"{name}: section 'codebook'")
        codebook.get(digest)  # here, even where quantizers built before keep its bases
        for q in klt:
            q.inverse(self.stream_channels)
        return digest

    def _shared_tables(self, digest) -> str | None:
        if digest is None:
            return None
        if (self._r.version < 6 or self.evicted or not isinstance(digest, str)
                or not DIGEST.fullmatch(digest)):
            raise CorruptError(f"{self._r.name}: header field 'shared_tables' = "
                               f"{digest!r:.50} is invalid (a digest in a dense format v6 "
                               "file, or absent)")
        return digest

    def _parse_config(self) -> tuple:
        """``(config, specs per layer, cache)``, parsed from the config section, or
        shared with an earlier file of the same section bytes and geometry (a store's
        entries all have one): the config is checked once, and ``cache`` keeps what is
        built from it (the dense streams' quantizers)."""
        raw = self._r.read_section("config")
        key = (raw, self.num_layers, self.dtype)
        got = _PARSED.get(key)
        if got is not None:
            return got
        name = self._r.name
        try:
            cfg = paths.loads_json(unzstd(raw, min(MAX_CONFIG_BYTES, ZSTD_FLOOR + ZSTD_RATIO
                                                   * len(raw)), f"{name}: section 'config'"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptError(f"{name}: the config section is not JSON: {exc}") from None
        try:
            config = load_config(cfg, copy_dict=False)  # parsed from this header
            if FULL_ATTENTION_KEY_SCALE in config:  # writers apply it (config.for_model)
                raise ConfigError(f"{FULL_ATTENTION_KEY_SCALE} is not applied")
            specs = resolve_layers(config, self.num_layers)
        except ConfigError as exc:
            raise CorruptError(f"{name}: invalid codec config in header: {exc}") from None
        if len(_PARSED) >= 32:
            _PARSED.clear()
        got = _PARSED[key] = (config, specs, {})
        return got

    def _evicted(self, flag, version: int) -> bool:
        if flag is None:
            return False
        if flag is not True or version < 4:
            raise CorruptError(f"{self._r.name}: header field 'evicted' = {flag!r:.20} is "
                               "invalid (true in a format v4 file, or absent)")
        return True

    def _set_streams(self, specs: dict) -> None:
        """The file's streams in file order and their quantizers: per (layer, kind), or
        per (layer, kind, head) in an evicted file, whose streams are ``head_dim`` wide."""
        layers, heads, d = range(self.num_layers), self.num_kv_heads, self.head_dim
        if self.evicted:
            try:  # the stream count is capped before a stream is built
                check_kept_geometry(self.num_layers, heads, self.num_tokens)
            except ShapeError as exc:
                raise CorruptError(f"{self._r.name}: {exc}") from None
        self._check_index_size(self.num_layers * len(KINDS) * (heads if self.evicted else 1))
        if not self.evicted:
            self.stream_channels = self.channels
            self.streams = [(l, k) for l in layers for k in KINDS]
            self.stream_index = {st: i for i, st in enumerate(self.streams)}
            self.quant = self.shared_parse.get("dense")
            if self.quant is None:
                self.quant = self.shared_parse["dense"] = {
                    s: make_quantizer(specs[s[1]][s[0]], self.dtype) for s in self.streams}
            self._check_centered()
            return
        self.stream_channels = d
        self.streams = [(l, k, h) for l in layers for k in KINDS for h in range(heads)]
        self.stream_index = {st: i for i, st in enumerate(self.streams)}
        self.quant = {}
        built = {}  # heads of equal specs share one quantizer
        try:
            for s in self.streams:
                spec = head_spec(specs[s[1]][s[0]], s[2], heads, d)
                key = json.dumps(spec, sort_keys=True)
                if key not in built:
                    built[key] = make_quantizer(spec, self.dtype)
                self.quant[s] = built[key]
        except ConfigError as exc:
            raise CorruptError(f"{self._r.name}: invalid codec config in header: {exc}") from None
        self._check_centered()

    def _check_centered(self) -> None:
        """Centered streams (``"center": true``) came with format version 5: a file of an
        older version that claims them was not written by kvcodec."""
        if self._r.version < 5 and any(getattr(q, "center", False) for q in self.quant.values()):
            raise CorruptError(f"{self._r.name}: format version {self._r.version} has no "
                               "centered streams, but its header asks for them")

    def _check_index_size(self, n_streams: int) -> None:
        """The index holds one entry per (chunk, stream): its length, in the section table,
        is checked before a stream is built, so that what a header makes a reader build
        (up to MAX_EVICTED_STREAMS quantizers) is proportional to the file's size."""
        want = self.num_chunks * n_streams * INDEX_ENTRY.size
        have = self._r.section_bounds("index")[1]
        if have != want:
            raise CorruptError(f"{self._r.name}: index has {have} bytes, expected {want} for "
                               f"{n_streams} streams of {self.num_chunks} chunks")

    def _load_kept(self):
        """The ``kept`` section's bitmap, checked (:func:`unpack_kept`)."""
        n_layers, heads, n = self.num_layers, self.num_kv_heads, self.num_tokens
        try:
            check_kept_geometry(n_layers, heads, n)
        except ShapeError as exc:
            raise CorruptError(f"{self._r.name}: {exc}") from None
        # A kept bitmap is bounded by the index, which is in the file: 20 bytes per item
        # (chunk x stream) against at most chunk_tokens / 8 bytes of bitmap per item.
        index_bytes = self._r.section_bounds("index")[1] if "index" in self._r.sections else 0
        raw = read_zstd(self._r, "kept", kept_bytes(n_layers, heads, n),
                        budget=(1 << 20) + index_bytes * max(1, self.chunk_tokens // 80))
        try:
            return unpack_kept(raw, n_layers, heads, n)
        except ValueError as exc:
            raise CorruptError(f"{self._r.name}: invalid kept section: {exc}") from None

    def _layer_tokens(self, spans, version: int) -> list:
        if version < 3:  # every layer held every token
            return [self.num_tokens] * self.num_layers
        if (not isinstance(spans, list) or len(spans) != self.num_layers or not all(
                isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= self.num_tokens
                for t in spans)):
            raise CorruptError(f"{self._r.name}: layer_tokens must list 1..{self.num_tokens} "
                               f"tokens for each of {self.num_layers} layers")
        if self.evicted and min(spans) < self.num_tokens:
            raise CorruptError(f"{self._r.name}: an evicted file's layers span all "
                               f"{self.num_tokens} positions")
        return spans

    def _anchor(self, anchor):
        if anchor is None:
            return None
        if (not isinstance(anchor, list) or not 1 <= len(anchor) <= MAX_ANCHOR_TOKENS
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32
                           for t in anchor)):
            raise CorruptError(f"{self._r.name}: anchor must list 1..{MAX_ANCHOR_TOKENS} "
                               "token ids")
        return anchor

    # -- metadata -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The file's path or URL (``<bytes>``, ``<stream>`` for others), for messages."""
        return self._r.name

    @property
    def size_bytes(self) -> int:
        return self._r.size

    def numel(self) -> int:
        """K/V elements the cache holds (every layer's own span); for an evicted file,
        those of the full cache before eviction, as :meth:`KVCache.numel` counts them."""
        return 2 * sum(self.layer_tokens) * self.channels

    def kept_counts(self) -> torch.Tensor:
        """int64 ``[layers, kv_heads]``: tokens each head holds (its layer's span when
        not evicted)."""
        if self.evicted:
            return torch.from_numpy(self._kept_counts)
        return torch.tensor([[t] * self.num_kv_heads for t in self.layer_tokens])

    def bits_per_element(self) -> float:
        """All-in size (header, tables, index, checksums, payload) per K/V element."""
        return self.size_bytes * 8 / self.numel()

    def coded_columns(self, q) -> int:
        """Symbol columns per token: a stream's channels plus the quantizer's coded side
        columns."""
        return q.coded_columns(self.stream_channels)

    def stream_name(self, stream: int) -> str:
        """``"layer 3 keys"``, or ``"layer 3 head 1 keys"`` in an evicted file."""
        s = self.streams[stream]
        return f"layer {s[0]} " + (f"head {s[2]} " if self.evicted else "") + f"{s[1]}s"

    # -- geometry -------------------------------------------------------------------
    def chunk_range(self, chunks) -> range:
        return chunk_range(chunks, self.num_chunks)

    def span(self, chunks: range) -> tuple:
        """``(first token, token count)`` of a chunk range."""
        t0 = chunks[0] * self.chunk_tokens
        return t0, min(self.num_tokens, (chunks[-1] + 1) * self.chunk_tokens) - t0

    def layer_span(self, layer: int, chunks: range) -> tuple:
        """``(first position, token count)`` of what ``layer`` holds within a chunk range
        (count 0 where its span starts after the range)."""
        t0, n = self.span(chunks)
        first = max(t0, self.starts[layer])
        return first, max(0, t0 + n - first)

    def check_layers(self, layers) -> list:
        layers = list(range(self.num_layers)) if layers is None else list(layers)
        for l in layers:  # numpy's integers too (as indices); True is no layer
            if isinstance(l, bool) or not hasattr(l, "__index__") \
                    or not 0 <= l.__index__() < self.num_layers:
                raise ShapeError(f"layer {l!r} is outside 0..{self.num_layers - 1}")
        return [l.__index__() for l in layers]

    def summary(self) -> dict:
        """Sizes and geometry, for ``kvcodec inspect``."""
        sections = {n: length for n, (_, length, _) in self._r.sections.items()}
        return {
            "file_bytes": self.size_bytes,
            "format_version": self._r.version,
            "created_by": self._r.header.get("created_by"),
            "model": self.model, "config": self.config.get("name"),
            "calibrated_for": (self.config.get("model_name") or self.config.get("model_key")
                               if self.config.get("model_key") else None),
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_tokens": self.num_tokens,
            "layer_tokens": self.layer_tokens, "evicted": self.evicted,
            "kept_fraction": float(self.kept_counts().sum()) / (
                self.num_layers * self.num_kv_heads * self.num_tokens),
            "position_offset": self.position_offset,
            "anchor_tokens": None if self.anchor is None else len(self.anchor),
            "chunk_tokens": self.chunk_tokens, "num_chunks": self.num_chunks,
            "dtype": str(self.dtype).replace("torch.", ""), "elements": self.numel(),
            "bits_per_element": self.bits_per_element(),
            "compression_vs_fp16": self.numel() * 2 / self.size_bytes,
            "sections": sections, "shared_tables": self.shared_tables,
            "codebook": self.codebook, "header_bytes": self._r.data_start,
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
