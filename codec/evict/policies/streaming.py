"""StreamingLLM (Xiao et al. 2023): the first tokens (attention sinks) and the most
recent ones."""
from __future__ import annotations

import torch

from ..base import Policy, Stats

SINK_TOKENS = 4


class Streaming(Policy):
    """Keeps ``sinks`` first tokens and the newest tokens that fill the rest of the
    budget (the sinks count in it)."""

    name = "streaming"

    def __init__(self, sinks: int = SINK_TOKENS):
        self.sinks = sinks

    def score(self, st: Stats) -> list:
        return [torch.where(p < self.sinks, torch.inf, p.double()).expand(st.num_heads, -1)
                for p in st.positions]
