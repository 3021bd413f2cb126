"""The in-memory KV cache of one sequence: per-layer key and value tensors."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ShapeError


@dataclass
class KVCache:
    """Per-layer keys and values of one sequence, as a model's cache holds them.

    Attributes
    ----------
    keys, values : list of Tensor
        One ``[1, kv_heads, tokens, head_dim]`` tensor per layer. Keys are post-RoPE,
        exactly as transformers stores them.
    token_ids : list of int or None
        The tokens the cache was computed from.
    model : dict or None
        The fingerprint (see :func:`fingerprint`) of the model that made it.
    importance : Tensor or None
        float32 ``[layers, tokens]``: the attention each token received from the last
        queries of the prompt (see :func:`capture_kv`); encoders that support it spend
        more bits on tokens that are attended to.
    """

    keys: list
    values: list
    token_ids: list | None = None
    model: dict | None = None
    importance: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        validate_kv(self.keys, self.values)
        if self.token_ids is not None and len(self.token_ids) != self.num_tokens:
            raise ShapeError(
                f"{len(self.token_ids)} token ids for a cache of {self.num_tokens} tokens")
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
        return KVCache([k[:, :, start:end] for k in self.keys],
                       [v[:, :, start:end] for v in self.values],
                       None if self.token_ids is None else self.token_ids[start:end],
                       self.model,
                       None if self.importance is None else self.importance[:, start:end])

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[2])

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
        return 2 * sum(k.numel() for k in self.keys)

    def to_dynamic_cache(self, config=None, dtype: torch.dtype | None = None):
        """An HF ``DynamicCache`` holding these tensors (cast to ``dtype`` if given)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
            cache.update(k, v, i)
        return cache

    @classmethod
    def from_dynamic_cache(cls, cache, token_ids=None, model=None) -> "KVCache":
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys, values, token_ids, model)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def validate_kv(keys, values) -> None:
    if len(keys) == 0:
        raise ShapeError("a cache needs at least one layer")
    if len(keys) != len(values):
        raise ShapeError(f"{len(keys)} key layers but {len(values)} value layers")
    ref = tuple(keys[0].shape)
    for i, (k, v) in enumerate(zip(keys, values)):
        for name, t in (("keys", k), ("values", v)):
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.dim() != 4:
                raise ShapeError(
                    f"{name}[{i}] has shape {tuple(t.shape)}; expected "
                    "[batch, kv_heads, tokens, head_dim]")
            if tuple(t.shape) != ref:
                raise ShapeError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but keys[0] has {ref}; "
                    "all layers must share one shape")
            if t.dtype not in _FLOAT_DTYPES:
                raise ShapeError(f"{name}[{i}] has dtype {t.dtype}; expected fp16, bf16 or fp32")
            if t.dtype != keys[0].dtype:
                raise ShapeError(f"{name}[{i}] has dtype {t.dtype} but keys[0] has {keys[0].dtype}")
    if ref[0] != 1:
        raise ShapeError(f"batch size {ref[0]}: a .kvc file holds one sequence; split the batch")
    if ref[2] == 0:
        raise ShapeError("the cache holds no tokens")

