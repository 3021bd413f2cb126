"""``all``: every token recomputed: a full prefill, the reference blending is judged by."""
from __future__ import annotations

from .base import Context, Selector


class Everything(Selector):
    name = "all"
    fixed_ratio = 1.0

    def select(self, ctx: Context, k: int):
        return ctx.cached.clone()
