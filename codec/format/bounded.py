"""A file's zstd sections: written at one level (:func:`zstd`), read with bounded
decompression (what a crafted frame can make a reader allocate is capped, whatever the
frame declares)."""
from __future__ import annotations

import threading

import zstandard

from ..errors import CorruptError
from .container import Reader


# Level 12 is within 0.05% of 19 on the tables and 7x faster to write.
ZSTD_LEVEL = 12


def zstd(data: bytes) -> bytes:
    """``data`` as one checksummed zstd frame, as kvcodec writes its sections."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(data)


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (making one costs more than a small section's
    decompression; one is not to be shared between threads)."""
    d = getattr(_LOCAL, "d", None)
    if d is None:
        d = _LOCAL.d = zstandard.ZstdDecompressor()
    return d


def unzstd(data: bytes, limit: int, what: str) -> bytes:
    """The contents of the zstd frame ``data``, at most ``limit`` bytes: decompressed as
    a stream, so a frame that declares (or expands to) more never makes this allocate
    more than ``limit`` plus one step. CorruptError (naming ``what``) past the limit or
    on a damaged frame (its checksum is checked at its end)."""
    out = bytearray()
    try:
        with _decompressor().stream_reader(data, read_across_frames=False) as r:
            while True:
                block = r.read(min(1 << 20, limit + 1 - len(out)))
                if not block:
                    break
                out += block
                if len(out) > limit:
                    raise CorruptError(f"{what} holds more than the {limit} bytes it may")
    except zstandard.ZstdError as exc:
        raise CorruptError(f"{what} does not decompress: {exc}") from None
    return bytes(out)


# What a section's zstd frame may expand to beyond a floor, per compressed byte. The
# files kvcodec writes stay far below it (tables of a lossless file ~90x; a kept bitmap,
# ~750x for a streaming policy, is bounded by the index instead); a crafted frame of
# zeros expands ~30000x. With it, what a file can make a reader allocate is proportional
# to the file's size.
ZSTD_FLOOR = 8 << 20
ZSTD_RATIO = 1024


def read_zstd(reader: Reader, section: str, expected: int, exact: bool = True,
              budget: int | None = None) -> bytes:
    """A zstd section's contents: exactly ``expected`` bytes, or at most that many with
    ``exact=False``. Never more than ``budget`` bytes are allocated, whatever the frame
    declares (default: :data:`ZSTD_FLOOR` + :data:`ZSTD_RATIO` x its compressed size); a
    section that must hold more than its budget is refused before it is decompressed."""
    what = f"{reader.name}: section {section!r}"
    data = reader.read_section(section)
    if budget is None:
        budget = ZSTD_FLOOR + ZSTD_RATIO * len(data)
    if exact and expected > budget:
        raise CorruptError(f"{what} must hold {expected} bytes, more than its {len(data)} "
                           "compressed bytes can")
    out = unzstd(data, max(min(expected, budget), 0), what)
    if exact and len(out) != expected:
        raise CorruptError(f"{what} holds {len(out)} bytes, expected {expected}")
    return out
