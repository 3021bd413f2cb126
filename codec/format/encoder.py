"""Writing .kvc files: an :class:`Encoder` configured once (python-zstandard's
``ZstdCompressor`` is the model), then ``encode(kv)`` for every cache; :func:`encode` is
the one-shot form."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading

import numpy as np
import torch

from .. import _version
from ..core.config import (MAX_CHUNK_TOKENS, for_model, full_attention_layers, load_config,
                           resolve_layers)
from ..core import codebook
from ..core.checks import check_position_offset, is_int
from ..core.paths import write_output
from ..core.fit import first_fit, save_fitted, wants_first_fit
from ..core.kvcache import KVCache, check_model_geometry, check_token_ids
from ..core.quant import make_quantizer
from ..core.tables import threads as native_threads
from ..core.transforms import applied_key_transform, layer_ropes
from ..errors import ConfigError, ShapeError
from . import container
from .bounded import zstd
from .coding import StreamCoder
from .container import crc32
from .kept import head_spec, pack_kept
from .shared import SharedTables
from .spec import (INDEX_ENTRY, MAX_ANCHOR_TOKENS, check_geometry, check_kept_geometry,
                   coder_info)

log = logging.getLogger("kvcodec")


class Encoder:
    """A codec config resolved once, to code many caches.

    Parameters
    ----------
    config : str, Path or dict
        Codec config name (``"default"``, ``"cachegen"``), JSON path, or dict.
        ``"default"`` is the model's calibrated config where one exists for
        ``fingerprint``, else the model-free default (see :func:`kvcodec.load_config`).
        ``"klt"`` for a model with no ``klt`` config yet: the first cache of at least
        :data:`~kvcodec.core.fit.FIRST_FIT_TOKENS` tokens (dense, at position 0) has
        bases fitted on it under ``"default"``'s steps, kept in the user config
        directory (:attr:`fitted`) for every later cache and process; the caches before
        it are coded with ``"default"``.
    fingerprint : dict, optional
        The model whose caches this encoder codes (recorded in every file, and what picks
        its calibrated config). None: the config is resolved without a model and each
        file records its cache's own ``kv.model``.
    chunk_tokens : int, optional
        Tokens per independently decodable chunk (default: the config's, else 256; an
        evicted cache's default chunk spans as many more positions as it keeps fewer
        tokens, :meth:`chunk_for`).
    threads : int
        Coder threads; 0 = all cores (an attribute: change it between calls).
    target_kl : float, optional
        Ask for a quality instead of steps: the config's steps are scaled along the rate
        curve its calibration measured for the model (:mod:`kvcodec.core.rate`;
        ``kvcodec calibrate --fast`` makes one in about a minute).
    embed_codebook : bool
        For configs with ``klt`` streams (format version 7): put the codebook they name
        into every file (``codebook`` section), so that the file decodes anywhere. By
        default a file names it and readers find it (:func:`kvcodec.core.codebook.get`):
        a codebook is ~1.5 MB for a 135M model, as much as a 700-token file.

    What depends only on these is done here, once: the config is loaded, checked and
    applied to the model (:func:`~kvcodec.core.config.for_model`), and per layer count
    and dtype the quantizers are built; the compressed config section is kept per
    distinct config a file records. A dict config is used as given: leave it unchanged.
    """

    def __init__(self, config="default", fingerprint: dict | None = None, *,
                 chunk_tokens: int | None = None, threads: int = 0,
                 target_kl: float | None = None, embed_codebook: bool = False):
        self.threads = threads
        self.fingerprint = fingerprint
        self.embed_codebook = bool(embed_codebook)
        #: Where a first-encode fit was kept (its config file); None before one, or
        #: where it could not be written (then the files carry its codebook).
        self.fitted = None
        self._fit_base = self._fit_book = None
        self._fit_lock = threading.Lock()
        self._chunk_arg = chunk_tokens
        if wants_first_fit(config, fingerprint):
            if target_kl is not None:
                raise ConfigError("a klt config fitted on the first cache has no rate curve "
                                  "for --target-kl: kvcodec calibrate --klt measures one")
            self._fit_base = load_config("default", model=fingerprint)
            self._configure(dict(self._fit_base))
        else:
            self._configure(load_config(config, copy_dict=False, model=fingerprint,
                                        target_kl=target_kl))

    def _configure(self, config: dict) -> None:
        """Resolve ``config`` for the encoder's model, once (see the class docstring)."""
        self.config, fingerprint, chunk_tokens = config, self.fingerprint, self._chunk_arg
        if isinstance((fingerprint or {}).get("num_layers"), int):
            # As the model's files record it: a store keys its entries by this config,
            # and `store verify` recomputes those keys from the config a file records.
            n = fingerprint["num_layers"]
            self.config = for_model(self.config, fingerprint, n)
            try:  # an optional key transform the model's RoPE rules out (not positions)
                self.config = applied_key_transform(self.config, fingerprint, n, 0, 0)[1]
            except ConfigError:
                pass  # not optional: encode() says why
        self._chunk_given = chunk_tokens is not None
        self.chunk_tokens = chunk_tokens if self._chunk_given else int(
            self.config.get("chunk_tokens", 256))
        # An integer: True was 1 and 1.5 was cut to 1, 0 took the config's own
        if not is_int(self.chunk_tokens, 1, MAX_CHUNK_TOKENS):
            raise ConfigError(f"chunk_tokens must be an integer in [1, {MAX_CHUNK_TOKENS}], "
                              f"got {self.chunk_tokens!r:.40}")
        # Keyed by (layers, the model's full-attention layers that for_model may scale).
        self._applied = {}          # -> (the config as files of such a model record it,
                                    #     its per-kind quantizer specs per layer)
        self._quantizers = {}       # (that key, dtype) -> {(layer, kind): Quantizer}
        self._config_sections = {}  # the JSON a file records -> its zstd section

    def _for_model(self, model, n_layers: int) -> tuple:
        """``(key, config as applied to model's caches, its specs per layer)``."""
        key = (n_layers, tuple(full_attention_layers(model, n_layers)))
        if key not in self._applied:
            cfg = for_model(self.config, model, n_layers)
            self._applied[key] = (cfg, resolve_layers(cfg, n_layers))
        return (key, *self._applied[key])

    def _dense_quantizers(self, key: tuple, specs: dict, dtype) -> dict:
        if (key, dtype) not in self._quantizers:
            self._quantizers[key, dtype] = {(l, k): make_quantizer(specs[k][l], dtype)
                                            for k in specs for l in range(key[0])}
        return self._quantizers[key, dtype]

    def chunk_for(self, kv: KVCache) -> int:
        """The chunk (in positions) a file of ``kv`` is coded in: the encoder's, except
        for an evicted cache without an explicit ``chunk_tokens``, whose chunk is the
        encoder's times the power of two nearest to 1 / (fraction of tokens kept), so
        each head's rANS job still holds about ``chunk_tokens`` rows. Every job ends with
        its lanes' states (64 bytes): at 25% kept, chunks of 256 positions cost 4% of a
        file's bits in those and their index entries."""
        if not kv.evicted or self._chunk_given:
            return self.chunk_tokens
        kept = kv.stored_numel() / max(1, kv.numel())
        mult = 2 ** max(0, round(math.log2(1 / max(kept, 1e-9))))
        return min(MAX_CHUNK_TOKENS, self.chunk_tokens * mult)

    def _config_section(self, cfg: dict) -> bytes:
        raw = json.dumps(cfg, separators=(",", ":")).encode()
        got = self._config_sections.get(raw)
        if got is None:
            if len(self._config_sections) >= 16:
                self._config_sections.clear()
            got = self._config_sections[raw] = zstd(raw)
        return got

    def encode(self, kv, path=None, *, token_ids=None, position_offset: int | None = None,
               importance=None, anchor=None, tables=None) -> bytes:
        """Compress a KV cache into .kvc bytes (and write them to ``path``, crash-safely:
        temp file + fsync + rename).

        Parameters
        ----------
        kv : KVCache, transformers DynamicCache, or list of (key, value) pairs
            Per layer, keys and values ``[1, kv_heads, tokens, head_dim]`` (fp16, bf16 or
            fp32). An evicted cache (``kv.kept``, each head keeping its own tokens) is
            written as format version 4 with only its kept tokens coded
            (:mod:`kvcodec.format.kept`); others as version 3.
        token_ids : optional
            Token ids to record, overriding those ``kv`` carries.
        position_offset : int, optional
            Position of the cache's first token (for configs that strip RoPE from keys);
            default ``len(anchor)`` for an anchored chunk, else 0.
        anchor : list of int, optional
            Token ids of the fixed prefix a position-independent chunk was computed behind
            (default ``kv.anchor``, which ``capture_kv(..., anchor=...)`` sets); recorded so
            that :mod:`kvcodec.blend` refuses a chunk made behind another one.
        importance : Tensor, optional
            ``[layers, tokens]`` attention importance, overriding ``kv.importance``.
            Configs with ``token_importance`` give attended tokens finer steps; without
            importance every token gets the config's step. The decoder needs nothing: the
            steps are coded in the payload.
        tables : SharedTables, optional
            Probability tables shared with other files (:meth:`shared_tables`): used
            instead of the cache's own where they fit it (a dense cache; see
            :mod:`kvcodec.format.shared`). A file coded with them (format version 6)
            records their digest instead of holding tables: its readers must be given
            them (``kvcodec.open(..., tables=)``), which is what a store does.
        """
        kv = as_kvcache(kv)
        model = self.fingerprint if self.fingerprint is not None else kv.model
        token_ids = kv.token_ids if token_ids is None else list(token_ids)
        anchor = kv.anchor if anchor is None else anchor
        if anchor is not None:
            anchor = [int(t) for t in anchor]
            if not 1 <= len(anchor) <= MAX_ANCHOR_TOKENS or min(anchor) < 0 \
                    or max(anchor) >= 1 << 32:
                raise ShapeError(f"an anchor must be 1..{MAX_ANCHOR_TOKENS} token ids in "
                                 "[0, 2**32)")
        if position_offset is None:
            position_offset = len(anchor) if anchor else 0
        n_layers, h, d, n = kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.num_tokens
        position_offset = check_position_offset(position_offset, n)
        check_geometry(n_layers, n, h * d)
        check_model_geometry(model, n_layers, h, d)
        if token_ids is not kv.token_ids:  # the cache's were checked when it was made
            token_ids = check_token_ids(token_ids, n)
        if kv.evicted:
            check_kept_geometry(n_layers, h, n)
        spans = [n] * n_layers if kv.evicted else kv.layer_tokens
        if min(spans) == 0:
            raise ShapeError(f"layer {spans.index(0)} holds no tokens; a file needs every layer")
        pending = self._fit_base is not None  # a first-encode fit: one cache at a time
        with self._fit_lock if pending else contextlib.nullcontext():
            if pending and self._fit_base is not None and not position_offset:
                self._first_fit(kv, model)
            if self._fit_book is not None:
                codebook.register(self._fit_book)  # this process's copy stays at hand
            coder, xform, cfg = self._coder(kv, model, position_offset, importance)
            index, payload = _payload(coder.evicted(kv) if kv.evicted
                                      else coder.dense(kv, tables))
        header = {
            "format": "kvc",
            "created_by": f"kvcodec {_version.__version__}",
            "model": model,
            "num_layers": n_layers, "num_kv_heads": h, "head_dim": d, "num_tokens": n,
            "layer_tokens": spans,
            "dtype": str(kv.dtype).replace("torch.", ""),
            "chunk_tokens": coder.chunk,
            "has_token_ids": token_ids is not None,
            "key_transform": xform,
            "position_offset": int(position_offset),
            "anchor": anchor,
            "sink_tokens": coder.n_sink,
            "coder": coder_info(),
        }
        ids = np.asarray([] if token_ids is None else token_ids, dtype=np.int64)
        tables_section = b"" if coder.shared else zstd(coder.tables_section())
        sections = [
            ("config", self._config_section(cfg), True),
            ("tokens", zstd(ids.astype("<u4").tobytes()), True),
            ("index", index, True),
            ("params", zstd(b"".join(coder.params)), True),
            ("tables", tables_section, True),
            ("sinks", b"".join(coder.sinks), True),
            ("payload", payload, False),
        ]
        version = container.DENSE_VERSION
        if kv.evicted:  # version 4: only evicted files need it
            header["evicted"] = True
            sections.insert(2, ("kept", zstd(pack_kept(kv.kept, n)), True))
            version = container.EVICTED_VERSION
        if _centered(cfg):  # version 5: only files with centered streams need it
            version = container.CENTERED_VERSION
        if coder.shared:  # version 6: coded with a store's tables, which it does not hold
            header["shared_tables"] = tables.digest
            version = container.SHARED_VERSION
        books = codebooks(cfg)
        if books:  # version 7: klt streams, whose bases a codebook holds
            version = container.TRANSFORM_VERSION
            if len(books) > 1:
                raise ConfigError(f"a config's klt streams must share one codebook; this one "
                                  f"names {len(books)}")
            if self.embed_codebook:
                sections.insert(-1, ("codebook", codebook.get(books[0]).to_bytes(), True))
        data = container.build(header, sections, version)
        if path is not None:
            write_output(path, data)
        return data

    @property
    def fit_pending(self) -> bool:
        """Whether this ``"klt"`` encoder still waits for a cache to fit one on (its
        files so far are coded with ``"default"``)."""
        return self._fit_base is not None

    def _first_fit(self, kv: KVCache, model) -> None:
        got = first_fit(kv, self._fit_base, model)
        if got is None:
            return  # too short or evicted: coded with the base config, the fit waits
        cfg, self._fit_book = got
        try:
            self.fitted = save_fitted(cfg, self._fit_book)
        except OSError as exc:  # kept in this process only: files carry the codebook
            log.warning("kvcodec: cannot keep the klt fit (%s); files embed its codebook",
                        exc)
            self.embed_codebook = True
        self._configure(cfg)
        self._fit_base = None

    def _coder(self, kv: KVCache, model, position_offset: int, importance) -> tuple:
        """``(StreamCoder, key transform, config as the file records it)`` for ``kv``."""
        n_layers, h, d, n = kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.num_tokens
        key, cfg, specs = self._for_model(model, n_layers)
        xform, cfg = applied_key_transform(cfg, model, n_layers, position_offset, n)
        n_sink = min(cfg.get("sink_tokens", 0), n)
        importance = kv.importance if importance is None else torch.as_tensor(importance)
        if importance is not None and tuple(importance.shape) != (n_layers, n):
            raise ShapeError(f"importance has shape {tuple(importance.shape)}; expected "
                             f"[layers, tokens] = [{n_layers}, {n}]")
        if kv.evicted:
            def quant(layer, kind, head, _dtype=kv.dtype):
                return make_quantizer(head_spec(specs[kind][layer], head, h, d), _dtype)
        else:
            quant = self._dense_quantizers(key, specs, kv.dtype)
        coder = StreamCoder(cfg, quant, layer_ropes(xform, n_layers, d), self.chunk_for(kv),
                            n_sink, importance, position_offset, native_threads(self.threads))
        return coder, xform, cfg

    def shared_tables(self, kv, position_offset: int = 0,
                      chunk: int | None = None) -> SharedTables:
        """Probability tables for many files of this encoder's model and config, measured
        on the dense cache ``kv`` (a whole document: the more tokens, the better they fit
        other text) and widened (:mod:`kvcodec.format.shared`); pass them to
        :meth:`encode` as ``tables``. ``chunk``: the files will be ``kv``'s chunks of that
        many tokens (a store's entries), so every symbol each chunk codes on its own is
        present too: a file's streams are centered on its own means, and a ``klt``
        stream's first chunk (the document's first tokens, far from its mean) coded
        symbols the whole document's tables lacked, so that entry kept tables of its own
        and its document could not be decoded as one plan."""
        kv = as_kvcache(kv)
        if kv.evicted:
            raise ShapeError("shared tables are measured on a dense cache")
        check_geometry(kv.num_layers, kv.num_tokens, kv.num_kv_heads * kv.head_dim)
        model = self.fingerprint if self.fingerprint is not None else kv.model
        coder, _, _ = self._coder(kv, model, position_offset, None)
        levels = coder.levels(kv)
        for t0 in range(0, kv.num_tokens, chunk) if chunk and chunk < kv.num_tokens else ():
            part = kv.slice(t0, min(kv.num_tokens, t0 + chunk))
            own = self._coder(part, model, position_offset + t0, None)[0].levels(part)
            for lv, got in zip(levels, own):
                lv[(lv == 0) & (got > 0)] = 1  # present, at the lowest level
        return SharedTables.from_levels(levels)


