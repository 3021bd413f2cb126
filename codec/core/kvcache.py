"""The in-memory KV cache of one sequence: per-layer key and value tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ModelMismatchError, ShapeError


#: ``KVCache.extra`` key of an evicted cache's per-head token importance: per layer,
#: float32 ``[kv_heads, slots_l]`` aligned with ``kept`` (0 in unused slots), the
#: attention score that chose each kept token (:func:`kvcodec.evict.evict`). The encoder
#: sizes each kept token's step by it, per head, in configs with ``token_importance``:
#: the attention that kept a token also says how much its error costs.
KEPT_IMPORTANCE = "kept_importance"


@dataclass
class KVCache:
    """Per-layer keys and values of one sequence, as a model's cache holds them.

    Attributes
    ----------
    keys, values : list of Tensor
        One ``[1, kv_heads, tokens_l, head_dim]`` tensor per layer. Keys are post-RoPE,
        exactly as transformers stores them. A layer holds the *last* ``tokens_l`` of
        the sequence's ``num_tokens`` positions: all of them for full attention, fewer
        for sliding-window layers (Gemma 2/3, Mistral variants), as the model keeps them.
    token_ids : list of int or None
        The tokens the cache was computed from.
    model : dict or None
        The fingerprint (see :func:`fingerprint`) of the model that made it.
    importance : Tensor or None
        float32 ``[layers, tokens]``: the attention each token received from the last
        queries of the prompt (see :func:`capture_kv`); encoders that support it spend
        more bits on tokens that are attended to (0 where a layer holds no token).
    length : int or None
        The sequence length (positions covered); default: the longest layer's tokens.
        Needed only when every layer is a sliding window shorter than the sequence.
    kept : list of Tensor or None
        Set on an *evicted* cache (:mod:`kvcodec.evict`), where each head keeps its own
        tokens: one int64 ``[kv_heads, slots_l]`` tensor per layer giving the true
        position of each slot of ``keys[l]`` / ``values[l]`` (``[1, kv_heads, slots_l,
        head_dim]``). A head's positions ascend and its unused slots (heads keep
        different numbers of tokens; ``slots_l`` is the layer's largest) are ``-1`` at
        the end, with zero K/V. ``length`` stays the original sequence length and
        ``token_ids`` / ``importance`` still cover every position.
    anchor : list of int or None
        For a position-independent chunk (:mod:`kvcodec.blend`), the token ids of the
        fixed prefix it was computed behind (``capture_kv(..., anchor=...)``); its tokens
        sit at positions ``len(anchor) ..``. Kept by :meth:`slice`, by a file and by what
        decodes it.
    extra : dict
        Anything else a producer attaches (``head_importance`` from a capture;
        :data:`KEPT_IMPORTANCE` from an attention-based eviction).
    """

    keys: list
    values: list
    token_ids: list | None = None
    model: dict | None = None
    importance: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    length: int | None = None
    kept: list | None = None
    anchor: list | None = None

    def __post_init__(self):
        validate_kv(self.keys, self.values)
        if self.kept is not None:
            if self.length is None:
                raise ShapeError("an evicted cache needs its original length")
            self.kept = validate_kept(self.kept, self.keys, self.length)
        longest = max(int(k.shape[2]) for k in self.keys)
        if self.length is None:
            self.length = longest
        elif not isinstance(self.length, int) or self.length < longest:
            raise ShapeError(f"length {self.length!r} is shorter than a layer of {longest} tokens")
        if self.token_ids is not None:
            self.token_ids = check_token_ids(self.token_ids, self.num_tokens)
        if self.model is not None and not isinstance(self.model, dict):
            raise ShapeError(f"model must be a fingerprint dict (kvcodec.models.fingerprint) "
                             f"or None, got a {type(self.model).__name__}")
        if self.importance is not None:
            imp = self.importance
            if (not isinstance(imp, torch.Tensor)
                    or tuple(imp.shape) != (self.num_layers, self.num_tokens)):
                got = tuple(imp.shape) if isinstance(imp, torch.Tensor) else type(imp).__name__
                raise ShapeError(f"importance must be a [layers, tokens] = "
                                 f"[{self.num_layers}, {self.num_tokens}] tensor, got {got}")
            if not torch.isfinite(imp).all() or bool((imp < 0).any()):
                raise ShapeError("importance must be finite and non-negative")

    def slice(self, start: int, end: int) -> "KVCache":
        """Tokens ``[start, end)`` of the cache (views, not copies)."""
        if self.evicted:
            raise ShapeError("an evicted cache (heads keep different tokens) cannot be cut "
                             "into token ranges")
        if not self.uniform:
            raise ShapeError("this cache's layers hold different spans (sliding-window "
                             "layers); it cannot be cut into token ranges")
        return KVCache([k[:, :, start:end] for k in self.keys],
                       [v[:, :, start:end] for v in self.values],
                       None if self.token_ids is None else self.token_ids[start:end],
                       self.model,
                       None if self.importance is None else self.importance[:, start:end],
                       anchor=self.anchor)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        """Positions the cache covers (the sequence length)."""
        return self.length

    @property
    def layer_tokens(self) -> list:
        """Tokens each layer holds (the last that many of the sequence)."""
        return [int(k.shape[2]) for k in self.keys]

    @property
    def uniform(self) -> bool:
        """True when every layer holds every position (no sliding-window truncation,
        no eviction)."""
        return self.kept is None and all(t == self.length for t in self.layer_tokens)

    @property
    def evicted(self) -> bool:
        """True when heads keep their own subsets of tokens (see ``kept``)."""
        return self.kept is not None

    def kept_counts(self) -> torch.Tensor:
        """int64 ``[layers, kv_heads]``: tokens each head holds (every slot when not
        evicted)."""
        if self.kept is None:
            return torch.tensor([[t] * self.num_kv_heads for t in self.layer_tokens])
        return torch.stack([(p >= 0).sum(1) for p in self.kept])

    def stored_numel(self) -> int:
        """Elements the cache actually holds: kept tokens only, for an evicted cache."""
        return int(2 * self.kept_counts().sum()) * self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.keys[0].shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def numel(self) -> int:
        """Elements of the cache as the model made it: for an evicted cache, of the full
        cache before eviction (every layer holding every position), the denominator of
        bits per element."""
        if self.kept is not None:
            return 2 * self.num_layers * self.num_kv_heads * self.length * self.head_dim
        return 2 * sum(k.numel() for k in self.keys)

    def to_dynamic_cache(self, config=None, dtype: torch.dtype | None = None):
        """An HF ``DynamicCache`` holding these tensors (cast to ``dtype`` if given)."""
        from transformers import DynamicCache

        if self.kept is not None:
            raise ShapeError("an evicted cache (heads keep different tokens) does not fit a "
                             "DynamicCache; load it with kvcodec.integrations.ragged."
                             "ragged_cache(kv, model)")
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
            cache.update(k, v, i)
            if hasattr(cache.layers[i], "cumulative_length"):  # a sliding-window layer
                cache.layers[i].cumulative_length = self.length
        return cache

    @classmethod
    def from_dynamic_cache(cls, cache, token_ids=None, model=None) -> "KVCache":
        """The tensors of a transformers cache (views). Caches that do not hold per-head
        keys and values (linear attention, SSM states, compressed latents) are refused."""
        layers = list(getattr(cache, "layers", ()))
        for i, layer in enumerate(layers):
            # Hybrid layers (FalconH1, Zamba2) hold K/V beside a recurrent state that a
            # K/V codec would silently drop.
            stateful = "LinearAttention" in type(layer).__name__ or any(
                getattr(layer, a, None) is not None for a in ("conv_states", "recurrent_states"))
            if stateful or not (isinstance(getattr(layer, "keys", None), torch.Tensor)
                                and isinstance(getattr(layer, "values", None), torch.Tensor)):
                raise ShapeError(
                    f"layer {i} of this cache is a {type(layer).__name__}, which holds no "
                    "per-head keys and values (linear attention, SSM state or latent); "
                    "kvcodec codes attention K/V caches only")
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
        # A sliding-window layer knows how many positions it has seen.
        length = max([int(getattr(l, "cumulative_length", 0) or 0) for l in layers]
                     + [int(k.shape[2]) for k in keys])
        return cls(keys, values, token_ids, model, length=length)


def token_views(bufs, t0: int, t1: int) -> dict:
    """``{layer: (keys, values)}`` views of tokens ``t0:t1`` of per-layer ``(keys,
    values)`` buffers ``[1, kv_heads, capacity, head_dim]``, as decoders fill them."""
    return {l: (kb[:, :, t0:t1], vb[:, :, t0:t1]) for l, (kb, vb) in enumerate(bufs)}


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def validate_kept(kept, keys, length: int) -> list:
    """Check an evicted cache's kept positions against its K/V (see ``KVCache.kept``);
    returns them as int64 CPU tensors."""
    if not isinstance(kept, (list, tuple)) or len(kept) != len(keys):
        raise ShapeError(f"kept must list one positions tensor per layer ({len(keys)})")
    out = []
    for l, (p, k) in enumerate(zip(kept, keys)):
        if not isinstance(p, torch.Tensor) or p.dtype.is_floating_point:
            raise ShapeError(f"kept[{l}] must be an integer tensor")
        p = p.to("cpu", torch.int64)
        if tuple(p.shape) != (k.shape[1], k.shape[2]):
            raise ShapeError(f"kept[{l}] has shape {tuple(p.shape)}; layer {l} holds "
                             f"[kv_heads, slots] = [{k.shape[1]}, {k.shape[2]}]")
        valid = p >= 0
        if bool((p < -1).any()) or bool((p >= length).any()):
            raise ShapeError(f"kept[{l}] holds positions outside [0, {length})")
        # Valid slots first (pads only at the end), positions strictly ascending.
        if p.shape[1] > 1 and (bool((valid[:, 1:] & ~valid[:, :-1]).any())
                               or bool(((p[:, 1:] <= p[:, :-1]) & valid[:, 1:]).any())):
            raise ShapeError(f"kept[{l}]: each head's positions must ascend, unused slots "
                             "(-1) at the end")
        out.append(p)
    return out


def check_model_geometry(model: dict | None, layers: int, kv_heads: int, head_dim: int) -> None:
    """Raise ModelMismatchError where a cache's model fingerprint states a geometry its
    tensors contradict (a file recording it was written, and every load refused it);
    fields the fingerprint leaves out or does not state as integers are not compared."""
    stated = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim}
    diffs = [f"{k}: the tensors have {v}, the fingerprint says {model[k]}"
             for k, v in stated.items() if isinstance((model or {}).get(k), int)
             and not isinstance(model[k], bool) and model[k] != v]
    if diffs:
        raise ModelMismatchError("the model fingerprint contradicts the cache's tensors ("
                                 + "; ".join(diffs) + ")")


def check_token_ids(ids, n: int | None = None) -> list:
    """``ids`` as a list of ``n`` (any number for None) Python ints in ``[0, 2**32)``,
    from a list, tuple or 1-D integer array (kept as an array, it broke the JSON a
    safetensors file records);
    else a ShapeError (a string, a float, a value past 64 bits were a ValueError or an
    OverflowError of numpy's, and 1.5 was cut to 1 without a word)."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ShapeError(f"token ids must be a list of integers: {exc}") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        what = arr.dtype if arr.ndim == 1 else f"{arr.ndim}-D {type(ids).__name__}"
        raise ShapeError(f"token ids must be a list of integers, got {what}")
    if n is not None and len(arr) != n:
        raise ShapeError(f"{len(arr)} token ids for a cache of {n} tokens")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << 32):
        raise ShapeError("token ids must be in [0, 2**32)")
    return arr.tolist()


