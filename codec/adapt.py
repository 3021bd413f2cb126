"""Bandwidth adaptation (CacheGen §5.3): per chunk, the best quality level that fits.

Chunks are stored at several quality levels (one :class:`~kvcodec.store.Store` per
config, best first) and can always be recomputed from their text. Given a bandwidth
estimate and a time-to-first-token budget, :func:`plan` walks the chunks in order and
gives each its fair share of the time left: the best level if it fits, else
recomputation if that fits (it is exact), else the best lower level that fits, else the
cheaper of the smallest level and recomputation. Time a chunk leaves unused flows to the
chunks after it.
"""
from __future__ import annotations

import torch

from .model import KVCache

RECOMPUTE = "recompute"


def plan(sizes: list, bandwidth_bps: float, budget_s: float, recompute_s: float,
         decode_s_per_byte: float = 0.0) -> list:
    """Choose a level per chunk.

    Parameters
    ----------
    sizes : list of list of int or None
        ``sizes[i][j]``: bytes of chunk ``i`` at level ``j`` (best first); None if absent.
    bandwidth_bps : float
        Estimated link bandwidth, bits per second.
    budget_s : float
        Time-to-first-token budget for loading all chunks.
    recompute_s : float
        Estimated time to recompute one chunk from its text.

    Returns
    -------
    list
        Per chunk, a level index or ``RECOMPUTE``.
    """
    choices, spent = [], 0.0
    for i, levels in enumerate(sizes):
        share = max(budget_s - spent, 0.0) / (len(sizes) - i)
        cost = [None if b is None else b * 8 / bandwidth_bps + b * decode_s_per_byte
                for b in levels]
        fits = [j for j, c in enumerate(cost) if c is not None and c <= share]
        if fits and fits[0] == 0:
            j = 0
        elif recompute_s <= share or all(c is None for c in cost):
            j = RECOMPUTE  # exact, so better than any degraded level that fits
        elif fits:
            j = fits[0]
        else:  # nothing fits: the cheapest of the two
            j = min((c, k) for k, c in enumerate(cost) if c is not None)[1]
            if recompute_s < cost[j]:
                j = RECOMPUTE
        choices.append(j)
        spent += recompute_s if j == RECOMPUTE else cost[j]
    return choices


@torch.no_grad()
def load_adaptive(lm, stores: list, token_ids, bandwidth_bps: float, budget_s: float,
                  recompute_s: float):
    """Build a DynamicCache for the whole chunks of ``token_ids`` following :func:`plan`.

    Returns ``(cache, choices)``; a recomputed chunk is prefilled on top of the chunks
    before it, so it is exact given them.
    """
    from transformers import DynamicCache

    from . import api

    n = stores[0].chunk_tokens
    keys_per_store = [s.keys(token_ids) for s in stores]
    full = len(token_ids) // n
    sizes = []
    for i in range(full):
        row = []
        for s, keys in zip(stores, keys_per_store):
            p = s.path(keys[i])
            row.append(p.stat().st_size if p.exists() else None)
        sizes.append(row)
    choices = plan(sizes, bandwidth_bps, budget_s, recompute_s)
    dtype = next(lm.model.parameters()).dtype
    cache = DynamicCache(config=lm.config)
    for i, choice in enumerate(choices):
        ids = token_ids[i * n:(i + 1) * n]
        if choice == RECOMPUTE:
            lm.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
            continue
        with api.open(stores[choice].path(keys_per_store[choice][i])) as f:
            part: KVCache = f.decode(dtype=dtype)
        for layer in range(part.num_layers):
            cache.update(part.keys[layer], part.values[layer], layer)
    return cache, choices
