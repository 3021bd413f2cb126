"""Evicting a cache: a policy's scores, its budgets and exact per-head top-k, gathered
into an evicted :class:`~kvcodec.core.kvcache.KVCache`; what every front door ends in."""
from __future__ import annotations

import torch

from ..core.kvcache import KEPT_IMPORTANCE, KVCache
from ..errors import ConfigError
from .base import Stats, check_ratio, gather, stats_from_cache, top_positions
from .policies import POLICIES, get_policy


def evict(kv: KVCache, policy, ratio: float, stats: Stats | None = None) -> KVCache:
    """Keep ``ratio`` of each head's tokens (on average, for policies that move budget
    between heads) by ``policy``'s scores; ``stats`` default to the cache's own (its
    full-precision tensors and stored importance: after the fact, attention-based
    policies use the window importance :func:`kvcodec.capture_kv` stored with the cache;
    score on the full-precision capture, not on a decoded cache, where you can). Ratio
    1.0 returns ``kv`` itself."""
    ratio, policy = check_ratio(ratio), get_policy(policy)
    if ratio == 1.0:
        return kv
    st = stats_from_cache(kv) if stats is None else stats
    _check_needs(policy, st)
    scores = policy.score(st)
    budgets = policy.budgets(st, scores, ratio)
    kept = [top_positions(s, b, p) for s, b, p in zip(scores, budgets, st.positions)]
    out = gather(kv, kept)
    if policy.needs & ATTENTION_STATS:
        out.extra[KEPT_IMPORTANCE] = kept_scores(scores, kept, st.positions)
    return out


# Statistics that make a policy's scores attention paid to each token.
ATTENTION_STATS = frozenset({"window", "observed", "replay"})


def kept_scores(scores: list, kept: list, positions: list) -> list:
    """The policy's ``scores`` (``[H, T_l]`` per layer) of the ``kept`` positions
    (``[H, slots]``, ``-1`` unused), as ``KVCache.extra[KEPT_IMPORTANCE]`` holds them;
    a token the policy protected (score ``inf``: sinks, recent tokens) gets its head's
    largest finite score."""
    out = []
    for s, pos, held in zip(scores, kept, positions):
        s = s.double()
        ok = torch.isfinite(s)
        top = torch.where(ok, s, -torch.inf).amax(dim=1, keepdim=True).clamp_min(0)
        s = torch.where(ok, s, top.expand_as(s))
        slot = (pos - int(held[0]) if len(held) else pos).clamp(min=0)
        got = s.gather(1, slot) if s.shape[1] else torch.zeros(pos.shape, dtype=s.dtype)
        out.append(torch.where(pos >= 0, got, 0).float())
    return out


def _check_needs(policy, st: Stats) -> None:
    if "replay" in policy.needs and st.replay is None:
        raise ConfigError(f"policy {policy.name} runs the model over the text again, which "
                          "only a capture can: use kvcodec.evict.capture / press (CLI: "
                          f"kvcodec encode --evict); after the fact use one of "
                          f"{', '.join(_posthoc())}")
    if "observed" in policy.needs and st.observed is None:
        raise ConfigError(f"policy {policy.name} scores by the attention of the whole "
                          "prefill, which only a capture sees: use kvcodec.evict.capture / "
                          "press (CLI: kvcodec encode --evict); after the fact use one of "
                          f"{', '.join(_posthoc())}")
    if "window" in policy.needs and st.window is None and st.head_importance is None:
        raise ConfigError(f"policy {policy.name} needs attention scores, and this cache has "
                          "none (a decoded file, or captured with importance_window=0): "
                          "capture with kvcodec.evict.capture / press, or use one of "
                          f"{', '.join(p for p, c in POLICIES.items() if not c.needs)}")


def _posthoc():
    return [p for p, c in POLICIES.items() if not c.needs & {"observed", "replay"}]
