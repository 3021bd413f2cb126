"""Bandwidth adaptation (CacheGen §5.3): per chunk, the best quality level that fits.

Chunks are stored at several quality levels (one :class:`~kvcodec.store.ChunkStore` per
config, best first) and can always be recomputed from their text. Given a bandwidth
estimate and a time-to-first-token budget, :func:`plan` walks the chunks in order and
gives each its fair share of the time left: the best level if it fits, else
recomputation if that fits (it is exact), else the best lower level that fits, else the
cheaper of the smallest level and recomputation. Time a chunk leaves unused flows to the
chunks after it.
"""
from __future__ import annotations

import torch

from ..core.kvcache import token_views
from ..errors import KVCodecError
from ..models.fingerprint import check_fingerprint
from . import hf

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


_UNITS = {"": 1.0, "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}


def parse_bandwidth(text) -> float:
    """Bits per second from ``"1gbps"``, ``"200 Mbps"``, ``"10gbit/s"`` or ``"5e8"``."""
    t = str(text).strip().lower().replace(" ", "").replace("bit/s", "bps").replace("b/s", "bps")
    num = t.rstrip("kmgbps")
    try:
        bps = float(num) * _UNITS[t[len(num):]]
    except (KeyError, ValueError):
        raise KVCodecError(f"bandwidth {text!r}: give bits/s, e.g. 1gbps, 200mbps or 5e8") from None
    if not bps > 0 or bps == float("inf"):
        raise KVCodecError(f"bandwidth {text!r} must be positive")
    return bps


@torch.no_grad()
def measure_costs(lm, stores: list, token_ids, *, probe_tokens: int = 64, threads: int = 0):
    """This machine's ``(recompute_s, decode_s_per_byte)`` for :func:`plan`: a prefill
    of ``probe_tokens`` of ``token_ids`` scaled to a chunk, and the decode of the first
    cached chunk of the smallest level (0 when none is cached)."""
    import time

    from transformers import DynamicCache

    ids = [int(t) for t in token_ids]
    n = stores[0].chunk_tokens
    probe = ids[:min(probe_tokens, n)]
    if not probe:
        raise KVCodecError("no tokens to measure recomputation on")
    t = time.perf_counter()
    lm.model(input_ids=torch.tensor([probe]), past_key_values=DynamicCache(config=lm.config),
             use_cache=True, logits_to_keep=1)
    recompute_s = (time.perf_counter() - t) * n / len(probe)
    decode_s_per_byte = 0.0
    store = stores[-1]
    path = store.path(store.keys(ids[:n])[0])
    if len(ids) >= n and store.exists(path):
        fp = store.fingerprint
        shape = (1, fp["num_kv_heads"], n, fp["head_dim"])
        dst = {l: (torch.empty(shape), torch.empty(shape)) for l in range(fp["num_layers"])}
        size = store.size(path)
        t = time.perf_counter()
        if store.read_chunk(path, ids[:n], 0, dst, threads):
            decode_s_per_byte = (time.perf_counter() - t) / size
    return recompute_s, decode_s_per_byte


@torch.no_grad()
def load_adaptive(lm, stores: list, token_ids, bandwidth_bps: float, budget_s: float,
                  recompute_s: float, *, decode_s_per_byte: float = 0.0, threads: int = 0,
                  reserve: int = hf.DEFAULT_RESERVE):
    """Build a DynamicCache for the whole chunks of ``token_ids`` following :func:`plan`.

    ``stores`` are the quality levels, best first (same model and chunk size). Loaded
    chunks are decoded straight into the cache's buffers (room for ``reserve`` more
    tokens); a recomputed chunk is prefilled on top of the chunks before it, so it is
    exact given them, and so is a chunk whose chosen entry turns out damaged.

    Returns ``(cache, choices)``: per chunk the level index used or ``RECOMPUTE``.
    """
    if not stores:
        raise KVCodecError("load_adaptive needs at least one store")
    n = stores[0].chunk_tokens
    if any(s.chunk_tokens != n or s.fingerprint != stores[0].fingerprint for s in stores):
        raise KVCodecError("the stores of a level ladder must share the model and chunk size")
    ids = [int(t) for t in token_ids]
    fp = stores[0].fingerprint
    check_fingerprint(fp, lm.fingerprint)
    bufs = hf.cache_buffers(lm.model, fp["num_layers"], fp["num_kv_heads"], len(ids) + reserve,
                            fp["head_dim"])
    keys_per_store = [s.keys(ids) for s in stores]
    full = len(ids) // n
    sizes = []
    for i in range(full):
        row = []
        for s, keys in zip(stores, keys_per_store):
            try:
                row.append(s.size(s.path(keys[i])))
            except OSError:
                row.append(None)
        sizes.append(row)
    choices = plan(sizes, bandwidth_bps, budget_s, recompute_s, decode_s_per_byte)
    cache = hf.reserved_cache(lm.model, bufs, 0, 0)
    for i, choice in enumerate(choices):
        t0, t1 = i * n, (i + 1) * n
        if choice != RECOMPUTE:
            store = stores[choice]
            if store.read_chunk(store.path(keys_per_store[choice][i]), ids[t0:t1], t0,
                                token_views(bufs, t0, t1), threads):
                hf.advance(cache, bufs, t0, t1)
                continue
            choices[i] = RECOMPUTE
        lm.model(input_ids=torch.tensor([ids[t0:t1]]), past_key_values=cache, use_cache=True,
                 logits_to_keep=1)
    return cache, choices
