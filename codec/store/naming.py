"""What every store backend shares: which fsspec protocols are object stores, the
temp names writers use (and readers skip), and one-line error text."""
from __future__ import annotations

import uuid

# fsspec protocols whose writes are single atomic PUTs (no rename, no folders).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl",
                           "oci", "oss", "memory"})


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def temp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


# Temp files older than this were left by writers killed mid-write (a live write holds
# its temp for milliseconds); sweep() removes them.
STALE_TEMP_S = 600.0


def is_temp(rel: str) -> bool:
    """A writer's temp file, or a file a quarantining reader holds for a moment (its
    ``.hold``, left behind only if that reader was killed then)."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith((".tmp", ".hold"))
