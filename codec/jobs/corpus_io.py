"""How the corpus reader (:mod:`.corpus`) reads its files' bytes: zstd and bz2 streams
as binary files that can be read by lines, which errors mean damaged compressed data
(a skip) and which an I/O failure (raised), and the file a Parquet reader reads, whose
I/O failures are told apart from pyarrow's own errors about the data.

May import nothing of kvcodec.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib

import zstandard


class DamagedStream(Exception):
    """A zstd or bz2 stream that does not decompress (gzip and xz raise their own)."""


# Damaged compressed data: the file is skipped rather than ending the job.
DECOMPRESS_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError, DamagedStream)


class Decompressing(io.RawIOBase):
    """A zstd or bz2 file (one or more frames/streams) as a readable binary file.

    fsspec's own readers do not serve here: zstd's cannot be read by lines (JSONL) and
    returns a truncated frame's partial contents as if complete, bz2's raises a bare
    OSError on damaged data, which reads like an I/O failure. Here damage is a
    :class:`DamagedStream` and a truncated stream an EOFError, as gzip and xz have them,
    while errors of the underlying file pass through as they are."""

    CODECS = {"zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
              "bz2": bz2.BZ2Decompressor}
    STEP = 1 << 12  # compressed bytes fed at a time (bounds what one step expands to)

    def __init__(self, raw, codec: str):
        self._raw, self._new = raw, self.CODECS[codec]
        self._codec = codec
        self._obj = None           # the current frame's decompressor
        self._out, self._at = b"", 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._at == len(self._out) and not self._done:
            self._step()
        n = min(len(b), len(self._out) - self._at)
        b[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _step(self) -> None:
        data = self._raw.read(self.STEP)
        if not data:
            if self._obj is not None and not self._obj.eof:
                raise EOFError("Compressed file ended before the end-of-stream marker was "
                               "reached")
            self._done = True
            return
        out = []
        while data:
            if self._obj is None or self._obj.eof:
                self._obj = self._new()
            try:
                out.append(self._obj.decompress(data))
            except (zstandard.ZstdError, OSError, ValueError) as exc:
                raise DamagedStream(f"{self._codec}: {exc}") from None
            data = self._obj.unused_data if self._obj.eof else b""
        self._out, self._at = b"".join(out), 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class SourceError(Exception):
    """An OSError of the file pyarrow reads, carried past pyarrow, which raises OSError
    for damaged Parquet data too."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class ParquetSource:
    """The file a ParquetFile reads, its I/O failures wrapped in :class:`SourceError`
    (pyarrow re-raises a Python exception of the file as it is), so that they still raise
    while pyarrow's own OSErrors about the data make the file a Skipped."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def _call(self, method, *args):
        try:
            return method(*args)
        except DECOMPRESS_ERRORS:
            raise
        except OSError as exc:
            raise SourceError(exc) from exc

    def read(self, *args):
        return self._call(self._f.read, *args)

    def readinto(self, *args):
        return self._call(self._f.readinto, *args)

    def seek(self, *args):
        return self._call(self._f.seek, *args)

    def tell(self):
        return self._call(self._f.tell)
