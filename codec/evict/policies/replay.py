"""Replay (after KVzip, Kim et al. 2025): ask the model to repeat the text it has just
read, teacher-force the text, and keep the tokens that queries of the repetition need
most. The signal does not depend on what is asked later: reproducing the text needs
every token that carries information about it. A token of a KV head scores the largest
attention any query of its group paid it; heads and layers share one budget (as in
KV-Compress), so heads that need few tokens give their share to those that need many.
"""
from __future__ import annotations

import torch

from ..base import Stats, group_heads
from .kvcompress import KVCompress


class Replay(KVCompress):
    """Needs the model to replay the text: only at capture (:func:`kvcodec.evict.press`,
    about one more prefill of the text)."""

    name = "replay"
    needs = frozenset({"replay"})

    def __init__(self, sinks: int = 4, window: int = 0):
        super().__init__(window=window, sinks=sinks)

    def score(self, st: Stats) -> list:
        out = []
        for l, pos in enumerate(st.positions):
            s = group_heads(st.replay[l], st.num_heads, "max").double()
            keep = (pos < self.sinks) | (pos >= st.length - self.window)
            out.append(torch.where(keep[None, :], torch.inf, s))
        return out
