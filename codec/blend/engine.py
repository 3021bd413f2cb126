"""Selective recompute over a fused cache, with the model's own layers and an exact mask.

The fused cache holds, per layer, ``[1, kv_heads, N, head_dim]`` keys and values for
the whole prompt: cached segments' rows decoded and re-rotated to their new positions,
the rest to be computed. Two passes of the model's own ``forward`` do the work:

1. **Check pass** (only when something is to be recomputed): every token runs through
   layers ``0 .. check_layer`` with full causal attention, writing fresh K/V for every
   token there (as CacheBlend does: the first layers are cheap and then exact). The
   cached K/V of the check layer, saved beforehand, against the fresh ones is the
   deviation HKVD ranks by; with ``attention`` requested, the check layer's attention
   weights are kept for query-aware selection. The pass stops at the check layer.
2. **Filter pass** (CacheBlend's gradual filtering; optional): a larger candidate set
   runs on to a deeper filter layer, where deviation (or attention) is measured again
   and the final selection is made among the candidates.
3. **Recompute pass**: the selected cached tokens, every uncached token and the last
   token run through the remaining layers (from the previous pass's hidden states; all
   layers when there was no check pass). At each layer their new K/V are written into
   the fused cache at their positions *before* attention, and each query attends to
   exactly the positions ``<= its own`` (and within a sliding window where the layer
   has one): an exact per-token causal mask over the fused cache, not the block
   approximation of the reference implementations.

Every pass is :func:`run` over a set of query positions.

With every token selected this is a full prefill; with none, plain concatenation of the
cached segments plus the uncached tokens computed over them.

The passes drive the model's ``forward`` (its embeddings, rotary module, layer types
and attention kernels stay its own) with a prepared 4D mask, which transformers uses
as given, a cache whose layers write rows by position, and, for the recompute pass,
layers up to the check layer replaced by the check pass's output for the duration of
the call.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import BackendError
from ..models.attention import model_dtype, weights_of
from ..models.support import text_config


class _ScatterLayer(DynamicLayer):
    """A layer of the fused cache: full-length K/V; an update writes the rows of the
    current queries' positions and returns the whole layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: dict):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self._rows = rows  # shared with the cache: {"index": LongTensor of positions}

    def update(self, key_states, value_states, *args, **kwargs):
        index = self._rows["index"]
        self.keys[:, :, index] = key_states.to(self.keys.dtype)
        self.values[:, :, index] = value_states.to(self.values.dtype)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.keys.shape[2])


class FusedCache(Cache):
    """Per-layer full-length keys and values that the passes write into by position."""

    def __init__(self, keys: list, values: list):
        self.rows = {"index": None}
        super().__init__(layers=[_ScatterLayer(k, v, self.rows) for k, v in zip(keys, values)])


def layer_windows(config) -> list:
    """Per layer, the sliding window (keys a query sees, itself included) or None."""
    cfg = text_config(config)
    n = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" and window else None for t in types]
    if window and getattr(cfg, "use_sliding_window", True):
        return [int(window)] * n
    return [None] * n


def attention_masks(config, query_pos: torch.Tensor, n_keys: int, dtype):
    """Additive masks ``[1, 1, Q, N]``: query ``i`` (at ``query_pos[i]``) sees key ``j``
    iff ``j <= query_pos[i]`` (and ``query_pos[i] - j < window`` on sliding layers).
    A single tensor when every layer has the same window, else ``{layer type: mask}``
    as hybrid models take it."""
    keys = torch.arange(n_keys)
    q = query_pos.view(-1, 1)
    lowest = torch.finfo(dtype).min

    def mask(window):
        ok = keys.view(1, -1) <= q
        if window:
            ok &= keys.view(1, -1) > q - int(window)
        out = torch.zeros(ok.shape, dtype=dtype)
        return out.masked_fill_(~ok, lowest)[None, None]

    windows = layer_windows(config)
    if len(set(windows)) == 1:
        return mask(windows[0])
    full = next((w for w in windows if w is None), None)
    sliding = next(w for w in windows if w is not None)
    return {"full_attention": mask(full), "sliding_attention": mask(sliding)}


class _Stop(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def _layers(model):
    base = getattr(model, "model", None) or getattr(model, "gpt_neox", None) or model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise BackendError(f"{type(model).__name__} has no decoder layer list that blending "
                           "can drive")
    return layers


def _attention_module(layer):
    for mod in layer.children():
        if type(mod).__name__.endswith("Attention"):
            return mod
    raise BackendError(f"{type(layer).__name__} has no attention module to read weights from")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run(model, ids: list, query_pos: torch.Tensor, cache: FusedCache, *, hidden=None,
        after: int = -1, stop: int | None = None, attention_rows=None):
    """Run the tokens at ``query_pos`` (increasing) through the layers after ``after``
    over the fused cache, writing their K/V into it at their positions.

    ``hidden``: their output of layer ``after`` (None with ``after`` -1: start from the
    embeddings). With ``stop``, the pass ends after that layer and returns ``(hidden,
    attention)``: its output ``[1, Q, hidden]`` and, with ``attention_rows`` (indices
    into ``query_pos``), those queries' attention weights at layer ``stop``,
    ``[heads, rows, N]`` float32. Without ``stop`` it returns the next-token logits
    ``[vocab]`` of the last query (the last prompt position).
    """
    n = cache.layers[0].keys.shape[2]
    cache.rows["index"] = query_pos
    layers = _layers(model)
    dtype = model_dtype(model)
    hooks, replaced = [], []
    if hidden is not None:
        # Layers up to ``after`` already ran for these tokens: they hand on its output.
        for layer in layers[:after + 1]:
            layer.forward = lambda *a, _h=hidden, **k: _h
            replaced.append(layer)
    if stop is not None:
        def halt(mod, args, out):
            raise _Stop(_first(out))
        hooks.append(layers[stop].register_forward_hook(halt))
    try:
        # Only the stop layer runs eager attention (the kernel that returns weights).
        watched = (weights_of(_attention_module(layers[stop])) if attention_rows is not None
                   else nullcontext(None))
        with watched as seen:
            out = model(input_ids=torch.tensor([[ids[int(p)] for p in query_pos]]),
                        position_ids=query_pos[None], past_key_values=cache,
                        attention_mask=attention_masks(model.config, query_pos, n, dtype),
                        use_cache=True, logits_to_keep=1)
    except _Stop as halted:
        if seen is None:
            return halted.hidden, None
        if seen.weights is None:
            raise BackendError("the model returned no attention weights for query-aware "
                               "selection") from None
        return halted.hidden, seen.weights[0, :, attention_rows].float()
    finally:
        for h in hooks:
            h.remove()
        for layer in replaced:
            del layer.forward
    if stop is not None:
        raise BackendError(f"the model never reached layer {stop}; it skips decoder layers")
    return out.logits[0, -1].float()
