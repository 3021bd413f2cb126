"""The job manifest: which documents are finished, kept in the store itself.

One small JSON object per finished document, at ``manifest/<job>/<text hash>.json`` in
the store's root (entries live under two-hex-digit folders, so the names never
meet). ``<job>`` is :meth:`JobSpec.key`: the model, configs, mode and window size, so a
job with other settings does not take this job's documents as done. Keying a document by
the hash of its text, not its id, makes an edited document count as new, and a
document repeated under two ids count once.

The record is written (atomically, like every entry) only after every entry of the
document is stored, so a job killed at any point finds either a complete document or
none: a resumed job skips complete documents without even tokenizing them, and a
document cut short is prefilled again only for its windows whose entries are missing.
"""
from __future__ import annotations

import hashlib
import json

from ..core.checks import is_int
from ..core.paths import loads_json
from ..errors import KVCodecError
from ..store.admin import MAX_RECORD_BYTES


class Manifest:
    def __init__(self, store, job_key: str):
        self.store = store
        self.prefix = f"manifest/{job_key[:32]}/"

    def _rel(self, text: str) -> str:
        return self.prefix + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() + ".json"

    def get(self, text: str) -> dict | None:
        """The record of a finished document with this text, or None."""
        try:
            data = self.store.read_object(self._rel(text), MAX_RECORD_BYTES)
        except (OSError, KVCodecError):
            return None
        if data is None:
            return None
        try:
            record = loads_json(data)
        except ValueError:  # damaged: the document is simply not done
            return None
        if not isinstance(record, dict) or not all(  # counts the job's report adds up
                is_int(record.get(k, 0), 0) for k in ("tokens", "windows", "chunks")):
            return None
        return record

    def put(self, text: str, record: dict) -> None:
        self.store.write_object(self._rel(text), json.dumps(record, sort_keys=True).encode())
