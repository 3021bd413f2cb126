"""Evicted caches in transformers: every KV head attends to exactly the tokens it kept.

After token eviction (:mod:`kvcodec.evict`) each KV head of each layer holds its own
subset of the sequence's positions (``KVCache.kept``). A ``DynamicCache`` cannot hold
that: the heads of a layer would need different lengths, and transformers builds one
attention mask shared by every head. :func:`ragged_cache` loads such a cache as a
:class:`RaggedCache` that the model's own ``forward`` and ``generate`` drive unchanged.

Layout: padding plus a per-head mask
    Layer ``l`` stores ``[1, kv_heads, slots, head_dim]`` keys and values, where
    ``slots`` is the longest head's count (shorter heads padded with zero K/V), and an
    int64 ``[kv_heads, slots]`` table of each slot's true position (``-1``: unused).
    Tokens the model appends (prompt, generated) are concatenated after the slots for
    every head, with positions ``T, T + 1, ...``. One dense attention call per layer
    then covers all heads, through the model's own kernel (sdpa or eager: GQA repeat,
    scaling, Gemma's soft-capping stay its own), at the cost of the padded slots. The
    alternatives lose more: one attention call per head needs a rewritten attention
    forward for every model family; a varlen kernel with per-head lengths exists in no
    transformers backend; scattering the kept rows back into a full-length layout
    stores the evicted positions again.

How the mask reaches attention
    ``update`` returns the layer's keys as a fresh alias carrying, as the attribute
    ``_kvcodec_ragged``, the new queries' positions and an additive ``[1, kv_heads, q,
    slots]`` bias: 0 where the query may look, the dtype's minimum elsewhere. A query
    at position ``p`` sees a slot whose position ``s`` satisfies ``0 <= s <= p`` (pads
    and the future hidden), and on a sliding-window layer also ``s > p - window``
    (transformers' ``sliding_window_overlay``). The attention functions that
    :func:`attach` switches the model to (``kvcodec_sdpa``, ``kvcodec_eager``) look for
    that attribute on the key tensor they receive: if present they expand the bias over
    each KV head's query group and pass it, instead of transformers' mask (sized for
    ``T + q`` keys in the full layout, not for the physical slots), as
    ``attention_mask`` to transformers' sdpa function or to the model's own eager
    function; otherwise they call those unchanged, so ordinary caches behave exactly as
    before and leaving a model attached is harmless.

    Why an attribute on the tensor: the attention interface receives ``(module, query,
    key, value, attention_mask, **kwargs)``, never the cache, and a module-level "layer
    being run" would mix up two caches or threads. The key tensor is the one thing that
    travels from the cache to attention: the shared attention template (Llama, Mistral,
    Qwen2/3, Phi3, Gemma2/3 and most families) does ``key_states, value_states =
    past_key_values.update(...)`` and passes that very object on. A model that casts
    or repeats the keys in between loses the attribute and falls back to transformers'
    mask, which does not fit the slots: such models are not supported.

Positions
    ``get_seq_length`` is the true length ``T`` (plus appended tokens), so transformers'
    own cache-position logic gives new tokens positions ``T, T + 1, ...`` (RoPE) and
    ``generate(full_ids, past_key_values=cache)`` feeds only the tokens after ``T``.
    ``get_mask_sizes`` describes that full layout, so transformers' masks build as
    usual (and are then ignored, above). Where the model hands its ``position_ids`` on
    to attention (the shared template does), positions other than the cache's (a
    padded prompt: ``generate`` derives them from an ``attention_mask`` with zeros, or
    infers one wherever the pad token occurs in the ids) raise ``ShapeError`` instead
    of rotating and masking at different positions.

Limits: one sequence (batch 1; beam search and batch expansion raise ``ShapeError``);
a 2D ``attention_mask`` with padding is not applied; sdpa and eager attention only;
``output_attentions`` weights come in the slot layout; sliding-window layers keep slots
that have left the window (masked, not dropped).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..errors import BackendError, ModelMismatchError, ShapeError
from ..models.attention import (check_geometry, eager_attention_function, model_device,
                                model_dtype)

_ATTR = "_kvcodec_ragged"  # (bias, query positions) on the keys update returns
# transformers implementation -> the kvcodec wrapper around it
IMPLEMENTATIONS = {"sdpa": "kvcodec_sdpa", "eager": "kvcodec_eager"}


class RaggedLayer(DynamicLayer):
    """One layer of a :class:`RaggedCache`: padded per-head slots, their true positions,
    and the tokens appended since.

    Parameters
    ----------
    keys, values : Tensor
        ``[1, kv_heads, slots, head_dim]``; pad slots may hold anything (they are masked).
    positions : Tensor
        int64 ``[kv_heads, slots]``, each slot's true position, ``-1`` for unused slots.
    length : int
        Positions the sequence covers so far (``T``); appended tokens follow it.
    sliding_window : int or None
        The layer's attention window, None for full attention.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 length: int, sliding_window: int | None = None):
        super().__init__()
        self.keys, self.values = keys, values
        self.positions = positions.to(keys.device, torch.int64)
        self.length = length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``[1, kv_heads, q, head_dim]`` new K/V (visible to every head); returns
        the layer's keys, carrying the new queries' bias (see the module docstring), and
        values."""
        _single_sequence(key_states.shape[0], "a forward pass over several sequences")
        q = key_states.shape[-2]
        new = torch.arange(self.length, self.length + q, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new.expand(self.positions.shape[0], q)], 1)
        self.length += q
        keys = self.keys.view(self.keys.shape)  # an alias: the bias stays off the stored state
        setattr(keys, _ATTR, (self.bias(new, key_states.dtype), new))
        return keys, self.values

    def bias(self, query_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[1, kv_heads, q, slots]`` mask for queries at ``query_positions``:
        0 where a head's slot is visible to the query, ``finfo(dtype).min`` elsewhere."""
        s = self.positions[:, None, :]
        p = query_positions[None, :, None]
        visible = (s >= 0) & (s <= p)
        if self.sliding_window is not None:
            visible &= s > p - self.sliding_window
        out = torch.full(visible.shape, torch.finfo(dtype).min, dtype=dtype, device=self.device)
        return out.masked_fill_(visible, 0.0)[None]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (a positive value is the length
        to keep, as in ``DynamicLayer``): their slots become unused in every head."""
        keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
        if keep >= self.length:
            return
        self.positions = self.positions.masked_fill(self.positions >= keep, -1)
        used = (self.positions >= 0).any(0).nonzero()
        slots = int(used[-1]) + 1 if used.numel() else 0  # drop slots no head uses, at the end
        self.keys, self.values = self.keys[:, :, :slots], self.values[:, :, :slots]
        self.positions = self.positions[:, :slots]
        self.length = keep

    def reset(self) -> None:
        self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
        self.positions = self.positions[:, :0]
        self.length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        _single_sequence(beam_idx.numel(), "beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        _single_sequence(repeats, "expanding the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        _single_sequence(torch.as_tensor(indices).numel(), "selecting batch rows")


class RaggedCache(Cache):
    """A transformers ``Cache`` of :class:`RaggedLayer`: an evicted cache where each KV
    head keeps its own tokens, at their true positions. Build it with
    :func:`ragged_cache`; the model must run a kvcodec attention implementation
    (:func:`attach`)."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)


