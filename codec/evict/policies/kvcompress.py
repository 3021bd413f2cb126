"""KV-Compress (Rehg 2024, arXiv 2410.00161): heads and layers do not need the same
number of tokens. Every token of every head of every layer is ranked together by the
attention the observation window paid it, aggregated over the KV head's query group;
the best ``ratio`` of all of them stay, so a head whose attention is concentrated keeps
few tokens and a diffuse one keeps many. A recent window is protected (and counted)."""
from __future__ import annotations

import torch

from ..base import Policy, Stats, head_budget, protect, rank
from .snapkv import WINDOW, window_attention

SINKS = 4


class KVCompress(Policy):
    """Needs the observation window's attention, as :class:`SnapKV` does."""

    name = "kvcompress"
    needs = frozenset({"window"})

    def __init__(self, window: int = WINDOW, sinks: int = SINKS):
        self.window, self.sinks = window, sinks

    def score(self, st: Stats) -> list:
        return [protect(window_attention(st, l, self.window).double(), pos, st.length,
                        self.sinks, self.window) for l, pos in enumerate(st.positions)]

    def budgets(self, st: Stats, scores: list, ratio: float) -> list:
        # Protected tokens first (each head's, up to its even share of the budget), then
        # the rest of the budget to the best remaining tokens of all heads and layers.
        shares = [head_budget(len(p), ratio) for p in st.positions]
        base = [torch.isinf(s).sum(1).clamp(max=u) for s, u in zip(scores, shares)]
        rest = sum(u * st.num_heads for u in shares) - int(sum(b.sum() for b in base))
        flat = torch.cat([torch.where(torch.isinf(s), -torch.inf, s).reshape(-1)
                          for s in scores])
        extra = torch.zeros(len(flat), dtype=torch.long)
        if rest > 0:
            extra[rank(flat)[:rest]] = 1
        out, at = [], 0
        for s, b in zip(scores, base):
            out.append(b + extra[at:at + s.numel()].reshape(s.shape).sum(1))
            at += s.numel()
        return out
