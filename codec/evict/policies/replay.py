"""Replay (after KVzip, Kim et al. 2025): ask the model to repeat the text it has just
read, teacher-force the text, and keep the tokens that queries of the repetition need
most. The signal does not depend on what is asked later: reproducing the text needs
every token that carries information about it. A token of a KV head scores the largest
attention any query of its group paid it; heads and layers share one budget (as in
KV-Compress), so heads that need few tokens give their share to those that need many.
"""
from __future__ import annotations

from ..base import Stats, group_heads, protect
from .kvcompress import KVCompress


class Replay(KVCompress):
    """Needs the model to replay the text: only at capture (:func:`kvcodec.evict.press`,
    about one more prefill of the text)."""

    name = "replay"
    needs = frozenset({"replay"})

    def __init__(self, sinks: int = 4, window: int = 0):
        super().__init__(window=window, sinks=sinks)

    def score(self, st: Stats) -> list:
        return [protect(group_heads(r, st.num_heads, "max").double(), pos, st.length,
                        self.sinks, self.window) for r, pos in zip(st.replay, st.positions)]
