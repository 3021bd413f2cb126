"""Codec configurations: which quantizer each layer's keys and values get.

A config is JSON (``configs/*.json``)::

    {
      "name": "cachegen",
      "description": "...",
      "chunk_tokens": 256,
      "key":   [{"layers": [0, 10],   "quantizer": {"type": "absmax_token", "bins": 32}},
                {"layers": [10, null], "quantizer": {"type": "absmax_token", "bins": 16}}],
      "value": [{"layers": [0, null],  "quantizer": {"type": "absmax_token", "bins": 16}}]
    }

Optional top-level fields: ``sink_tokens`` (the first N tokens, the attention sinks, are
also stored in float16 and restored exactly on decode; StreamingLLM, Xiao et al. 2024) and
``key_transform`` (``{"type": "rope_strip"}``: keys are coded before RoPE, see
:mod:`kvcodec.core.transforms`; ``"optional": true`` codes post-RoPE keys instead for
models whose RoPE cannot be undone exactly) and ``token_importance`` (``{"beta", "min", "max"}``: when
the cache carries attention importance, per-token steps are scaled by
``clamp((imp / geomean(imp)) ** -beta, min, max)``; see
:func:`kvcodec.core.quant.token_step_multipliers`) and ``full_attention_key_scale``
(see :func:`for_model`).

``key``/``value`` are lists of rules; a rule covers layers ``[start, end)`` (``end``
null = through the last layer; negative numbers count from the end). The first rule
that covers a layer applies; every layer must be covered. Quantizer types and their
fields are documented in :mod:`kvcodec.core.quant` (and the README's Configs section).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from ..errors import ConfigError
from .checks import is_int
from .paths import CONFIG_DIR, config_dirs, loads_json, user_config_dir  # noqa: F401 (API)
from .paths import open_regular
from .quant import make_quantizer, validate_token_importance
from .rate import check_rate_curve, for_target_kl

DEFAULT_CHUNK_TOKENS = 256
#: Larger than any config (a 30-layer calibration is ~100 KB; bases live in codebooks).
MAX_CONFIG_BYTES = 16 << 20
MAX_CHUNK_TOKENS = 1 << 16
#: The config field :func:`for_model` applies (and a file never records).
FULL_ATTENTION_KEY_SCALE = "full_attention_key_scale"
# Layer types that attend to a window of recent tokens only (transformers' names).
_LOCAL_LAYERS = ("sliding_attention", "chunked_attention")


# What identifies a model's weights for a calibration (see kvcodec.models.fingerprint).
_MODEL_KEY_FIELDS = ("architecture", "num_layers", "num_kv_heads", "head_dim", "vocab_size",
                     "tokenizer_hash", "weights_hash")


def model_key(fingerprint: dict | None) -> str | None:
    """The key a calibrated config is filed under, or None for a fingerprint that does not
    identify its weights (calibrations are per checkpoint, not per architecture)."""
    if not fingerprint or not fingerprint.get("weights_hash"):
        return None
    blob = json.dumps({k: fingerprint.get(k) for k in _MODEL_KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_config_file(path) -> dict:
    """The parsed JSON of the config file at ``path``. Anything but a regular file of at
    most :data:`MAX_CONFIG_BYTES` is an OSError or a ValueError, found before it is read: every
    ``default`` encode of a model scans the user's config folder, where a FIFO named
    ``*.json`` blocked its open forever and a huge file was read whole each time."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{size} bytes, larger than any config "
                             f"({MAX_CONFIG_BYTES >> 20} MiB)")
        return loads_json(fh.read(MAX_CONFIG_BYTES + 1).decode())


