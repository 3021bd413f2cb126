"""Batched capture: several token sequences prefilled in one forward pass, each row's KV
exactly what it would be alone, with the attention importance of its last queries.

Why not transformers' padded batch
    Right-padding a batch and passing an attention mask changes the numbers a row gets:
    the masked attention kernel is not the unmasked causal one a sequence run alone
    takes (seen here: differences of ~1e-5 in keys), and a lossy codec rounds some of
    them differently. A corpus job must write the same bytes whatever documents share
    a batch (a resumed or scaled-out job batches differently), so :func:`capture_batch`
    switches the model to an attention function (``kvcodec_batch``) that runs every
    row's *own* causal attention over its own length: the projections and MLPs see a
    padded ``[B, T, D]`` batch (run in fixed-shape blocks, below, so that their per-token
    rows do not depend on the other rows), attention never crosses a row or reaches a
    pad. The padding is wasted compute; batches of similar lengths (the job sorts them)
    keep it small.

Why the projections run in blocks of ``ROW_BLOCK`` tokens
    A token's row of ``x @ W.T`` is not the same whatever the other rows: the BLAS picks
    its kernel and its threads' split of the work from the GEMM's shape, and some splits
    change the order of the sum over the inner dimension. Seen with MKL's SGEMM, 2
    threads, AVX-512: ``[M, 1536] @ [1536, 576]`` (SmolLM2's ``down_proj``) rounds a row
    differently for 64 <= M <= 192 (the inner dimension split between the threads) than
    for M >= 200; M < 16 takes another kernel and M = 1 a GEMV, with any thread count.
    A batch's ``[B * T, D]`` and a lone row's ``[n, D]`` then differ from the first
    layer on. So inside :func:`capture_batch` every ``linear`` of the decoder
    (:class:`_FixedShapeLinear`) is computed ``ROW_BLOCK`` tokens at a time, the last
    block zero-padded: every GEMM has the same shape, so the BLAS takes the same kernel
    and split for each, and a token's row comes out the same in any batch (it depends on
    neither its place in a block nor the other rows; checked with MKL for blocks of 16 to
    512). The padding costs at most ``ROW_BLOCK - 1`` tokens a pass, the smaller GEMMs
    ~5-10% of a batch's time (CPU, 2 threads).

Importance in the same pass
    :func:`kvcodec.capture_kv` reruns the last ``importance_window`` tokens with eager
    attention to read their attention weights. Here the attention function computes the
    window's weights itself while the batch runs, per row, through the model's own eager
    function (scaling, soft-capping, sliding windows stay the model's), so importance
    costs a ``window x T`` score matrix per layer instead of a second pass.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..core.kvcache import KVCache
from ..errors import BackendError, ShapeError
from .attention import attention_implementation, eager_attention_function
from .capture import IMPORTANCE_WINDOW
from .loading import LoadedModel

IMPLEMENTATION = "kvcodec_batch"
_state = threading.local()  # the batch being run in this thread (lengths, importance)
ROW_BLOCK = 256  # tokens per projection GEMM in a batch capture (see the module's doc)


class _Batch:
    def __init__(self, lengths, window: int, layers: int):
        self.lengths = lengths
        self.window = window
        self.head_importance = [[None] * layers for _ in lengths]  # [row][layer] [Hkv, n]


@torch.no_grad()
def capture_batch(lm: LoadedModel, sequences, *, anchor=None,
                  importance_window: int = IMPORTANCE_WINDOW) -> list:
    """The KV cache of each token sequence in ``sequences``, from one forward pass.

    Each returned :class:`KVCache` holds every layer's keys and values for every token
    (sliding-window layers too), post-RoPE, with ``importance`` and
    ``extra["head_importance"]`` from the last ``importance_window`` queries, as
    :func:`kvcodec.capture_kv` gives. With ``anchor``, every sequence runs behind it and
    the anchor rows are dropped (position-independent chunks for blending).

    A row's tensors do not depend on which other sequences share the batch.
    """
    seqs = [[int(t) for t in s] for s in sequences]
    if not seqs or any(not s for s in seqs):
        raise ShapeError("capture_batch needs non-empty token sequences")
    anchor = None if anchor is None else [int(t) for t in anchor]
    a = len(anchor or ())
    rows = [(anchor or []) + s for s in seqs]
    lengths = [len(r) for r in rows]
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise ShapeError(f"{max(lengths)} tokens exceed the model's context of {limit}")
    width = max(lengths)
    pad = _pad_id(lm)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    positions = torch.arange(width).expand(len(rows), width)
    from transformers import DynamicCache

    cache = DynamicCache()  # every layer keeps every token; rows are cut out below
    layers = lm.fingerprint["num_layers"]
    batch = _Batch(lengths, max(0, int(importance_window)), layers)
    model = lm.model
    _state.batch = batch
    try:
        with attention_implementation(model, IMPLEMENTATION, "capture documents one at a time"), \
                _FixedShapeLinear(_output_weight(model)):
            model(input_ids=ids, position_ids=positions, past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
    finally:
        _state.batch = None
    out = []
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        keys = [layer.keys[b:b + 1, :, a:n].clone() for layer in cache.layers]
        values = [layer.values[b:b + 1, :, a:n].clone() for layer in cache.layers]
        kv = KVCache(keys, values, seq, lm.fingerprint)
        if batch.window:
            head = torch.stack([h[:, a:n] for h in batch.head_importance[b]])
            kv.extra["head_importance"] = head
            kv.importance = head.mean(1)
        kv.anchor = anchor
        out.append(kv)
    return out


def _output_weight(model):
    """The LM head's weight: its logits are not kept, so it runs as it is."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "weight", None)


