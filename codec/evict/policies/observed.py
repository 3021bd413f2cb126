"""Observed attention (H2O, Zhang et al. 2023): the attention every prompt query paid
each token. Averaged over the queries that can see the token (a plain sum favours early
tokens, which more queries see). With grouped-query attention a KV head's token counts
by the query head of its group that used it most (it stays if any of them needs it)."""
from __future__ import annotations

from ..base import Policy, Stats, group_heads


class Observed(Policy):
    """Needs the whole prefill's attention: only at capture (:func:`kvcodec.evict.press`)."""

    name = "observed"
    needs = frozenset({"observed"})

    def score(self, st: Stats) -> list:
        return [group_heads(o, st.num_heads, "max").double() for o in st.observed]
