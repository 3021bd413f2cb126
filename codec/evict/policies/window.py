"""A protected window around any policy: sinks and the most recent tokens always stay
(they count in the budget), the inner policy ranks the rest."""
from __future__ import annotations

from ..base import Policy, Stats, protect

SINKS = 4
RECENT = 64


class Protected(Policy):
    def __init__(self, inner: Policy, sinks: int = SINKS, recent: int = RECENT):
        self.inner, self.sinks, self.recent = inner, sinks, recent
        self.name = f"{inner.name}+window"
        self.needs = inner.needs

    def score(self, st: Stats) -> list:
        return [protect(s, p, st.length, self.sinks, self.recent)
                for s, p in zip(self.inner.score(st), st.positions)]

    def budgets(self, st: Stats, scores: list, ratio: float) -> list:
        return self.inner.budgets(st, scores, ratio)
