"""KV capture: run a model over a prompt and keep its cache (and attention importance)."""
from __future__ import annotations

import torch

from ..core.checks import is_int
from ..core.kvcache import KVCache
from ..errors import BackendError, ShapeError
from .attention import eager
from .loading import LoadedModel
from .support import check_kv_model
from .tokens import check_ids, document_ids

# Queries at the end of a prompt whose attention ranks its tokens (see capture_kv).
IMPORTANCE_WINDOW = 128


def default_anchor(tokenizer) -> list:
    """The anchor position-independent chunks are computed behind by default: the
    tokenizer's BOS token (the token a chat prompt starts with, e.g. SmolLM2's
    ``<|im_start|>``), else a newline."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return [int(bos)]
    return [int(t) for t in tokenizer("\n", add_special_tokens=False)["input_ids"]][:1] or [0]


@torch.no_grad()
def capture_kv(lm: LoadedModel, text: str | None = None, token_ids=None,
               max_tokens: int | None = None, prefill_chunk: int = 512,
               progress=None, importance_window: int = IMPORTANCE_WINDOW,
               anchor=None, chat: bool = False, system: str | None = None,
               every_token: bool = False) -> KVCache:
    """Run the model on ``text`` (or ``token_ids``) and return its KV cache.

    ``text`` is tokenized as the start of a prompt (:mod:`kvcodec.models.tokens`: BOS
    first where the tokenizer adds one), so that the cache is the one a prompt starting
    with that text makes, in transformers and in vLLM alike. With ``chat``, the text is
    the document of a chat turn (the tokenizer's chat template, after a ``system`` turn
    if given), cut right after it. ``token_ids`` are taken as given.

    The prompt is prefilled ``prefill_chunk`` tokens at a time (bounded activation
    memory on long documents); ``progress(done, total)`` is called after each step.

    With ``importance_window`` > 0, the last that many tokens are run in one step with
    eager attention and their attention weights, averaged over heads and queries, give
    each layer's per-token ``importance`` (SnapKV's observation window, Li et al. 2024:
    the end of a prompt predicts what later queries attend to). 0 skips it.

    With ``anchor`` (token ids), the text is run behind that fixed prefix and the
    anchor's rows are dropped: a *position-independent* chunk for :mod:`kvcodec.blend`.
    A text prefilled alone turns its first tokens into the attention sink that every
    later query leans on; behind an anchor the anchor is the sink, as the start of a
    real prompt is, and the text's own tokens stay ordinary. Every layer then keeps
    every token (sliding-window layers too), the tokens sit at positions
    ``len(anchor) ..``, and ``kv.anchor`` records the anchor (the file keeps
    it, so a chunk made behind another anchor is refused). Such a chunk's text never
    carries a BOS: the anchor stands where it would.

    With ``every_token``, sliding-window layers keep every token too (the model's masks
    still window their attention), as a :class:`~kvcodec.store.ChunkStore` needs: its
    chunks serve prompts of any length, and a load keeps each window's last tokens.
    Without it they keep their last ``window - 1``, the cache the model itself makes
    (what one ``.kvc`` file of this prompt needs).

    Returns
    -------
    KVCache
        keys/values ``[1, kv_heads, tokens, head_dim]`` per layer, in the model's dtype,
        post-RoPE, with the token ids, the model's fingerprint and the importance.
    """
    check_kv_model(lm.config)
    for name, v, lo in (("max_tokens", max_tokens or 0, 0), ("prefill_chunk", prefill_chunk, 1),
                        ("importance_window", importance_window, 0)):
        if not is_int(v, lo):  # 1.5 and "x" were TypeErrors
            raise ShapeError(f"{name} must be an integer >= {lo}, got {v!r:.40}")
    if token_ids is None:
        if not isinstance(text, str):  # token ids given as the text: transformers' ValueError
            raise ShapeError(f"capture_kv needs text (a str) or token_ids, got text of "
                             f"{type(text).__name__}")
        token_ids = document_ids(lm.tokenizer, text, chat=chat, system=system,
                                 independent=anchor is not None)
    token_ids = check_ids(lm.model, list(token_ids)[:max_tokens] if max_tokens else token_ids)
    if not token_ids:
        raise ShapeError("no tokens to run the model on")
    anchor = None if anchor is None else check_ids(lm.model, anchor, "the anchor")
    if anchor is not None and not anchor:
        raise ShapeError("an anchor needs at least one token")
    a = len(anchor or ())
    limit = getattr(lm.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and a + len(token_ids) > limit:  # XLNet: -1
        raise ShapeError(f"{a + len(token_ids)} tokens exceed the model's context of {limit}; "
                         "pass max_tokens")
    from transformers import DynamicCache

    doc_ids, token_ids = token_ids, (anchor or []) + token_ids
    # An anchored chunk is placed anywhere later, so every layer keeps every token.
    whole = every_token or anchor is not None
    cache = DynamicCache() if whole else DynamicCache(config=lm.config)
    n = len(token_ids)
    window = min(max(0, int(importance_window)), n)
    for start in range(0, n - window, prefill_chunk):
        ids = torch.tensor([token_ids[start:min(start + prefill_chunk, n - window)]])
        lm.model(input_ids=ids, past_key_values=cache, use_cache=True)
        if progress is not None:
            progress(min(start + prefill_chunk, n - window), n)
    importance = head_importance = None
    if window:
        importance, head_importance = _observe(lm, token_ids[n - window:], cache, n)
        if progress is not None:
            progress(n, n)
    kv = KVCache.from_dynamic_cache(cache, token_ids, lm.fingerprint)
    kv.length = n
    kv.importance = importance
    if head_importance is not None:  # what kvcodec.evict scores heads by after the fact
        kv.extra["head_importance"] = head_importance
    if anchor is None:
        return kv
    part = kv.slice(a, n)
    return KVCache(part.keys, part.values, doc_ids, part.model, part.importance,
                   anchor=anchor)


def _observe(lm: LoadedModel, ids, cache, n: int) -> torch.Tensor:
    """Prefill ``ids`` with eager attention; float32 ``[layers, tokens]`` attention each
    cached token receives, averaged over heads and the new queries, and the same per KV
    head (``[layers, kv_heads, tokens]``, averaged over its query group)."""
    with eager(lm.model):
        out = lm.model(input_ids=torch.tensor([list(ids)]), past_key_values=cache,
                       use_cache=True, output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise BackendError("the model returned no attention weights; it cannot supply "
                           "token importance (pass importance_window=0)")
    kv_heads = _held(cache, lm)[0].shape[1]
    rows = [a[0].float().mean(dim=1)[:, -n:] for a in out.attentions]  # [Hq, tokens]
    imp = torch.zeros(len(rows), kv_heads, n)
    for l, r in enumerate(rows):  # a sliding-window layer attends to its last len(r) tokens
        imp[l, :, n - r.shape[1]:] = r.reshape(kv_heads, -1, r.shape[1]).mean(1)
    return imp.mean(1), imp


def _held(cache, lm: LoadedModel) -> list:
    """The keys of every layer of ``cache`` after a forward pass; a model that filled
    none (GPT-1 keeps no cache) is a ShapeError, not an AttributeError on None."""
    keys = [getattr(layer, "keys", None) for layer in getattr(cache, "layers", ())]
    if not keys or not all(isinstance(k, torch.Tensor) for k in keys):
        raise ShapeError(f"{lm.config.model_type} kept no keys and values in the cache it "
                         "was given; kvcodec codes models that cache per-head K/V")
    return keys
