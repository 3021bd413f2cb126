"""Reference KV compression schemes, simulated in plain PyTorch for the eval table.

Each returns the reconstructed cache and its honest all-in size in bits, with every
scale and zero point counted, so they sit on the same axis as .kvc files:

* ``fp16``: cast to float16.
* ``int8``: 8-bit symmetric, one fp16 absmax scale per (layer, token).
* ``kivi{4,2}``: KIVI (Liu et al., ICML 2024): keys per-channel over groups of 32 tokens,
  values per-token over groups of 32 channels, asymmetric min/max with fp16 scale and
  zero per group (the full-precision residual window is left out: it would add the
  same fixed cost to every scheme).
* ``cachegen``: the released CacheGen scheme as it ships: the ``cachegen`` config's
  symbols entropy coded with tables computed per 256-token chunk, plus the side
  information its released code stores with every chunk: a 16-bit CDF per
  (layer, channel) and per-token fp16 scales (and 32-bit stream lengths).
"""
from __future__ import annotations

import torch

from ..core import tables
from ..core.config import load_config, resolve_layers
from ..core.kvcache import KVCache
from ..core.quant import make_quantizer
from ..core.streams import flatten, unflatten


def _map_layers(kv: KVCache, fn) -> tuple[KVCache, float]:
    keys, values, bits = [], [], 0.0
    for kind, src, dst in (("key", kv.keys, keys), ("value", kv.values, values)):
        for t in src:
            x = flatten(t)
            y, b = fn(kind, x)
            bits += b
            dst.append(unflatten(y, kv.num_kv_heads, kv.head_dim).to(t.dtype))
    return KVCache(keys, values, kv.token_ids, kv.model), bits


def fp16(kv: KVCache):
    return _map_layers(kv, lambda kind, x: (x.half().float(), x.numel() * 16))


def int8(kv: KVCache):
    def q(kind, x):
        s = x.abs().amax(dim=1, keepdim=True).half().float().clamp_min(1e-30)
        y = torch.round(x / s * 127).clamp(-127, 127) * s / 127
        return y, x.numel() * 8 + x.shape[0] * 16
    return _map_layers(kv, q)


def _minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max quantization over the last dim, fp16 scale and zero."""
    lo = x.amin(dim=-1, keepdim=True).half().float()
    hi = x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).half().float().clamp_min(1e-30)
    return torch.round((x - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo


def kivi(kv: KVCache, bits: int, group: int = 32):
    def q(kind, x):
        t, c = x.shape
        if kind == "key":  # per channel, groups of `group` tokens
            pad = (-t) % group
            xp = torch.cat([x, x[-1:].expand(pad, c)]) if pad else x
            g = xp.reshape(-1, group, c).transpose(1, 2)
            y = _minmax(g, bits).transpose(1, 2).reshape(-1, c)[:t]
            n_groups = c * ((t + group - 1) // group)
        else:  # per token, groups of `group` channels
            g = x.reshape(t, -1, group)
            y = _minmax(g, bits).reshape(t, c)
            n_groups = t * (c // group)
        return y, x.numel() * bits + n_groups * 32
    return _map_layers(kv, q)


def cachegen_released(kv: KVCache, chunk_tokens: int = 256):
    """CacheGen's config with per-chunk tables and its per-chunk side information."""
    specs = resolve_layers(load_config("cachegen"), kv.num_layers)
    state = {"layer": {"key": 0, "value": 0}}

    def q(kind, x):
        layer = state["layer"][kind]
        state["layer"][kind] += 1
        quant = make_quantizer(specs[kind][layer])
        sym, side = quant.quantize(x, quant.fit(x))
        y = quant.dequantize(torch.from_numpy(sym), {}, side)
        bits = 0.0
        for start in range(0, x.shape[0], chunk_tokens):
            part = sym[start:start + chunk_tokens]
            bits += tables.entropy_bits(tables.channel_counts(part, quant.alphabet))
            bits += x.shape[1] * (quant.alphabet + 1) * 16  # CDF per (layer, channel)
            bits += part.shape[0] * 16 + 32                 # per-token scales, length
        return y, bits
    return _map_layers(kv, q)


SCHEMES = {
    "fp16": fp16,
    "int8": int8,
    "kivi4": lambda kv: kivi(kv, 4),
    "kivi2": lambda kv: kivi(kv, 2),
    "cachegen": cachegen_released,
}