def calibrated_config_path(fingerprint: dict | None, name: str = "default") -> Path | None:
    """The calibrated config of this model named ``name``: shipped
    (``configs/calibrated/``) or made by ``kvcodec calibrate`` (:func:`user_config_dir`);
    the user's win. ``"default"`` falls back to any of the folder's configs of the model
    (calibrations written under another name). A first-encode fit
    (:mod:`kvcodec.core.fit`) is found by its name only, after every calibration of it."""
    key = model_key(fingerprint)
    if key is None:
        return None
    dirs = [user_config_dir()] + [d / "calibrated" for d in config_dirs()]
    fitted = None
    for d in dirs:
        other = None
        for path in sorted(d.glob("*.json")) if d.is_dir() else ():
            try:
                cfg = read_config_file(path)
                if cfg.get("model_key") != key:
                    continue
            except (OSError, ValueError, AttributeError):
                continue  # not a config of ours; load_config reports it if asked by name
            if cfg.get("fitted"):
                fitted = fitted or (path if cfg.get("name") == name else None)
            elif cfg.get("name") == name:
                return path
            else:
                other = other or path
        if other is not None and name == "default":
            return other
    return fitted


def available_configs() -> list[str]:
    names = set()
    for d in config_dirs():
        names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def load_config(spec, *, copy_dict: bool = True, model: dict | None = None,
                target_kl: float | None = None) -> dict:
    """A validated config from a name (``"default"``, ``"cachegen"``), a path, or a dict
    (copied unless ``copy_dict`` is False, for a dict the caller just parsed).

    A name with a ``model`` fingerprint is that model's calibrated config of that name
    where one exists (:func:`calibrated_config_path`; the embedded model ships
    ``"default"`` and ``"klt"``). ``"default"`` otherwise is the model-free default, whose
    per-token steps follow each token's own magnitude, so it suits any model.
    ``target_kl`` (or the config's own ``"target_kl"`` field) scales its steps along its
    measured rate curve (:mod:`kvcodec.core.rate`).
    """
    if isinstance(spec, dict):
        cfg = copy.deepcopy(spec) if copy_dict else spec
    else:
        spec = str(spec)
        path = Path(spec)
        calibrated = calibrated_config_path(model, spec) if model and not path.is_file() \
            else None
        if calibrated is not None:
            path = calibrated
        elif not path.is_file():
            for d in config_dirs():
                if (d / f"{spec}.json").is_file():
                    path = d / f"{spec}.json"
                    break
            else:
                hint = ("; klt configs are per model: kvcodec calibrate --klt measures "
                        "one, and an encoder given the model fits one on its first "
                        "cache") if spec == "klt" else ""
                raise ConfigError(f"no config {spec!r}: give a JSON file or one of "
                                  f"{available_configs()}{hint}")
        try:
            cfg = read_config_file(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
    validate_config(cfg)
    if target_kl is not None or (cfg.get("target_kl") is not None and "rate_factor" not in cfg):
        cfg = for_target_kl(cfg, cfg["target_kl"] if target_kl is None else target_kl)
    return cfg


def validate_config(cfg: dict) -> None:
    if not isinstance(cfg, dict):
        raise ConfigError("a config must be a JSON object")
    chunk = cfg.get("chunk_tokens", DEFAULT_CHUNK_TOKENS)
    if not is_int(chunk) or not 1 <= chunk <= MAX_CHUNK_TOKENS:
        raise ConfigError(f"chunk_tokens must be an integer in [1, {MAX_CHUNK_TOKENS}], got {chunk!r}")
    sinks = cfg.get("sink_tokens", 0)
    if not is_int(sinks) or not 0 <= sinks <= min(chunk, 64):
        raise ConfigError(f"sink_tokens must be an integer in [0, min(chunk_tokens, 64)], got {sinks!r}")
    xform = cfg.get("key_transform")
    if xform is not None and (not isinstance(xform, dict) or xform.get("type") != "rope_strip"
                              or not isinstance(xform.get("optional", False), bool)):
        raise ConfigError(f"key_transform must be null or {{'type': 'rope_strip'}} (with "
                          f"'optional': true to skip it where the RoPE cannot be undone), "
                          f"got {xform!r}")
    validate_token_importance(cfg.get("token_importance"))
    scale = cfg.get(FULL_ATTENTION_KEY_SCALE)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not 1 / 64 <= scale <= 64):
        raise ConfigError(f"{FULL_ATTENTION_KEY_SCALE} must be a number in [1/64, 64], "
                          f"got {scale!r:.40}")
    if cfg.get("rate_curve") is not None:
        check_rate_curve(cfg["rate_curve"])
    lossless = any(isinstance(r, dict) and isinstance(r.get("quantizer"), dict)
                   and r["quantizer"].get("type") == "lossless"
                   for kind in ("key", "value") if isinstance(cfg.get(kind), list)
                   for r in cfg[kind])
    if lossless and (sinks or xform is not None):
        raise ConfigError("a lossless config cannot strip RoPE or store sinks in float16")
    for kind in ("key", "value"):
        rules = cfg.get(kind)
        if not isinstance(rules, list) or not rules:
            raise ConfigError(f"config needs a non-empty list of rules under {kind!r}")
        for i, rule in enumerate(rules):
            where = f"{kind}[{i}]"
            if not isinstance(rule, dict) or "quantizer" not in rule:
                raise ConfigError(f"{where} must be an object with 'layers' and 'quantizer'")
            layers = rule.get("layers", [0, None])
            if (not isinstance(layers, list) or len(layers) != 2
                    or not is_int(layers[0])
                    or not (layers[1] is None or is_int(layers[1]))):
                raise ConfigError(f"{where}.layers must be [start, end] with end an int or null")
            try:
                make_quantizer(rule["quantizer"])
            except ConfigError as exc:
                raise ConfigError(f"{where}.quantizer: {exc}") from None


