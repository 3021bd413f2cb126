"""Hugging Face transformers integration: decoded .kvc files as ready caches.

``load_cache`` decodes everything up front into a ``DynamicCache``. ``LayerwiseCache``
starts decoding in a background thread and hands layer ``i`` to attention as soon as it
is decoded, so the model computes layer ``i`` while layer ``i + 1`` decodes (CacheGen's
streaming, §5): the native decoder releases the GIL, so both run at once. Checked
against the transformers 5.x ``Cache`` API (``update(k, v, layer_idx)``,
``get_seq_length``, ``get_mask_sizes``), where the model asks for the sequence length
before layer 0 runs.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .. import format as kvc
from ..core.checks import is_int
from ..core.kvcache import KVCache, check_token_ids
from ..errors import BackendError, KVCodecError, ModelMismatchError, ShapeError
from ..models.attention import check_geometry, model_device, model_dtype
from ..models.fingerprint import check_fingerprint, fingerprint as model_fingerprint
from ..store.batch import fill
from ..store.tails import reuse_end
from .ragged import ragged_cache

DEFAULT_RESERVE = 256


def _open_checked(model, src, fingerprint):
    f = src if isinstance(src, kvc.KVCFile) else kvc.open(src)
    if fingerprint is not None:
        check_fingerprint(f.model, fingerprint)
    return f


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by preallocated ``[1, kv_heads, capacity, head_dim]``
    buffers: the decoder writes the cached tokens into them in place, and the tokens the
    model appends later (the prompt, generated tokens) are written into the spare room
    instead of concatenated, so a cache of ``n`` tokens is never copied per forward.

    Past ``capacity`` it grows by half (one copy). If something else replaces its tensors
    (``batch_select_indices``, ``reset``, ...), it behaves as a plain ``DynamicLayer``.
    """

    def __init__(self, keys_buf: torch.Tensor, values_buf: torch.Tensor, length: int):
        super().__init__()
        if keys_buf.shape != values_buf.shape or not 0 <= length <= keys_buf.shape[-2]:
            raise ShapeError(f"buffers {tuple(keys_buf.shape)} / {tuple(values_buf.shape)} "
                             f"cannot hold {length} tokens")
        self._kbuf, self._vbuf = keys_buf, values_buf
        self.dtype, self.device = keys_buf.dtype, keys_buf.device
        self.keys, self.values = keys_buf[:, :, :length], values_buf[:, :, :length]
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self._kbuf is None else self._kbuf.shape[-2]

    def _in_buffers(self, k: torch.Tensor) -> bool:
        kb, vb = self._kbuf, self._vbuf
        return (kb is not None and self.is_initialized and self.keys is not None
                and self.keys.data_ptr() == kb.data_ptr()
                and self.values.data_ptr() == vb.data_ptr()
                and self.keys.stride() == kb.stride() and self.values.stride() == vb.stride()
                and k.dim() == 4 and k.shape[:2] == kb.shape[:2] and k.shape[3] == kb.shape[3]
                and k.dtype == kb.dtype and k.device == kb.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self._in_buffers(key_states):
            self._kbuf = self._vbuf = None
            return super().update(key_states, value_states, *args, **kwargs)
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self.capacity:
            cap = max(n + m, self.capacity + self.capacity // 2)
            kb = self._kbuf.new_empty((*self._kbuf.shape[:2], cap, self._kbuf.shape[3]))
            vb = self._vbuf.new_empty(kb.shape)
            kb[:, :, :n] = self.keys
            vb[:, :, :n] = self.values
            self._kbuf, self._vbuf = kb, vb
        self._kbuf[:, :, n:n + m] = key_states
        self._vbuf[:, :, n:n + m] = value_states
        self.keys, self.values = self._kbuf[:, :, :n + m], self._vbuf[:, :, :n + m]
        return self.keys, self.values


def advance(cache: DynamicCache, bufs, t0: int, t1: int) -> None:
    """Declare tokens ``t0:t1`` written straight into ``bufs`` (the buffers of a cache made
    by :func:`reserved_cache` that holds ``t0`` tokens)."""
    for layer, (kb, vb) in zip(cache.layers, bufs):
        if isinstance(layer, ReservedLayer) and layer._in_buffers(kb) \
                and layer.keys.shape[-2] == t0:
            layer.keys, layer.values = kb[:, :, :t1], vb[:, :, :t1]
        else:
            layer.update(kb[:, :, t0:t1], vb[:, :, t0:t1])


def cache_buffers(model, n_layers: int, heads: int, tokens, head_dim: int, dtype=None):
    """Per-layer ``(keys, values)`` buffers ``[1, heads, tokens, head_dim]`` for ``model``
    (its dtype and device), after checking that the model has that geometry. ``tokens``
    is one count for every layer or a list of per-layer counts. Decode into them, then
    hand them to the model with :func:`reserved_cache`."""
    check_geometry(model, n_layers, heads, head_dim)
    tokens = [tokens] * n_layers if isinstance(tokens, int) else list(tokens)
    dtype, device = dtype or model_dtype(model), model_device(model)
    try:
        return [(torch.empty((1, heads, t, head_dim), dtype=dtype, device=device),
                 torch.empty((1, heads, t, head_dim), dtype=dtype, device=device))
                for t in tokens]
    except (RuntimeError, MemoryError) as exc:  # torch's allocator: out of memory
        need = 2 * sum(tokens) * heads * head_dim * torch.finfo(dtype).bits // 8
        raise BackendError(f"cannot allocate the cache's {need:,} bytes on {device}: "
                           f"{type(exc).__name__}, out of memory") from None


def _reserve(reserve) -> int:
    """``reserve``, the tokens a cache has room for after its own: an integer >= 0 (a
    string was a TypeError, -1 a buffer one token short)."""
    if not is_int(reserve, 0):
        raise ShapeError(f"reserve must be an integer >= 0 (tokens), got {reserve!r:.40}")
    return reserve


def _window(layer):
    """A cache layer's sliding window, or None for a full-attention layer."""
    return getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None


def _fill_layer(cache: DynamicCache, i: int, kb, vb, length: int, seq_len: int) -> None:
    """Make layer ``i`` hold the first ``length`` tokens of its buffers: the last
    ``length`` of a sequence of ``seq_len`` (fewer for a sliding-window span). A
    sliding-window layer given more than its window (a store's chunks hold every
    token) keeps the last ``window - 1``, as the model's own cache does."""
    layer = cache.layers[i]
    if type(layer) is DynamicLayer:  # the model's own layer kinds stay as they are
        if length != seq_len:
            raise ModelMismatchError(
                f"layer {i} of the cache holds a window of {length} of {seq_len} tokens, "
                "but it is a full-attention layer of this model")
        cache.layers[i] = ReservedLayer(kb, vb, length)
        return
    window = _window(layer)
    first = max(0, length - window + 1) if window else 0
    layer.update(kb[:, :, first:length], vb[:, :, first:length])  # a copy of the window
    if hasattr(layer, "cumulative_length"):  # a sliding window: positions it has seen
        layer.cumulative_length = seq_len


def reserved_cache(model, bufs, lengths, seq_len: int, cache=None) -> DynamicCache:
    """A cache of the model's own layer kinds over ``bufs`` (:func:`cache_buffers`);
    ``lengths`` is one count or per-layer counts of the tokens each holds, the last
    ``lengths`` of a sequence of ``seq_len``. ``cache``: the empty
    ``DynamicCache(config=model.config)`` to fill, where the caller made one."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    lengths = [lengths] * len(bufs) if isinstance(lengths, int) else lengths
    for i, ((kb, vb), n) in enumerate(zip(bufs, lengths)):
        _fill_layer(cache, i, kb, vb, n, seq_len)
    return cache


def cache_from_kv(model, kv, *, reserve: int = DEFAULT_RESERVE) -> DynamicCache:
    """Copy a :class:`kvcodec.KVCache` (e.g. an fp16 cache read from safetensors) into a
    ``DynamicCache`` of the model's dtype with room for ``reserve`` more tokens per layer."""
    spans, reserve = kv.layer_tokens, _reserve(reserve)
    bufs = cache_buffers(model, kv.num_layers, kv.num_kv_heads, [t + reserve for t in spans],
                    kv.head_dim)
    for (kb, vb), k, v, t in zip(bufs, kv.keys, kv.values, spans):
        kb[:, :, :t] = k
        vb[:, :, :t] = v
    return reserved_cache(model, bufs, spans, kv.num_tokens)


def load_cache(model, src, *, fingerprint: dict | None = None, threads: int = 0,
               reserve: int = DEFAULT_RESERVE) -> Cache:
    """Decode a .kvc file (path, bytes, file object, stream or open KVCFile) straight into
    a ``DynamicCache``; a :class:`kvcodec.KVCache` is copied into one (:func:`cache_from_kv`).

    An *evicted* file or cache (each head keeps its own tokens) becomes a
    :class:`kvcodec.integrations.ragged.RaggedCache` instead, and the model is switched
    to the kvcodec attention wrapper that masks each head (:func:`ragged.attach`).

    The cache's buffers are allocated once, with room for ``reserve`` more tokens (the
    prompt, the answer), and the decoder writes into them: no copy of the decoded cache
    is made, and the model's appends do not re-copy it either (:class:`ReservedLayer`).
    A file is decoded in one parallel call; a stream is decoded chunk by chunk while the
    next chunk's bytes arrive.

    Parameters
    ----------
    model : transformers PreTrainedModel
        The model that will use the cache (its config sizes the cache, its dtype is used).
    fingerprint : dict, optional
        The model's fingerprint (``kvcodec.fingerprint(model.config, tokenizer)``); when
        given, a cache from another model raises ``ModelMismatchError``.
    """
    if isinstance(src, KVCache):
        if fingerprint is not None:
            check_fingerprint(src.model, fingerprint)
        return ragged_cache(src, model) if src.evicted else cache_from_kv(model, src,
                                                                           reserve=reserve)
    reserve, f = _reserve(reserve), _open_checked(model, src, fingerprint)
    if getattr(f, "evicted", False):
        return ragged_cache(f.decode(threads=threads), model)
    spans = f.layer_tokens
    bufs = cache_buffers(model, f.num_layers, f.num_kv_heads, [t + reserve for t in spans],
                    f.head_dim)
    views = {l: (kb[:, :, :t], vb[:, :, :t]) for l, ((kb, vb), t) in enumerate(zip(bufs, spans))}
    cache = DynamicCache(config=model.config)
    # Where its layers only hold views of the buffers, a stream's cache is made while the
    # first bytes are on their way, not after the last one (a window layer copies).
    early = f.streaming and all(type(layer) is DynamicLayer for layer in cache.layers)
    if early:
        reserved_cache(model, bufs, spans, f.num_tokens, cache)
    if f.streaming:
        out = KVCache([k for k, _ in views.values()], [v for _, v in views.values()],
                      length=f.num_tokens)
        for _ in f.iter_chunks(out=out, threads=threads):
            pass
    else:
        f.decode_into(views, threads=threads)
    return cache if early else reserved_cache(model, bufs, spans, f.num_tokens, cache)


def cache_from_store(model, store, token_ids, *, threads: int = 0, reserve: int = DEFAULT_RESERVE,
                     partial: bool = False, upto: int | None = None):
    """The longest prefix of ``token_ids`` that ``store`` (a
    :class:`~kvcodec.store.ChunkStore` of this model) holds, decoded straight into a
    ``DynamicCache`` for ``model`` with room for the rest of ``token_ids`` plus
    ``reserve`` tokens (the uncached suffix and the answer are appended in place). Its
    entries are fetched and decoded as one plan (:meth:`ChunkStore.fill`). ``partial``:
    a last, partial chunk counts too where the store holds exactly it (``put`` of the
    same tokens stored it: the same document sent again), or a stored document's end
    that ``token_ids`` continue (:mod:`kvcodec.store.tails`). ``upto``: at most that many
    leading tokens are taken (the lookup still keys all of ``token_ids``, so a stored
    partial chunk of exactly them is found: all but the last token of a prompt sent
    again, as vLLM loads it).

    Returns ``(cache, cached_tokens)``; the cache is empty when nothing is cached."""
    check_fingerprint(store.fingerprint, model_fingerprint(model.config, rope=False))
    ids, reserve = check_token_ids(token_ids), _reserve(reserve)
    fp = store.fingerprint
    bufs = cache_buffers(model, fp["num_layers"], fp["num_kv_heads"], len(ids) + reserve,
                         fp["head_dim"])
    cache = DynamicCache(config=model.config)
    windows = [_window(l) for l in cache.layers]
    # The load follows: an object store's entries come with the lookup (store.held).
    locs = store.lookup(ids, partial=partial, hold=0) if upto is None or upto > 0 else []
    n = fill(store, bufs, ids, locs, threads,
             windows if any(windows) and len(windows) == len(bufs) else None, upto)
    return reserved_cache(model, bufs, n, n, cache), n


@torch.no_grad()
def prefill_with_store(lm, store, token_ids, *, threads: int = 0, recent: int | None = None):
    """A ``DynamicCache`` for ``token_ids``: the cached prefix from ``store``
    (:func:`cache_from_store`), the rest prefilled by the model, the last token always,
    and of a lossy store the last ``recent`` (default
    :data:`~kvcodec.store.tails.RECENT_EXACT`: :func:`~kvcodec.store.tails.reuse_end`).
    Returns ``(cache, cached_tokens, last_logits)``."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise KVCodecError("no tokens to prefill")
    # The lookup keys every token, so that the same prompt sent again is found whole.
    cache, n = cache_from_store(lm.model, store, ids, threads=threads, partial=True,
                                upto=reuse_end(store.config, len(ids), len(ids), recent))
    out = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
    return cache, n, out.logits[0, -1]


class LayerwiseCache:
    """Factory namespace: ``LayerwiseCache.open(model, src)`` returns the cache object.

    The returned object is a ``transformers.DynamicCache`` subclass instance whose layers
    fill on first use; ``timeline`` records ``(event, layer, seconds)`` for decode start /
    end and attention use, which shows the overlap.
    """

    @staticmethod
    def open(model, src, *, fingerprint: dict | None = None, threads: int = 0,
             reserve: int = DEFAULT_RESERVE):
        f = _open_checked(model, src, fingerprint)
        return _make_layerwise(model, f, threads, _reserve(reserve))


def _make_layerwise(model, f: kvc.KVCFile, threads: int, reserve: int):
    class _Layerwise(DynamicCache):
        def __init__(self):
            super().__init__(config=model.config)
            self._file = f
            self._length = f.num_tokens
            self._spans = f.layer_tokens
            self._bufs = cache_buffers(model, f.num_layers, f.num_kv_heads,
                                  [t + reserve for t in self._spans], f.head_dim)
            self._filled = set()
            self._lock = threading.Lock()
            self._t0 = time.perf_counter()
            self.timeline = []
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-decode")
            self._futures = [self._pool.submit(self._decode, i) for i in range(f.num_layers)]
            self._pool.shutdown(wait=False)

        def _mark(self, event, layer):
            self.timeline.append((event, layer, time.perf_counter() - self._t0))

        def _decode(self, layer):
            self._mark("decode_start", layer)
            kb, vb = self._bufs[layer]
            n = self._spans[layer]
            self._file.decode_into({layer: (kb[:, :, :n], vb[:, :, :n])}, threads=threads)
            self._mark("decode_end", layer)

        def _ensure(self, layer):
            if layer in self._filled or layer >= len(self._futures):
                return
            self._futures[layer].result()  # re-raises decode errors here
            with self._lock:
                if layer not in self._filled:
                    _fill_layer(self, layer, *self._bufs[layer], self._spans[layer],
                                self._length)
                    self._filled.add(layer)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self._ensure(layer_idx)
            self._mark("attention", layer_idx)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            if layer_idx not in self._filled:
                return self._length
            return super().get_seq_length(layer_idx)

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
            if layer_idx not in self._filled:
                return self._length + query_length, 0
            return super().get_mask_sizes(query_length, layer_idx)

        def wait(self):
            """Block until every layer is decoded and in place."""
            for i in range(len(self._futures)):
                self._ensure(i)
            return self

    return _Layerwise()
