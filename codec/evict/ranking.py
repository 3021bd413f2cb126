"""Evicting a cache: a policy's scores, its budgets and exact per-head top-k, gathered
into an evicted :class:`~kvcodec.core.kvcache.KVCache`; what every front door ends in."""
from __future__ import annotations

from ..core.kvcache import KVCache
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
    return gather(kv, kept)


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