def codebooks(cfg: dict) -> list:
    """The codebook digests a config's quantizers name (``klt`` streams), in order."""
    names = [rule["quantizer"]["basis"]["codebook"] for kind in ("key", "value")
             for rule in cfg.get(kind, ()) if rule["quantizer"].get("type") == "klt"]
    return list(dict.fromkeys(names))


def _centered(cfg: dict) -> bool:
    return any(rule["quantizer"].get("center") for kind in ("key", "value")
               for rule in cfg.get(kind, ()))


def encode(kv, path=None, *, config="default", chunk_tokens: int | None = None,
           threads: int = 0, token_ids=None, model: dict | None = None,
           position_offset: int | None = None, importance=None, anchor=None,
           target_kl: float | None = None, embed_codebook: bool = False) -> bytes:
    """Compress a KV cache into .kvc bytes: :class:`Encoder` ``(config, model or
    kv.model, chunk_tokens=..., threads=..., target_kl=..., embed_codebook=...).encode(kv,
    path, ...)``. Code many caches with one :class:`Encoder` instead.

    Returns
    -------
    bytes
        The .kvc file contents.
    """
    kv = as_kvcache(kv)
    return Encoder(config, kv.model if model is None else model, chunk_tokens=chunk_tokens,
                   threads=threads, target_kl=target_kl,
                   embed_codebook=embed_codebook).encode(kv, path, token_ids=token_ids,
                                           position_offset=position_offset,
                                           importance=importance, anchor=anchor)


def _payload(items: list) -> tuple:
    """``(index, payload)`` bytes of payload items ``(side bytes, blob)`` in file order,
    each indexed with its offset, sizes and CRC."""
    index, payload, offset = [], [], 0
    for side_bytes, blob in items:
        item = side_bytes + blob
        index.append(INDEX_ENTRY.pack(offset, len(side_bytes), len(blob), crc32(item)))
        payload.append(item)
        offset += len(item)
    return b"".join(index), b"".join(payload)


def as_kvcache(kv) -> KVCache:
    """``kv`` as a :class:`KVCache`: a transformers cache or ``(key, value)`` pairs are
    wrapped (no copy)."""
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