def _single_sequence(n: int, what: str) -> None:
    if n != 1:
        raise ShapeError(f"a ragged (evicted) cache holds one sequence; {what} ({n}) is not "
                         "supported")


def ragged_cache(kv, model, dtype: torch.dtype | None = None) -> RaggedCache:
    """Load an evicted :class:`kvcodec.KVCache` into a cache the model can continue from.

    Switches the model to the kvcodec attention wrapper of its implementation
    (:func:`attach`). ``model(input_ids=new, past_key_values=cache)`` and
    ``model.generate(full_ids, past_key_values=cache)`` then give new tokens positions
    ``kv.length, ...``, and each query head attends to exactly its KV head's kept tokens
    plus the new tokens up to its own (within the window on sliding-window layers).

    Parameters
    ----------
    kv : KVCache
        An evicted cache (``kv.kept`` set): per layer ``[1, kv_heads, slots, head_dim]``
        K/V and ``[kv_heads, slots]`` positions.
    model : transformers PreTrainedModel
        The model that made the cache (its layers, KV heads and head_dim must match).
    dtype : torch.dtype, optional
        The cache's dtype; default the model's.
    """
    if not getattr(kv, "evicted", False):
        raise ShapeError("ragged_cache needs an evicted cache (KVCache.kept set); load a full "
                         "cache with kv.to_dynamic_cache() or kvcodec.hf.cache_from_kv()")
    check_geometry(model, kv.num_layers, kv.num_kv_heads, kv.head_dim)
    windows = _layer_windows(model.config, kv.num_layers)
    attach(model)
    dtype, device = dtype or model_dtype(model), model_device(model)
    return RaggedCache([
        RaggedLayer(k.to(device, dtype), v.to(device, dtype), p, kv.length, w)
        for k, v, p, w in zip(kv.keys, kv.values, kv.kept, windows)])


