"""The chunk store as transformers uses it: decode the longest cached prefix straight
into a model's cache (:meth:`Store.load_cache`) and prefill the rest
(:func:`prefill_with_store`). The storage itself (keys, entries, damaged-entry handling)
is :class:`kvcodec.storage.ChunkStore`, which the vLLM connector shares.
"""
from __future__ import annotations

import torch

from ..errors import KVCodecError
from ..integrations import hf
from ..models.fingerprint import check_fingerprint, fingerprint as model_fingerprint
from ..storage import ChunkStore


class Store(ChunkStore):
    """A :class:`~kvcodec.storage.ChunkStore` that loads into transformers caches."""

    def model_buffers(self, model, tokens: int):
        """Cache buffers of ``tokens`` tokens for ``model``, which must be the store's."""
        check_fingerprint(self.fingerprint, model_fingerprint(model.config))
        fp = self.fingerprint
        return hf._buffers(model, fp["num_layers"], fp["num_kv_heads"], tokens, fp["head_dim"])

    def load_cache(self, model, token_ids, *, threads: int = 0,
                   reserve: int = hf.DEFAULT_RESERVE):
        """The longest cached prefix of ``token_ids`` decoded straight into a
        ``DynamicCache`` for ``model``, with room for the rest of ``token_ids`` plus
        ``reserve`` tokens (the uncached suffix and the answer are appended in place).

        Returns ``(cache, cached_tokens)``; the cache is empty when nothing is cached."""
        ids = [int(t) for t in token_ids]
        bufs = self.model_buffers(model, len(ids) + reserve)
        n = self.fill(bufs, ids, self.lookup(ids), threads)
        return hf._reserved_cache(model, bufs, n, n), n


@torch.no_grad()
def prefill_with_store(lm, store: Store, token_ids, *, threads: int = 0):
    """A DynamicCache for ``token_ids``: the cached prefix from ``store``, the rest
    prefilled by the model. Returns ``(cache, cached_tokens, last_logits)``."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise KVCodecError("no tokens to prefill")
    # Keep at least one token to run, so the caller gets the next-token logits.
    cache, n = store.load_cache(lm.model, ids[:-1], threads=threads)
    out = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
    return cache, n, out.logits[0, -1]
