"""Token eviction: each KV head keeps only the tokens its policy ranks highest.

Policies (``policies/``, one per file) supply a score per (layer, head, token) from what
they need; :mod:`.base` owns budgets, exact per-head top-k with deterministic ties and
the gather into an evicted :class:`~kvcodec.core.kvcache.KVCache` (``kv.kept``). Evict
after the fact (:func:`evict`), or while capturing (:func:`press`, :func:`capture`),
where attention-based policies see the prefill's own attention. The evicted cache
encodes into a .kvc file (only kept tokens are coded) and loads into transformers with
:func:`kvcodec.integrations.ragged.ragged_cache`.

May import: errors, core, models (and the layers under them).
"""
from .api import capture, parse, press
from .base import Policy, Stats
from .ranking import evict
from .policies import POLICIES, WRAPPERS, get_policy
from .presses import Press

__all__ = ["capture", "evict", "parse", "press", "Press", "Policy", "Stats", "POLICIES",
           "WRAPPERS", "get_policy"]
