"""Plain K/V tensors on disk as safetensors (the uncompressed interchange format).

Tensor names are ``layers.{i}.key`` and ``layers.{i}.value``, each
``[1, kv_heads, tokens, head_dim]``; token ids and the model fingerprint go in the
metadata as JSON strings. safetensors never executes code on load.
"""
from __future__ import annotations

import errno
import json

from ..errors import FormatError, ShapeError
from ..core.kvcache import KVCache
from ..core.paths import loads_json, open_regular, write_output


def save_safetensors(kv: KVCache, path) -> None:
    """Write ``kv`` to ``path`` crash-safely (temp file + fsync + rename)."""
    from safetensors.torch import save

    if kv.evicted:
        raise ShapeError("an evicted cache (each head keeps its own tokens) has no plain "
                         "safetensors form here; save it as .kvc (kvcodec.encode(kv, "
                         "config='lossless') is exact)")

    tensors, storages = {}, set()
    for i, (k, v) in enumerate(zip(kv.keys, kv.values)):
        for name, t in ((f"layers.{i}.key", k), (f"layers.{i}.value", v)):
            t = t.contiguous()
            ptr = t.untyped_storage().data_ptr()
            # safetensors refuses tensors that share memory (a RuntimeError): layers
            # that share one K/V, or keys and values cut from one tensor.
            tensors[name] = t.clone() if ptr in storages else t
            storages.add(ptr)
    meta = {"format": "kvcodec-kv", "token_ids": json.dumps(kv.token_ids),
            "model": json.dumps(kv.model)}
    write_output(path, save(tensors, metadata=meta))


def load_safetensors(path) -> KVCache:
    """Read K/V tensors written by :func:`save_safetensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:  # safetensors maps the file: a FIFO's open waited for a writer for good
        open_regular(path).close()
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise FormatError(f"{path} is not a regular file (a safetensors file is mapped, "
                          "not streamed)") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            n = 0
            while f"layers.{n}.key" in names:
                n += 1
            if n == 0 or any(f"layers.{i}.value" not in names for i in range(n)):
                raise ShapeError(
                    f"{path}: expected tensors layers.0.key, layers.0.value, ... "
                    f"(found {sorted(names)[:6]})")
            keys = [f.get_tensor(f"layers.{i}.key") for i in range(n)]
            values = [f.get_tensor(f"layers.{i}.value") for i in range(n)]
    except SafetensorError as exc:
        raise FormatError(f"{path} is not a valid safetensors file: {exc}") from None
    try:
        token_ids = loads_json(meta.get("token_ids", "null"))
        model = loads_json(meta.get("model", "null"))
    except ValueError:
        raise FormatError(f"{path}: metadata is not valid JSON") from None
    if model is not None and not isinstance(model, dict):
        raise FormatError(f"{path}: metadata 'model' is not a JSON object")
    return KVCache(keys, values, token_ids, model)
