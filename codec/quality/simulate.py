"""What a config does to a cache, without coding it: quantized and dequantized as the
codec would, with the empirical entropy of its symbols (calibration's inner loop)."""
from __future__ import annotations

import torch

from ..core import tables
from ..core.config import for_model, resolve_layers
from ..core.kvcache import KVCache
from ..core.quant import fit_stream, make_quantizer
from ..core.streams import (KINDS, layer_span, step_multipliers, stream_counts, stream_input,
                            unflatten)
from ..core.transforms import applied_key_transform, layer_ropes, rope


def simulate(kv: KVCache, cfg: dict, only=None, with_bits: bool = False):
    """Quantize and dequantize ``kv`` as the codec would (no entropy coding).

    ``only`` = (layer, kind) or (layer, kind, head) limits the loss to one stream or one
    KV head of it. With ``with_bits``, also
    returns the empirical entropy of every coded symbol (a close estimate of the
    payload; the .kvc file adds ~2% of side information).
    """
    cfg = for_model(cfg, kv.model, kv.num_layers)
    specs = resolve_layers(cfg, kv.num_layers)
    n = kv.num_tokens
    xform, cfg = applied_key_transform(cfg, kv.model, kv.num_layers, 0, n)
    ropes = layer_ropes(xform, kv.num_layers, kv.head_dim)
    keys, values = list(kv.keys), list(kv.values)
    bits = 0.0
    for layer in range(kv.num_layers):
        s0, n_sink = layer_span(kv, cfg, layer)
        imp = None if kv.importance is None else kv.importance[:, s0:]
        for kind, dst in zip(KINDS, (keys, values)):
            if only is not None and tuple(only[:2]) != (layer, kind):
                continue
            rope_here = ropes[layer] if kind == "key" else None
            x = stream_input(dst[layer], kind, rope_here, s0)
            q = make_quantizer(specs[kind][layer], kv.dtype)
            params = fit_stream(q, x, n_sink)
            sym, side = q.quantize(x, params, step_multipliers(cfg, imp, layer, n_sink))
            y = q.dequantize(torch.from_numpy(sym), params, side)
            y[:n_sink] = x[:n_sink].half().float()
            if only is not None and len(only) == 3:  # keep the other heads exact
                d = kv.head_dim
                keep = torch.ones(x.shape[1], dtype=torch.bool)
                keep[only[2] * d:(only[2] + 1) * d] = False
                y[:, keep] = x[:, keep]
            if with_bits:
                bits += tables.entropy_bits(stream_counts(q, sym, x.shape[1]))
                bits += 0 if side is None else side.size * 16
                bits += n_sink * x.shape[1] * 16
            out = unflatten(y, kv.num_kv_heads, kv.head_dim)
            if rope_here is not None:
                out = rope(out, rope_here, s0)
            dst[layer] = out.to(kv.dtype)
    result = KVCache(keys, values, kv.token_ids, kv.model, length=n)
    return (result, bits) if with_bits else result
