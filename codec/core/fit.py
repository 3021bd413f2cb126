"""Fitting ``klt`` configs: a config's per-token-step streams recoded in each KV head's
eigenbasis (:mod:`kvcodec.core.klt`), the bases fitted on caches of the model and kept in
one :class:`~kvcodec.core.codebook.Codebook`.

For every layer and kind, the vectors the quantizer would see (keys before RoPE, after
the attention sinks), centered on their mean and divided by the config's per-channel
step multipliers (the query weights), give a covariance per KV head (pooled over the
caches); its eigenvectors, by falling eigenvalue, are the basis. Every step of the
config stays: ``klt_config`` changes what is coded, not how finely. A stream that the
config did not center keeps sizing its tokens' steps by their raw RMS (``"rms":
"raw"``), so each token keeps the step the calibration chose for it.

Two callers: ``kvcodec calibrate --klt`` (bases of the calibration texts' caches, under
the calibrated steps) and the first-encode fit (:func:`first_fit`: a model without a
``klt`` calibration gets bases of the first cache it encodes under the model-free
default's steps, keys finer and values coarser (:data:`FIRST_FIT_STEPS`), no model run,
kept for the caches after it with :func:`save_fitted`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .codebook import Codebook, register
from .codebook import save as save_codebook
from .config import (calibrated_config_path, for_model, model_key, resolve_layers,
                     validate_config)
from .kvcache import KVCache
from .paths import atomic_write, user_config_dir
from .quant import make_quantizer
from .rate import scale_steps
from .streams import KINDS, layer_span, stream_input
from .transforms import applied_key_transform, layer_ropes

#: Rows (tokens after the sinks) a first-encode fit needs: twice the common head dim of
#: 128, below which a head's covariance is far from full rank. A shorter cache is coded
#: with the base config, and the fit waits for a longer one.
FIRST_FIT_TOKENS = 256
#: The ``fitted`` field of a first-encode fit's config (calibrations have none).
FIRST_FIT = "first encode, model-free"
#: A first-encode fit's steps against the base config's, per kind. In the bases a key
#: vector's energy sits in few components, so at the channel code's steps more of its
#: components round to zero, and key errors move every attention logit: at the base's
#: steps the fit's perplexity rose 1.25% on SmolLM2 (0.45% the channel code), over
#: 3 x 1,024 scored tokens. Keys x0.9 and values x1.15: +0.53%, at 2.47 bits against
#: 2.49; on Gemma 3 and Qwen2.5-Coder 1% fewer bits, KL 0.0040 / 0.0023 (0.0037 /
#: 0.0018 before), perplexity alike (README, Transform coding).
FIRST_FIT_STEPS = {"key": 0.9, "value": 1.15}


def basis_index(layer: int, kind: str) -> int:
    """Where a stream's basis sits in a codebook fitted by :func:`fit_bases`."""
    return 2 * layer + KINDS.index(kind)


def fit_bases(caches: list, cfg: dict) -> np.ndarray:
    """Bases ``[2 * layers, heads, d, d]`` (float64 eigenvectors as columns, largest
    variance first) of the streams of ``caches`` (:class:`KVCache` s of one model) as
    ``cfg`` codes them."""
    if not caches:
        raise ShapeError("fitting bases needs at least one cache")
    kv0 = caches[0]
    n_layers, h, d = kv0.num_layers, kv0.num_kv_heads, kv0.head_dim
    sums = {}
    for kv in caches:
        if (kv.num_layers, kv.num_kv_heads, kv.head_dim) != (n_layers, h, d):
            raise ShapeError("the calibration caches are of different models")
        c = for_model(cfg, kv.model, n_layers)
        specs = resolve_layers(c, n_layers)
        xform, c = applied_key_transform(c, kv.model, n_layers, 0, kv.num_tokens)
        ropes = layer_ropes(xform, n_layers, d)
        for layer in range(n_layers):
            s0, n_sink = layer_span(kv, c, layer)
            for kind in KINDS:
                q = make_quantizer(specs[kind][layer], kv.dtype)
                x = stream_input((kv.keys if kind == "key" else kv.values)[layer], kind,
                                 ropes[layer] if kind == "key" else None, s0)
                z = (x / q.head_mult(x.shape[1]))[n_sink:].double()
                got = sums.setdefault(basis_index(layer, kind), [0, 0.0, 0.0])
                got[0] += z.shape[0]
                got[1] = got[1] + z.sum(0)
                got[2] = got[2] + z.T @ z
    out = np.zeros((2 * n_layers, h, d, d))
    for i, (n, s, ss) in sums.items():
        mean = s / n
        cov = ss / n - torch.outer(mean, mean)
        for head in range(h):
            sl = slice(head * d, (head + 1) * d)
            out[i, head] = torch.linalg.eigh(cov[sl, sl])[1].flip(1).numpy()
    return out


