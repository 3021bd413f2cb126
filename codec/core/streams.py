"""Streams: what the quantizers and tables see of a layer's keys or values.

A cache layer ``[1, kv_heads, tokens, head_dim]`` becomes one stream per kind (keys,
values): a float32 ``[tokens, kv_heads * head_dim]`` matrix, keys un-rotated first when
the config strips RoPE. The writer, the reader, the calibrator and the baselines all
go through these functions, so they agree on the layout.
"""
from __future__ import annotations

import numpy as np
import torch

from . import tables
from .quant import token_step_multipliers
from .transforms import rope

KINDS = ("key", "value")


def flatten(t: torch.Tensor) -> torch.Tensor:
    """``[1, H, T, D]`` -> float32 ``[T, H*D]``."""
    _, h, n, d = t.shape
    return t[0].detach().to("cpu", torch.float32).permute(1, 0, 2).reshape(n, h * d)


def unflatten(x: torch.Tensor, h: int, d: int) -> torch.Tensor:
    """``[T, H*D]`` -> contiguous ``[1, H, T, D]``."""
    return x.reshape(x.shape[0], h, d).permute(1, 0, 2).unsqueeze(0).contiguous()


def stream_input(t: torch.Tensor, kind: str, layer_rope, offset: int = 0) -> torch.Tensor:
    """What a quantizer sees for one layer's keys or values: ``[T, C]`` float32, keys
    un-rotated first when the config strips RoPE (``layer_rope``, a
    :class:`~kvcodec.core.transforms.Rope` or None)."""
    if kind == "key" and layer_rope is not None:
        t = rope(t, layer_rope, offset, inverse=True)
    return flatten(t)


def stream_counts(q, symbols: np.ndarray, channels: int) -> np.ndarray:
    """Per-column symbol histograms, pooled where the quantizer shares tables."""
    counts = tables.channel_counts(symbols, q.table_alphabet)
    groups = q.table_groups(channels)
    if groups is not None:
        pooled = np.zeros_like(counts)
        np.add.at(pooled, groups, counts)
        counts = pooled[groups]
    return counts


def step_multipliers(cfg: dict, importance, layer: int, n_sink: int):
    """Per-token step multipliers for one layer, or None (no importance, or the config
    does not use it)."""
    spec = cfg.get("token_importance")
    if spec is None or importance is None:
        return None
    return token_step_multipliers(importance[layer], spec, skip=n_sink)


def layer_span(kv, cfg: dict, layer: int) -> tuple[int, int]:
    """``(first position, attention-sink rows)`` of one layer: a sliding-window layer
    holds the last tokens, and none of the sinks once its window has passed them."""
    s0 = kv.num_tokens - kv.layer_tokens[layer]
    return s0, min(max(0, cfg.get("sink_tokens", 0) - s0), kv.layer_tokens[layer])
