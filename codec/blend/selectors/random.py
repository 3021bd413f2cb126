"""``random``: the control; ``k`` cached tokens drawn uniformly (seeded, reproducible)."""
from __future__ import annotations

import torch

from .base import Context, Selector


class Random(Selector):
    name = "random"

    def select(self, ctx: Context, k: int):
        g = torch.Generator().manual_seed(int(ctx.seed))
        picked = ctx.cached[torch.randperm(len(ctx.cached), generator=g)[:k]]
        return torch.sort(picked).values