def resolve_layers(cfg: dict, num_layers: int) -> dict[str, list[dict]]:
    """Per-layer quantizer specs: ``{"key": [spec_layer0, ...], "value": [...]}``."""
    out = {}
    for kind in ("key", "value"):
        specs = []
        for layer in range(num_layers):
            for rule in cfg[kind]:
                start, end = rule.get("layers", [0, None])
                start = start + num_layers if start < 0 else start
                end = num_layers if end is None else (end + num_layers if end < 0 else end)
                if start <= layer < end:
                    specs.append(rule["quantizer"])
                    break
            else:
                raise ConfigError(
                    f"config {cfg.get('name', '?')!r} has no {kind} rule for layer {layer} "
                    f"of a {num_layers}-layer model")
        out[kind] = specs
    return out


def full_attention_layers(model: dict | None, num_layers: int) -> list[int]:
    """The full-attention layers of a model that mixes them with sliding-window (or
    chunked) layers, from its fingerprint's ``layer_types`` (Gemma 2/3, Cohere 2,
    gpt-oss, ...); empty for a model whose layers all attend alike."""
    types = (model or {}).get("layer_types")
    if not isinstance(types, list) or len(types) != num_layers:
        return []
    if not any(t in _LOCAL_LAYERS for t in types):
        return []
    return [i for i, t in enumerate(types) if t == "full_attention"]


def for_model(cfg: dict, model: dict | None, num_layers: int) -> dict:
    """``cfg`` as it applies to ``model``'s caches: what a file records.

    ``full_attention_key_scale`` (the model-free default's 0.5) multiplies the key steps
    of a mixed model's full-attention layers (:func:`full_attention_layers`): every
    later query reads their keys, while a sliding-window layer's keys leave its window,
    and they alone hold the far context. On Gemma 3 270M, whose 3 full-attention layers
    hold 37% of a 1,536-token file's elements, 0.5 cut held-out KL by ~30% at equal bits.
    The field is replaced by explicit per-layer key rules; ``cfg`` itself is returned
    where the field is absent, and a copy without it where no layer matches.
    """
    out = {k: v for k, v in cfg.items() if k != FULL_ATTENTION_KEY_SCALE}
    if cfg.get(FULL_ATTENTION_KEY_SCALE) is None:  # null: a file records no such field
        return out if FULL_ATTENTION_KEY_SCALE in cfg else cfg
    full = set(full_attention_layers(model, num_layers))
    if not full:
        return out
    scale = float(cfg[FULL_ATTENTION_KEY_SCALE])
    rules = []
    for layer, spec in enumerate(resolve_layers(cfg, num_layers)["key"]):
        spec = copy.deepcopy(spec)
        if layer in full and "step" in spec:
            spec["step"] = round(spec["step"] * scale, 6)
        if rules and rules[-1]["quantizer"] == spec:
            rules[-1]["layers"][1] = layer + 1
        else:
            rules.append({"layers": [layer, layer + 1], "quantizer": spec})
    rules[-1]["layers"][1] = None
    out["key"] = rules
    return out
