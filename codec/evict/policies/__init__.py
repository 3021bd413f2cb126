"""Eviction policies, one per file; each supplies a score per (layer, head, token)."""
from __future__ import annotations

from ...errors import ConfigError
from ..base import Policy
from .knorm import Knorm
from .kvcompress import KVCompress
from .observed import Observed
from .replay import Replay
from .snapkv import SnapKV
from .streaming import Streaming
from .window import Protected

POLICIES = {p.name: p for p in (Streaming, SnapKV, Observed, Knorm, KVCompress, Replay)}
WRAPPERS = {"window": Protected}


def get_policy(policy) -> Policy:
    """A :class:`Policy` from an instance or a name: ``"snapkv"``, or wrapped,
    ``"knorm+window"`` (a protected sink + recent window around Knorm)."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str) or not policy:
        raise ConfigError(f"a policy is a Policy or a name, got {policy!r:.40}")
    base, *wrappers = policy.split("+")
    if base not in POLICIES:
        raise ConfigError(f"unknown eviction policy {base!r}; choose from "
                          f"{', '.join(sorted(POLICIES))} (wrap with "
                          f"{', '.join('+' + w for w in WRAPPERS)})")
    out = POLICIES[base]()
    for w in wrappers:
        if w not in WRAPPERS:
            raise ConfigError(f"unknown policy wrapper {w!r} in {policy!r}; wrappers: "
                              f"{', '.join(sorted(WRAPPERS))}")
        out = WRAPPERS[w](out)
    return out


__all__ = ["POLICIES", "WRAPPERS", "get_policy", "Policy", "Streaming", "SnapKV", "Observed",
           "Knorm", "KVCompress", "Replay", "Protected"]
