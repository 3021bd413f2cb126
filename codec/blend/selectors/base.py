"""What a token selector sees and returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Context:
    """What blending knows when it picks the cached tokens to recompute.

    Attributes
    ----------
    cached : LongTensor
        Prompt positions whose K/V come from a cache (increasing); selectors pick
        among these.
    segments : list of (int, int)
        ``[start, end)`` positions of each reused cached segment, in prompt order.
    deviation : Tensor or None
        ``[N]`` float32: how far each token's fresh K/V at the check layer are from the
        cached ones (filled when the selector ``needs`` ``"deviation"``).
    attention : Tensor or None
        ``[N]`` float32: attention each position receives from the query tokens at the
        check layer, averaged over heads (when it ``needs`` ``"attention"``).
    seed : int
        For selectors that draw at random.
    """

    cached: torch.Tensor
    segments: list
    deviation: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    seed: int = 0


class Selector:
    """Picks ``k`` of the cached positions to recompute.

    A selector declares what it ``needs`` from the check pass (``"deviation"``,
    ``"attention"``, or nothing) and returns positions; blending owns the rest.
    ``fixed_ratio`` pins the budget (``none``: 0, ``all``: 1) whatever is asked.
    """

    name = ""
    needs: frozenset = frozenset()
    fixed_ratio: float | None = None

    def select(self, ctx: Context, k: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        return f"<selector {self.name}>"


def top(ctx: Context, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` cached positions of highest ``scores`` ([N]), ties to the earlier
    position (deterministic), returned in increasing order."""
    s = scores[ctx.cached]
    order = torch.sort(s, descending=True, stable=True).indices[:k]
    return torch.sort(ctx.cached[order]).values