class _FixedShapeLinear(TorchFunctionMode):
    """Inside the block, ``F.linear`` (every ``nn.Linear``) runs :func:`fixed_shape_linear`,
    except with ``skip`` (the LM head's weight). Thread-local, as torch's mode stack is."""

    def __init__(self, skip=None):
        super().__init__()
        self.skip = skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not self.skip:
                return fixed_shape_linear(*args, **kwargs)
        return func(*args, **kwargs)


def fixed_shape_linear(input, weight, bias=None, block: int = ROW_BLOCK):
    """``F.linear(input, weight, bias)`` computed ``block`` rows (tokens) at a time, the
    last block zero-padded: every GEMM has the shape ``[block, in] @ [in, out]``, so each
    row's result depends on neither the number of rows nor where the row sits."""
    k = input.shape[-1]
    m = input.numel() // k if k else 0
    if m == 0:
        return F.linear(input, weight, bias)
    flat = input.reshape(m, k)
    full = m - m % block
    out = flat.new_empty(full + (block if full < m else 0), weight.shape[0])
    wt = weight.t()
    for i in range(0, out.shape[0], block):  # the GEMM F.linear runs, into `out`: no copy
        rows = flat[i:i + block]
        if i == full:
            rows = torch.cat([rows, rows.new_zeros(block - rows.shape[0], k)])
        if bias is None:
            torch.mm(rows, wt, out=out[i:i + block])
        else:
            torch.addmm(bias, rows, wt, out=out[i:i + block])
    return out[:m].reshape(*input.shape[:-1], weight.shape[0])


def _pad_id(lm) -> int:
    tok = lm.tokenizer
    for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(cand, int):
            return cand
    return 0


def _row_mask(q_pos: torch.Tensor, n: int, window, dtype) -> torch.Tensor:
    """Additive ``[1, 1, q, n]`` mask: causal, and within ``window`` on sliding layers."""
    k_pos = torch.arange(n)
    ok = k_pos[None, :] <= q_pos[:, None]
    if window:
        ok &= k_pos[None, :] > q_pos[:, None] - int(window)
    return torch.where(ok, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


def batch_attention(module, query, key, value, attention_mask, **kwargs):
    """Every row's own causal attention over its own tokens (transformers' sdpa function
    on the unpadded row; the model's eager function where it soft-caps attention logits,
    which SDPA would skip), plus the attention weights of its last queries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch = getattr(_state, "batch", None)
    if batch is None:
        raise BackendError("the kvcodec_batch attention runs only inside capture_batch")
    window = kwargs.get("sliding_window")
    kwargs.pop("position_ids", None)
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    layer = getattr(module, "layer_idx", 0)
    softcap = kwargs.get("softcap")  # Gemma 2's logit soft-capping, which SDPA skips
    eager = (eager_attention_function(module, "capture documents one at a time")
             if batch.window or softcap else None)
    for b, n in enumerate(batch.lengths):
        q, k, v = query[b:b + 1, :, :n], key[b:b + 1, :, :n], value[b:b + 1, :, :n]
        # eager needs a mask (causal, windowed where the layer slides); SDPA only a window
        mask = (_row_mask(torch.arange(n), n, window, query.dtype) if window or softcap
                else None)
        if softcap:  # the model's own eager function, which soft-caps
            row, _ = eager(module, q, k, v, mask, **{**kwargs, "dropout": 0.0})
        else:
            row, _ = sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None,
                                            **kwargs)
        out[b, :n] = row[0]
        w = min(batch.window, n)
        if w:
            q_pos = torch.arange(n - w, n)
            _, weights = eager(module, q[:, :, n - w:], k, v,
                               _row_mask(q_pos, n, window, query.dtype),
                               **{**kwargs, "dropout": 0.0})
            heads = weights[0].float().mean(dim=1)  # [Hq, n]: mean over the window queries
            kv_heads = key.shape[1]
            batch.head_importance[b][layer] = heads.reshape(kv_heads, -1, n).mean(1)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, batch_attention)


_register()
