"""Compressed corpus files, read as streams: :func:`open_stream` gives the decompressed
bytes of a text or JSONL input (buffered, iterable by line), for ``.gz``, ``.bz2``,
``.xz`` / ``.lzma`` and ``.zst``.

Damaged data and unreadable files are told apart. The decompressors report damaged or
truncated data with their own exceptions (:data:`DAMAGED`; bz2 uses a plain OSError), and
the corpus skips the rest of such a file. A failure to read the file itself (a disk or
network error, a remote filesystem's missing credentials) is raised as
:class:`ReadError` by the raw source under the decompressor, so it is never taken for
damage: :meth:`ReadError.reraise` gives the error that stops the job.

zstd is decoded here rather than by ``zstandard``'s ``stream_reader``, which has no
``readline`` and, given a stream cut inside a frame, just ends early.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from contextlib import contextmanager

import zstandard

from ..errors import BackendError, KVCodecError

# fsspec's names of the compressions read here (fsspec.utils.infer_compression).
COMPRESSIONS = frozenset({"gzip", "bz2", "xz", "lzma", "zstd"})
# What the decompressors raise on damaged or truncated data.
DAMAGED = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
ZSTD_STEP = 1 << 10       # compressed bytes decoded at a time: bounds one step's output
BUFFER = 1 << 16


class ReadError(Exception):
    """An input file could not be read (as opposed to holding damaged data)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error

    def reraise(self, source: str) -> Exception:
        """The error a job stops with: the OSError or KVCodecError itself, or a
        BackendError naming ``source`` for another error of its filesystem."""
        err = self.error
        if isinstance(err, (OSError, KVCodecError)):
            return err
        lines = str(err).strip().splitlines()
        return BackendError(f"cannot read {source}: {type(err).__name__}: "
                            f"{lines[0] if lines else ''}".rstrip(": "))


@contextmanager
def open_stream(fs, path: str, compression: str | None):
    """The decompressed bytes of ``path`` on ``fs`` (a buffered reader). Reading the
    file itself fails with :class:`ReadError`; damaged data with one of :data:`DAMAGED`."""
    try:
        raw = fs.open(path, "rb")
    except Exception as exc:  # noqa: BLE001 - told apart from damaged data
        raise ReadError(exc) from exc
    try:
        src = _Source(raw)
        if compression == "gzip":
            yield gzip.GzipFile(fileobj=src, mode="rb")
        elif compression == "bz2":
            yield bz2.BZ2File(src)
        elif compression in ("xz", "lzma"):
            yield lzma.LZMAFile(src)
        elif compression == "zstd":
            yield io.BufferedReader(_ZstdReader(src), BUFFER)
        else:
            yield io.BufferedReader(src, BUFFER)
    finally:
        raw.close()


class _Source(io.RawIOBase):
    """The raw bytes of a file, under a decompressor: a read that fails raises
    :class:`ReadError`."""

    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def _read(self, *n) -> bytes:
        try:
            return self._f.read(*n)
        except Exception as exc:  # noqa: BLE001 - told apart from damaged data
            raise ReadError(exc) from exc

    def readinto(self, b) -> int:
        data = self._read(len(b))
        b[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:  # a text file read whole: one read, not 8 KiB at a time
        return self._read()


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd stream of one or more frames; input that ends
    inside a frame raises EOFError. Each step decodes at most ``ZSTD_STEP`` compressed
    bytes, so a small file cannot expand all at once."""

    def __init__(self, src):
        self._src, self._dctx = src, zstandard.ZstdDecompressor()
        self._frame = None            # decompressor of the frame being read
        self._in, self._at = b"", 0   # compressed bytes read and not yet decoded
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._out):
            if not self._step():
                return 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _step(self) -> bool:
        """Decode the next piece of input; False at the end of the last frame."""
        if self._at == len(self._in):
            self._in, self._at = self._src.read(BUFFER), 0
            if not self._in:
                if self._frame is not None:
                    raise EOFError("the zstd stream ends inside a frame (truncated file)")
                return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        piece = self._in[self._at:self._at + ZSTD_STEP]
        self._at += len(piece)
        self._out, self._pos = self._frame.decompress(piece), 0
        if self._frame.eof:  # the frame ended inside this piece: the rest starts the next
            self._in, self._at = self._frame.unused_data + self._in[self._at:], 0
            self._frame = None
        return True
