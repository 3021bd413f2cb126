"""Attention plumbing shared by every layer that runs a model.

- Switching a model's attention implementation for a block and back, whatever happens
  inside (:func:`attention_implementation`, :func:`eager`: the kernel that returns
  attention weights), and one attention module's weights captured while a model runs
  (:func:`weights_of`), as kvpress applies its presses: a context manager that installs
  and removes.
- The model's own eager attention function (:func:`eager_attention_function`), for
  attention functions of kvcodec's that must keep a model's scaling and soft-capping.
- The K/V geometry of a model (:func:`check_geometry`, by
  :func:`kvcodec.models.support.kv_geometry`) and the
  dtype and device its caches take (:func:`model_dtype`, :func:`model_device`).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from ..errors import BackendError, ModelMismatchError
from .support import kv_geometry


@contextmanager
def attention_implementation(model, name: str, instead: str = ""):
    """Run ``model`` with the attention implementation ``name`` inside the block (a
    transformers name or one registered in its ``AttentionInterface``), and with its own
    again afterwards. Yields the previous implementation's name. ``BackendError`` (saying
    ``instead``: what to do) for a model that cannot switch."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        if model.config._attn_implementation != name:
            raise BackendError(f"{type(model).__name__} cannot switch its attention "
                               f"implementation to {name!r}" + (f"; {instead}" if instead else ""))
        yield previous
    finally:
        model.set_attn_implementation(previous)


def eager(model):
    """:func:`attention_implementation` ``"eager"``: the kernels that return weights."""
    return attention_implementation(model, "eager")


@contextmanager
def weights_of(module):
    """Inside the block, the attention ``module`` runs eagerly (only while it runs: the
    other layers keep their kernel) and ``.weights`` of the yielded object holds the
    attention weights ``[batch, heads, queries, keys]`` its last call returned (None if it
    returned none)."""
    box = SimpleNamespace(weights=None)
    cfg = module.config
    previous = cfg._attn_implementation

    def before(mod, args):
        cfg._attn_implementation = "eager"

    def after(mod, args, out):
        cfg._attn_implementation = previous
        box.weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()
        cfg._attn_implementation = previous


def eager_attention_function(module, instead: str):
    """The eager attention function of ``module``'s own modeling file (its scaling,
    soft-capping and GQA repeat), which returns the attention weights; ``BackendError``
    naming ``instead`` (what to do without it) for a model that defines none."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise BackendError(f"{type(module).__name__} defines no eager_attention_forward; "
                           f"{instead}")
    return fn


def check_geometry(model, n_layers: int, heads: int, head_dim: int) -> None:
    """``ModelMismatchError`` unless ``model`` caches ``n_layers`` x ``heads`` x ``head_dim``."""
    want = kv_geometry(model.config)
    if (n_layers, heads, head_dim) != want:
        raise ModelMismatchError(
            f"the cache has {n_layers} layers x {heads} KV heads x head_dim {head_dim}; the "
            f"model has {want[0]} x {want[1]} x {want[2]}")


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model) -> torch.device:
    return next(model.parameters()).device
