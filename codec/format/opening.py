"""Opening .kvc files: :func:`open` turns a path, bytes or a file object (seekable, or a
stream read as it arrives) into a :class:`~.reader.KVCFile`; :func:`decode` decodes one
whole."""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import torch

from ..core.kvcache import KVCache
from ..core.paths import open_readable
from ..errors import AccessError, KVCodecError
from .container import Reader, StreamBuffer
from .reader import KVCFile


def decode(source, *, dtype: torch.dtype | None = None, threads: int = 0) -> KVCache:
    """Decode a whole .kvc file (path, bytes or binary file object) into a :class:`KVCache`."""
    with open(source) as f:
        return f.decode(dtype=dtype, threads=threads)


def open(source, *, tables=None, name: str = "<bytes>") -> "KVCFile":  # noqa: A001
    """Open a .kvc file lazily for random access by chunk and layer.

    ``source`` is a path, bytes, a seekable binary file object, or any readable stream
    (a socket file, a pipe, a rate-limited reader): with a stream, the header is parsed
    as soon as it arrives and chunks decode while later bytes are still in flight
    (see :meth:`KVCFile.iter_chunks`). ``tables``: for a store entry coded with its
    store's shared tables (format v6), a callable from their digest to the
    :class:`~kvcodec.format.shared.SharedTables` (:meth:`ChunkStore.open_entry` passes
    the store's). ``name``: what messages call a file given as bytes (read in place).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            f = open_readable(path)
        except OSError as exc:
            raise AccessError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a pipe: read as a stream
                return KVCFile(Reader(StreamBuffer(f), str(path)), tables)
            return KVCFile(Reader(f, str(path)), tables)
        except BaseException:
            f.close()
            raise
    if isinstance(source, (bytes, bytearray, memoryview)):
        return KVCFile(Reader(source, name), tables)
    if isinstance(source, io.TextIOBase):  # its str broke the magic check (a TypeError)
        raise KVCodecError("a .kvc file is binary: open it with mode 'rb'")
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        seekable = getattr(source, "seekable", None)
        if hasattr(source, "seek") and (seekable is None or seekable()):
            return KVCFile(Reader(source, name), tables)
        return KVCFile(Reader(StreamBuffer(source), name), tables)
    raise KVCodecError(f"cannot open a {type(source).__name__}; give a path, bytes or a "
                       "readable (seekable or streaming) file object")
