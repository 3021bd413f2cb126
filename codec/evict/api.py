"""Front doors: evict during a capture (:func:`press`, :func:`capture`), or parse a
policy spec; after the fact, :func:`kvcodec.evict.evict`."""
from __future__ import annotations

from ..errors import ConfigError
from .base import check_ratio
from .policies import POLICIES, get_policy
from .presses import Press


def press(model, policy, ratio: float) -> Press:
    """``with press(model, "snapkv", 0.25) as p:`` run the prefill, then
    ``p.evict(cache)``: scores come from the attention of that very prefill (hooks
    on the model's attention modules, removed when the block ends)."""
    return Press(model, get_policy(policy), check_ratio(ratio))


def capture(lm, text: str | None = None, policy="snapkv", ratio: float = 0.5, **kwargs):
    """:func:`kvcodec.capture_kv` under :func:`press`: the evicted cache of ``text``."""
    from ..models.capture import capture_kv

    with press(lm, policy, ratio) as p:
        kv = capture_kv(lm, text, **kwargs)
    return p.evict(kv)


def parse(spec: str) -> tuple:
    """``"snapkv:0.25"`` -> ``("snapkv", 0.25)`` (policy and kept ratio), checked."""
    name, sep, value = str(spec).rpartition(":")
    if not sep or not name:
        raise ConfigError(f"an eviction spec is POLICY:RATIO (e.g. snapkv:0.25), got "
                          f"{spec!r}; policies: {', '.join(sorted(POLICIES))}")
    try:
        ratio = float(value)
    except ValueError:
        raise ConfigError(f"the kept ratio in {spec!r} is not a number") from None
    get_policy(name)
    return name, check_ratio(ratio)
