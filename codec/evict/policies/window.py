"""A protected window around any policy: sinks and the most recent tokens always stay
(they count in the budget), the inner policy ranks the rest."""
from __future__ import annotations

import torch

from ..base import Policy, Stats

SINKS = 4
RECENT = 64


class Protected(Policy):
    def __init__(self, inner: Policy, sinks: int = SINKS, recent: int = RECENT):
        self.inner, self.sinks, self.recent = inner, sinks, recent
        self.name = f"{inner.name}+window"
        self.needs = inner.needs

    def score(self, st: Stats) -> list:
        out = []
        for s, p in zip(self.inner.score(st), st.positions):
            keep = (p < self.sinks) | (p >= st.length - self.recent)
            out.append(torch.where(keep[None, :], torch.inf, s))
        return out

    def budgets(self, st: Stats, scores: list, ratio: float) -> list:
        return self.inner.budgets(st, scores, ratio)