def klt_config(cfg: dict, caches: list, note: str = "") -> tuple[dict, Codebook]:
    """``(config, codebook)``: ``cfg`` (per-token-step ``uniform`` streams, as the
    calibrated and model-free configs have) with every stream coded in bases fitted on
    ``caches``, one rule per layer and kind. The codebook is registered in this process,
    not saved (:func:`kvcodec.core.codebook.save` makes it last)."""
    kv0 = caches[0] if caches else None
    if kv0 is None:
        raise ShapeError("fitting bases needs at least one cache")
    n_layers = kv0.num_layers
    cfg = for_model(cfg, kv0.model, n_layers)
    specs = resolve_layers(cfg, n_layers)
    for kind in KINDS:
        for layer, spec in enumerate(specs[kind]):
            if spec.get("type") != "uniform" or spec.get("scale") != "token":
                raise ConfigError(f"klt needs per-token-step uniform streams; layer {layer} "
                                  f"{kind}s are {spec.get('type')!r} ({spec.get('scale')!r})")
    book = register(Codebook(fit_bases(caches, cfg), note=note))
    out = copy.deepcopy(cfg)
    for kind in KINDS:
        rules = []
        for layer, spec in enumerate(specs[kind]):
            q = {k: v for k, v in spec.items() if k not in ("type", "scale", "center")}
            q = {"type": "klt", **q, "bins": 255,  # the widest range: unused costs nothing
                 "rms": "centered" if spec.get("center") else "raw",
                 "basis": {"codebook": book.digest, "index": basis_index(layer, kind)}}
            rules.append({"layers": [layer, layer + 1], "quantizer": q})
        rules[-1]["layers"][1] = None
        out[kind] = rules
    out.pop("rate_curve", None)  # measured for the channel code; measure it again
    validate_config(out)
    return out, book


def wants_first_fit(config, fingerprint: dict | None) -> bool:
    """Whether an encoder of ``fingerprint``'s model asked for ``config`` fits one on
    its first cache: ``"klt"`` by name, for a model identified by its weights that no
    ``klt`` config (calibrated or fitted before) exists for."""
    return (isinstance(config, str) and config == "klt" and model_key(fingerprint) is not None
            and calibrated_config_path(fingerprint, "klt") is None)


def first_fit(kv: KVCache, base: dict, model: dict | None = None
              ) -> tuple[dict, Codebook] | None:
    """``(config, codebook)``: ``base`` (the model's per-token-step config: the
    model-free default where nothing is calibrated) coded in bases fitted on ``kv``
    alone, its steps scaled by :data:`FIRST_FIT_STEPS`, named ``"klt"`` and keyed to
    ``model`` (default ``kv.model``); None where ``kv`` cannot give them (an evicted
    cache, fewer than :data:`FIRST_FIT_TOKENS` rows after the sinks, a model without a
    weights fingerprint, values that are not finite). Only the cache is read: no model
    runs."""
    if model is not None and model is not kv.model:
        kv = dataclasses.replace(kv, model=model)  # the key transform as files record it
    key = model_key(kv.model)
    rows = kv.num_tokens - base.get("sink_tokens", 0)
    if key is None or kv.evicted or rows < FIRST_FIT_TOKENS or not all(
            bool(torch.isfinite(t).all()) for t in (*kv.keys, *kv.values)):
        return None  # (not finite: the encode that follows says where)
    cfg, book = klt_config(base, [kv], note=f"kvcodec first-encode fit ({rows} rows)")
    cfg = scale_steps(cfg, FIRST_FIT_STEPS)
    cfg.update(name="klt", model_key=key, fitted=FIRST_FIT, fit_tokens=kv.num_tokens,
               description=f"{base.get('name', 'default')}'s steps (keys x"
                           f"{FIRST_FIT_STEPS['key']:g}, values x{FIRST_FIT_STEPS['value']:g}) "
                           f"in KV-head bases fitted on the first {kv.num_tokens}-token cache "
                           "encoded (no calibration: kvcodec calibrate --klt measures one)")
    return cfg, book


def save_fitted(cfg: dict, book: Codebook, folder=None) -> Path:
    """Keep a :func:`first_fit` for the caches after it: the codebook into the user's
    codebook folder, then the config as ``klt-<model key>.json`` into the user config
    directory (``folder``), where ``load_config("klt", model=...)`` finds it. Both
    written atomically; OSError as raised."""
    save_codebook(book)
    folder = Path(folder) if folder is not None else user_config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"klt-{cfg['model_key']}.json"
    atomic_write(path, (json.dumps(cfg, indent=1) + "\n").encode())
    return path
