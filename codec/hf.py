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

from . import api
from .model import check_fingerprint


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _open_checked(model, src, fingerprint):
    f = src if isinstance(src, api.KVCFile) else api.open(src)
    if fingerprint is not None:
        check_fingerprint(f.model, fingerprint)
    return f


def load_cache(model, src, *, fingerprint: dict | None = None, threads: int = 0):
    """Decode a .kvc file (path, bytes, file object or open KVCFile) into a DynamicCache.

    Parameters
    ----------
    model : transformers PreTrainedModel
        The model that will use the cache (its config sizes the cache, its dtype is used).
    fingerprint : dict, optional
        The model's fingerprint (``kvcodec.fingerprint(model.config, tokenizer)``); when
        given, a cache from another model raises ``ModelMismatchError``.
    """
    f = _open_checked(model, src, fingerprint)
    kv = f.decode(dtype=_model_dtype(model), threads=threads)
    return kv.to_dynamic_cache(model.config)


class LayerwiseCache:
    """Factory namespace: ``LayerwiseCache.open(model, src)`` returns the cache object.

    The returned object is a ``transformers.DynamicCache`` subclass instance whose layers
    fill on first use; ``timeline`` records ``(event, layer, seconds)`` for decode start /
    end and attention use, which shows the overlap.
    """

    @staticmethod
    def open(model, src, *, fingerprint: dict | None = None, threads: int = 0):
        f = _open_checked(model, src, fingerprint)
        return _make_layerwise(model, f, threads)


def _make_layerwise(model, f: api.KVCFile, threads: int):
    from transformers import DynamicCache

    class _Layerwise(DynamicCache):
        def __init__(self):
            super().__init__(config=model.config)
            self._file = f
            self._length = f.num_tokens
            self._dtype = _model_dtype(model)
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
            k, v = self._file.decode_layers([layer], dtype=self._dtype, threads=threads)[layer]
            self._mark("decode_end", layer)
            return k, v

        def _ensure(self, layer):
            if layer in self._filled or layer >= len(self._futures):
                return
            k, v = self._futures[layer].result()  # re-raises decode errors here
            with self._lock:
                if layer not in self._filled:
                    self.layers[layer].update(k, v)
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
