"""Store: applications over many .kvc files. ``chunks`` is the chunk store (one file per
chunk, keyed by a chained hash of the token prefix, for prefix reuse); ``adapt`` picks a
quality level or recomputation per chunk to meet a time-to-first-token budget.

May import every layer below it: ``core``, ``format``, ``models``, ``integrations``.
"""
from .chunks import Store, prefill_with_store

__all__ = ["Store", "prefill_with_store"]
