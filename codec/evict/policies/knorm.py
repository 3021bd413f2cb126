"""Knorm (Devoto et al. 2024): keys of small L2 norm draw the most attention, so the
tokens with the largest key norms go first. Needs only the keys."""
from __future__ import annotations

from ..base import Policy, Stats


class Knorm(Policy):
    name = "knorm"

    def score(self, st: Stats) -> list:
        return [-k.double().norm(dim=-1) for k in st.keys]
