"""``none``: full reuse, nothing recomputed (the lower bound of quality, the fastest)."""
from __future__ import annotations

import torch

from .base import Context, Selector


class NoRecompute(Selector):
    name = "none"
    fixed_ratio = 0.0

    def select(self, ctx: Context, k: int):
        return torch.zeros(0, dtype=torch.long)
