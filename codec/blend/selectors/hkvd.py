"""``hkvd``: CacheBlend's high-KV-deviation selection (Yao et al., EuroSys 2025).

A cached token whose K/V at the check layer, recomputed with the whole prompt before
it, differ most from what was cached alone is the one whose cross-attention to the
other segments was missed; its error grows through later layers, so it is recomputed.
The deviation sums the squared differences of keys and of values over heads and
channels, each relative to the layer's mean squared key or value, so that keys (large
norms) do not drown values out. CacheBlend checks at layer 1 and recomputes 15-20%.
"""
from __future__ import annotations

from .base import Context, Selector, top


class HKVD(Selector):
    name = "hkvd"
    needs = frozenset({"deviation"})

    def select(self, ctx: Context, k: int):
        return top(ctx, ctx.deviation, k)