def validate_kv(keys, values) -> None:
    """Check per-layer K/V tensors: ``[1, kv_heads, tokens_l, head_dim]``, one float
    dtype, every layer the same heads and head_dim; a layer's keys and values hold the
    same tokens, and layers may hold different numbers of them (sliding windows; none,
    in a decoded range before a window's span)."""
    if len(keys) == 0:
        raise ShapeError("a cache needs at least one layer")
    if len(keys) != len(values):
        raise ShapeError(f"{len(keys)} key layers but {len(values)} value layers")
    ref = None
    for i, (k, v) in enumerate(zip(keys, values)):
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.dim() != 4:
                raise ShapeError(
                    f"{name}[{i}] has shape {tuple(t.shape)}; expected "
                    "[batch, kv_heads, tokens, head_dim]")
            ref = ref or (tuple(t.shape), f"{name}[{i}]")
            if (t.shape[0], t.shape[1], t.shape[3]) != (ref[0][0], ref[0][1], ref[0][3]):
                raise ShapeError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but {ref[1]} has {ref[0]}; all "
                    "layers must share batch, kv_heads and head_dim")
            if t.dtype not in _FLOAT_DTYPES:
                raise ShapeError(f"{name}[{i}] has dtype {t.dtype}; expected fp16, bf16 or fp32")
            if t.dtype != keys[0].dtype:
                raise ShapeError(f"{name}[{i}] has dtype {t.dtype} but keys[0] has {keys[0].dtype}")
        if k.shape != v.shape:
            raise ShapeError(f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} "
                             "differ in shape")
    if all(k.shape[2] == 0 for k in keys):
        raise ShapeError("the cache holds no tokens")
    if ref[0][1] == 0 or ref[0][3] == 0:
        raise ShapeError(f"{ref[1]} has shape {ref[0]}: a cache needs kv heads and channels")
    if ref[0][0] != 1:
        raise ShapeError(f"batch size {ref[0][0]}: a .kvc file holds one sequence; split the batch")
