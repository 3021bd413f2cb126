"""SnapKV (Li et al. 2024): the prompt's last queries (the observation window) predict
what later queries attend to. Their attention, averaged over the window and pooled over
neighbouring tokens (a token's neighbours carry its context), ranks each head's tokens;
the window itself is kept."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Policy, Stats, group_heads

WINDOW = 64
KERNEL = 5


class SnapKV(Policy):
    """Needs the observation window's attention (:func:`kvcodec.evict.press`), or after
    a capture the per-head window importance :func:`kvcodec.capture_kv` stores."""

    name = "snapkv"
    needs = frozenset({"window"})

    def __init__(self, window: int = WINDOW, kernel: int = KERNEL):
        self.window, self.kernel = window, kernel

    def score(self, st: Stats) -> list:
        out = []
        for l, pos in enumerate(st.positions):
            attn = window_attention(st, l, self.window)
            s = pool(attn, self.kernel).double()
            s[:, pos >= st.length - self.window] = torch.inf  # the window stays
            out.append(s)
        return out


def window_attention(st: Stats, layer: int, window: int) -> torch.Tensor:
    """``[H, T_l]``: attention each token gets from the last ``window`` prompt queries,
    averaged over them and over the KV head's query group."""
    if st.window is not None:
        w = st.window[layer][:, -window:]
        return group_heads(w.mean(1), st.num_heads)
    return st.head_importance[layer]


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average over ``kernel`` neighbouring tokens (SnapKV's clustering), same length."""
    if kernel <= 1 or scores.shape[-1] < kernel:
        return scores
    return F.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2,
                        count_include_pad=False)[:, 0]
