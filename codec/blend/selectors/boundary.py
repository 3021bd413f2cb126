"""``boundary``: the first tokens of each cached segment (EPIC-style static selection).

A segment cached behind an anchor saw none of the prompt before it; its first tokens
are where that shows most (they attended almost only to the anchor and themselves),
so a static choice recomputes an equal share of the budget at the start of every
segment. It needs nothing from the check pass.
"""
from __future__ import annotations

import torch

from .base import Context, Selector


class Boundary(Selector):
    name = "boundary"

    def select(self, ctx: Context, k: int):
        picked, left = [], k
        segs = [ctx.cached[(ctx.cached >= a) & (ctx.cached < b)] for a, b in ctx.segments]
        # Shares in order of segment size, so that a short segment's unused share
        # passes on to the larger ones.
        order = sorted(range(len(segs)), key=lambda i: len(segs[i]))
        for j, i in enumerate(order):
            share = min(len(segs[i]), -(-left // (len(segs) - j)))  # ceil(left / remaining)
            picked.append(segs[i][:share])
            left -= share
        return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)
