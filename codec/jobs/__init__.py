"""Jobs: batch precompute over document corpora. Read a corpus (:class:`Corpus`: text
files, JSONL, Parquet, local or fsspec URLs), prefill its documents in batches, and fill
a store (a directory or an object store) with their entries, resumably (a manifest of
finished documents in the store) and in this process or on a Ray actor pool
(:func:`precompute`).

The top layer beside ``quality``, ``blend`` and ``evict``: may import every layer below
it (``core``, ``format``, ``models``, ``store``, ``evict``), never the CLI.
"""
from .corpus import Corpus, Document, Skipped
from .plan import JobSpec
from .report import DocResult, Summary
from .runner import precompute

__all__ = ["Corpus", "Document", "Skipped", "JobSpec", "DocResult", "Summary", "precompute"]