def _layer_windows(config, n_layers: int) -> list:
    """Each layer's sliding window (None: full attention), as transformers' own caches
    read them from the config."""
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    if len(types) != n_layers:
        raise ModelMismatchError(f"the model caches {len(types)} layers; the cache has {n_layers}")
    windows = []
    for i, (kind, kw) in enumerate(zip(types, kwargs)):
        if kind not in ("full_attention", "sliding_attention"):
            raise ModelMismatchError(f"layer {i} of this model is {kind!r}; a ragged cache "
                                     "supports full and sliding-window attention layers")
        windows.append(kw.get("sliding_window"))
    return windows


def attach(model) -> None:
    """Switch ``model`` to the kvcodec wrapper of its attention implementation (``sdpa``
    -> ``kvcodec_sdpa``, ``eager`` -> ``kvcodec_eager``); a no-op when already attached.
    Raises ``BackendError`` for other implementations (flash, flex, paged)."""
    current = model.config._attn_implementation
    if current in IMPLEMENTATIONS.values():
        return
    if current not in IMPLEMENTATIONS:
        raise BackendError(
            f"a ragged (evicted) cache needs per-head masks, which the {current!r} attention "
            f"implementation cannot take; load the model with attn_implementation="
            f"{' or '.join(map(repr, IMPLEMENTATIONS))}")
    model.set_attn_implementation(IMPLEMENTATIONS[current])
    if model.config._attn_implementation != IMPLEMENTATIONS[current]:
        raise BackendError(f"{type(model).__name__} cannot switch its attention implementation "
                           "(it does not use transformers' AttentionInterface)")


def detach(model) -> None:
    """Put ``model`` back on the transformers implementation :func:`attach` wrapped."""
    back = {wrapped: name for name, wrapped in IMPLEMENTATIONS.items()}
    current = model.config._attn_implementation
    if current in back:
        model.set_attn_implementation(back[current])


def _query_head_bias(module, key: torch.Tensor, query: torch.Tensor,
                     position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The bias a :class:`RaggedLayer` attached to ``key``, repeated over each KV head's
    query group (as ``repeat_kv`` repeats the keys): ``[1, heads, q, slots]``; None for
    keys from any other cache."""
    attached = getattr(key, _ATTR, None)
    if attached is None:
        return None
    bias, positions = attached
    # Every layer gets the same position ids: checking the first avoids a device sync
    # per layer.
    if position_ids is not None and getattr(module, "layer_idx", 0) == 0:
        _check_positions(position_ids, positions)
    b, kv_heads, q, slots = bias.shape
    if q != query.shape[2] or query.shape[1] % kv_heads:
        raise BackendError(f"a ragged cache layer returned keys for {q} queries and {kv_heads} "
                           f"KV heads, but attention got {query.shape[2]} queries and "
                           f"{query.shape[1]} heads")
    groups = query.shape[1] // kv_heads
    bias = bias[:, :, None].expand(b, kv_heads, groups, q, slots)
    return bias.reshape(b, kv_heads * groups, q, slots).to(query.dtype)


def _check_positions(position_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Refuse ``[1, q]`` position ids (RoPE's) other than the cache's ``positions`` for
    the new tokens: keys would be rotated at one position and masked at another."""
    if position_ids.dim() != 2:  # multimodal (3D) position ids: nothing to compare
        return
    if not torch.equal(position_ids.reshape(-1).to(positions.device), positions):
        raise ShapeError(
            f"the model runs the new tokens at positions {position_ids.reshape(-1).tolist()[:4]}"
            f"..., but a ragged cache places them at {positions.tolist()[:4]}...: padding "
            "and explicit positions are not supported (pass generate an attention_mask of "
            "ones when the pad token occurs in the prompt)")


def ragged_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, with a ragged layer's per-head mask when ``key``
    carries one."""
    bias = _query_head_bias(module, key, query, kwargs.get("position_ids"))
    return sdpa_attention_forward(module, query, key, value,
                                  attention_mask if bias is None else bias, **kwargs)


def ragged_eager(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention (soft-capping and all), with a ragged layer's
    per-head mask when ``key`` carries one."""
    eager = eager_attention_function(module, "use attn_implementation='sdpa'")
    bias = _query_head_bias(module, key, query, kwargs.get("position_ids"))
    return eager(module, query, key, value, attention_mask if bias is None else bias, **kwargs)


AttentionInterface.register(IMPLEMENTATIONS["sdpa"], ragged_sdpa)
AttentionInterface.register(IMPLEMENTATIONS["eager"], ragged_eager)
# transformers builds no mask for implementations it does not know; ordinary caches
# under the wrappers need the usual ones.
AttentionMaskInterface.register(IMPLEMENTATIONS["sdpa"], sdpa_mask)
AttentionMaskInterface.register(IMPLEMENTATIONS["eager"], eager_mask)
