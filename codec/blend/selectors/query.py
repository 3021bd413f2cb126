"""``query``: recompute the cached tokens that the question attends to.

At the check layer, the query tokens (the prompt's final uncached segment, usually the
question; else its last tokens) run over every position; the attention each cached
token receives, averaged over heads and summed over the queries, ranks it. A token the
question reads is one whose stale K/V would show in the answer, whatever its
deviation (A3 and ProphetKV report query-aware selection beating HKVD at equal
budget). Scores are max-pooled over a few neighbours, as SnapKV pools, so a selected
token keeps the tokens it is read with.
"""
from __future__ import annotations

import torch

from .base import Context, Selector, top

POOL = 5


class Query(Selector):
    name = "query"
    needs = frozenset({"attention"})

    def select(self, ctx: Context, k: int):
        s = ctx.attention.view(1, 1, -1)
        pooled = torch.nn.functional.max_pool1d(s, POOL, stride=1, padding=POOL // 2)
        return top(ctx, pooled.view(-1), k)
