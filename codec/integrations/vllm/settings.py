"""``kv_connector_extra_config`` values, checked: vLLM hands them over as the user wrote
them (JSON, or strings from a command line), so a flag written ``"false"`` was true to
``bool()``, a number written ``"abc"`` was a ValueError at engine start, and a
``load_timeout_s`` of NaN timed every load out at once (``max(0, NaN)`` is 0). Each is a
:class:`~kvcodec.errors.ConfigError` naming the key."""
from __future__ import annotations

import math

from ...errors import ConfigError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(extra, name: str, default: bool) -> bool:
    """Setting ``name`` as true or false: a JSON boolean, 0 or 1, or one of the words
    ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case)."""
    value = extra.get_from_extra_config(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"kv_connector_extra_config.{name} must be true or false, got "
                      f"{value!r:.60}")


def number(extra, name: str, default, *, minimum: float, maximum: float = math.inf,
           integer: bool = False, above: bool = False):
    """Setting ``name`` as a finite number in ``[minimum, maximum]`` (above ``minimum``,
    with ``above``), an int with ``integer``; None where it is unset and ``default`` is
    None. Strings of numbers are numbers (``"1e9"``); booleans are not."""
    value = extra.get_from_extra_config(name, default)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    low = x > minimum if above else x >= minimum
    if not (math.isfinite(x) and low and x <= maximum) or (integer and x != int(x)):
        kind = "an integer" if integer else "a number"
        top = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
        raise ConfigError(f"kv_connector_extra_config.{name} must be {kind} "
                          f"{'>' if above else '>='} {minimum:g}{top}, got {value!r:.60}")
    return int(x) if integer else x
