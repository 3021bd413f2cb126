"""Rate control: ask for a quality (a KL target), get the steps that give it.

A config that ``kvcodec calibrate`` (full or ``--fast``) wrote for a model carries its
measured rate curve::

    "rate_curve": [[factor, kl, bits_per_element], ...]

the mean continuation KL and payload bits the config gave on the calibration texts with
every step multiplied by ``factor`` (1.0: the config as written), and optionally
``"rate_margin"`` (default 1): how much lower than the target the calibration texts' KL
must be, because held-out text runs higher. :func:`for_target_kl` picks the factor for
``target * rate_margin`` by interpolating ``log KL`` against ``log factor``
between the measured points (extrapolating along the end segments, within
:data:`FACTOR_RANGE`) and returns the config with its steps scaled. A config may also
name its own ``"target_kl"``, which :func:`kvcodec.load_config` applies the same way.
Without a curve there is nothing to pick from: :class:`ConfigError` says how to get one.
"""
from __future__ import annotations

import copy
import math

from ..errors import ConfigError

# The most bins a uniform quantizer has (an odd count: 2 R + 1 symbols within 256).
MAX_UNIFORM_BINS = 255
# Factors a curve may be extrapolated to, around the measured points.
FACTOR_RANGE = (1 / 8, 8.0)


def scale_steps(cfg: dict, factor, name: str | None = None) -> dict:
    """A copy of ``cfg`` with every quantizer's step multiplied by ``factor`` (absmax
    quantizers: bins divided by it), or by ``factor[kind]`` where it is a ``{"key":
    ..., "value": ...}`` dict; lossless rules are unchanged. A uniform quantizer made
    finer keeps its range: its bins grow as its step shrinks (up to 255), since a range
    cut with the step would start clipping the values it covered."""
    out = copy.deepcopy(cfg)
    factors = factor if isinstance(factor, dict) else dict.fromkeys(("key", "value"), factor)
    for kind, f in factors.items():
        for rule in out[kind]:
            q = rule["quantizer"]
            if "step" in q:
                q["step"] = float(min(64.0, round(q["step"] * f, 6)))
                if f < 1 and isinstance(q.get("bins"), int):
                    r = math.ceil((q["bins"] - 1) // 2 / f - 1e-9)
                    q["bins"] = max(q["bins"], min(MAX_UNIFORM_BINS, 2 * r + 1))
            elif q.get("type") == "absmax_token":
                q["bins"] = int(min(256, max(4, round(q["bins"] / f))))
    if name is not None:
        out["name"] = name
    return out


def check_rate_curve(curve) -> list:
    """The curve's points sorted by factor; ConfigError unless it is a list of at least
    two ``[factor, kl, bits]`` with positive factors and KL."""
    ok = isinstance(curve, list) and len(curve) >= 2 and all(
        isinstance(p, list) and len(p) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in p) and p[0] > 0 and p[1] > 0 for p in curve)
    if not ok:
        raise ConfigError("rate_curve must be a list of at least two [factor, kl, bits] "
                          "points with positive factor and KL")
    return sorted(curve)


def factor_for_kl(curve: list, target_kl: float) -> float:
    """The step factor whose KL the curve puts at ``target_kl`` (log-log interpolation)."""
    if not isinstance(target_kl, (int, float)) or not 0 < target_kl < 100:
        raise ConfigError(f"target_kl must be a positive number, got {target_kl!r:.40}")
    pts = check_rate_curve(curve)
    # KL grows with the factor; where measurement noise bends it, keep it monotone.
    xs = [math.log(p[0]) for p in pts]
    ys, top = [], -math.inf
    for p in pts:
        top = max(top, math.log(p[1]))
        ys.append(top)
    t = math.log(target_kl)
    i = 1
    while i < len(xs) - 1 and ys[i] < t:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    x = x0 + (t - y0) * (x1 - x0) / (y1 - y0) if y1 > y0 else (x1 if t >= y1 else x0)
    return float(min(FACTOR_RANGE[1], max(FACTOR_RANGE[0], math.exp(x))))


def for_target_kl(cfg: dict, target_kl: float) -> dict:
    """``cfg`` with its steps scaled to meet ``target_kl`` on its rate curve."""
    curve = cfg.get("rate_curve")
    if curve is None:
        raise ConfigError(
            f"config {cfg.get('name', '?')!r} has no rate curve, so a KL target cannot pick "
            "its steps: run `kvcodec calibrate --fast --model ...` (about a minute per 1B "
            "parameters) to measure one for the model, or give steps instead")
    margin = cfg.get("rate_margin", 1.0)
    if not isinstance(margin, (int, float)) or not 0 < margin <= 1:
        raise ConfigError(f"rate_margin must be a number in (0, 1], got {margin!r:.40}")
    f = factor_for_kl(curve, target_kl * margin)
    out = scale_steps(cfg, f)
    out["rate_curve"] = [[p[0] / f, p[1], p[2]] for p in check_rate_curve(curve)]
    out["target_kl"] = float(target_kl)
    out["rate_factor"] = f
    return out
