"""Token selectors for blending, one per file; each picks which cached tokens to
recompute from what the check pass measured (see :class:`base.Selector`)."""
from __future__ import annotations

from ...errors import ConfigError
from .all import Everything
from .base import Context, Selector, top
from .boundary import Boundary
from .hkvd import HKVD
from .none import NoRecompute
from .query import Query
from .random import Random

SELECTORS = {s.name: s for s in (HKVD, Query, Boundary, Random, NoRecompute, Everything)}


def get_selector(selector) -> Selector:
    """A :class:`Selector` from its name (see ``SELECTORS``) or an instance."""
    if isinstance(selector, Selector):
        return selector
    if selector not in SELECTORS:
        raise ConfigError(f"unknown selector {selector!r}; known: {', '.join(SELECTORS)}")
    return SELECTORS[selector]()


__all__ = ["SELECTORS", "Context", "Selector", "get_selector", "top"]
