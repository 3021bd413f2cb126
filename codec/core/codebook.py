"""Codebooks: the decorrelating bases of a model and config, one object shared by files.

A ``klt`` stream (:mod:`kvcodec.core.klt`) codes each KV head's vectors in the
eigenbasis of their covariance (the KLT/PCA), fitted once on calibration text. The bases
are ``heads x head_dim^2`` numbers per layer and kind (1.5 MB for SmolLM2-135M in
float16), too many to carry in every file, so they live in one :class:`Codebook`,
addressed by the SHA-256 of its bytes (:attr:`Codebook.digest`); a config's quantizer
names it (``"basis": {"codebook": digest, "index": i}``) and a file records the config.

Where a reader finds one (:func:`get`): the in-process cache (bounded), the codebooks a
file embeds (registered when it is opened), then ``codebooks/`` in the user config
directory (``kvcodec calibrate`` writes there) and in the shipped configs; a store
loads its own into the cache (:meth:`kvcodec.store.ChunkStore.load_codebooks`). A
codebook that is nowhere is a :class:`~kvcodec.errors.CodebookError`; bytes that do not hash to the name asked for,
or that do not parse, a :class:`~kvcodec.errors.CorruptError`.

Serialized form: ``MAGIC``, little-endian u32 header length, u32 CRC-32 of the header,
the JSON header (``{"version": 1, "count", "heads", "head_dim", "note"}``), then
``count x heads x head_dim x head_dim`` float16 values (basis ``i``, head ``h``: a
``head_dim x head_dim`` matrix whose columns are the components, largest variance
first), then a u32 CRC-32 of everything before it. Every size is bounded before
anything is allocated.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import CodebookError, CorruptError
from .paths import atomic_write, config_dirs, loads_json, open_regular, user_config_dir

MAGIC = b"KVCBOOK1"
SUFFIX = ".kvcb"
MAX_HEADER = 1 << 16
MAX_COUNT = 4096
MAX_HEADS = 256
MAX_HEAD_DIM = 1024
MAX_BYTES = 1 << 30
CACHED = 8  # codebooks kept in the in-process cache
_HEX = set("0123456789abcdef")


def max_bytes(count: int, heads: int, head_dim: int) -> int:
    """The most bytes a codebook of ``count`` bases of ``heads`` heads can take."""
    return min(MAX_BYTES, len(MAGIC) + 8 + MAX_HEADER + 2 * count * heads * head_dim ** 2 + 4)


def valid_digest(digest) -> bool:
    return isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX


class Codebook:
    """Bases ``[count, heads, head_dim, head_dim]`` (float16 values, read as float32)."""

    def __init__(self, bases: np.ndarray, note: str = ""):
        bases = np.asarray(bases)
        if bases.ndim != 4 or bases.shape[2] != bases.shape[3]:
            raise CorruptError(f"codebook bases must be [count, heads, d, d], got {bases.shape}")
        count, heads, d, _ = bases.shape
        if not (0 < count <= MAX_COUNT and 0 < heads <= MAX_HEADS and 0 < d <= MAX_HEAD_DIM):
            raise CorruptError(f"codebook of {count} bases, {heads} heads, head_dim {d} is "
                               f"out of bounds")
        half = bases.astype(np.float16)
        if not np.isfinite(half).all():
            raise CorruptError("codebook holds values that are not finite in float16")
        self.bases = half.astype(np.float32)
        self.bases.flags.writeable = False
        self.note = str(note)[:1000]
        self._bytes = None
        self._digest = None

    @property
    def count(self) -> int:
        return self.bases.shape[0]

    @property
    def heads(self) -> int:
        return self.bases.shape[1]

    @property
    def head_dim(self) -> int:
        return self.bases.shape[2]

    def basis(self, index: int) -> np.ndarray:
        """Basis ``index``: float32 ``[heads, head_dim, head_dim]`` (read-only)."""
        if not 0 <= index < self.count:
            raise CodebookError(f"codebook {self.digest[:16]} has {self.count} bases; a "
                                f"config asks for basis {index}")
        return self.bases[index]

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            head = json.dumps({"version": 1, "count": self.count, "heads": self.heads,
                               "head_dim": self.head_dim, "note": self.note},
                              sort_keys=True).encode()
            body = (MAGIC + struct.pack("<II", len(head), zlib.crc32(head)) + head
                    + self.bases.astype("<f2").tobytes())
            self._bytes = body + struct.pack("<I", zlib.crc32(body))
        return self._bytes

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`to_bytes`: the name configs and files use."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._digest

    @classmethod
    def from_bytes(cls, data, name: str = "codebook") -> "Codebook":
        """Parse untrusted bytes; any mismatch is a :class:`CorruptError`."""
        data = bytes(data)
        if len(data) > MAX_BYTES:
            raise CorruptError(f"{name}: {len(data)} bytes, more than a codebook may hold")
        if len(data) < len(MAGIC) + 12 or data[:len(MAGIC)] != MAGIC:
            raise CorruptError(f"{name}: not a kvcodec codebook (bad magic)")
        hlen, hcrc = struct.unpack_from("<II", data, len(MAGIC))
        start = len(MAGIC) + 8
        if hlen > MAX_HEADER or start + hlen + 4 > len(data):
            raise CorruptError(f"{name}: header length {hlen} does not fit the data")
        head = data[start:start + hlen]
        if zlib.crc32(head) != hcrc:
            raise CorruptError(f"{name}: header checksum mismatch")
        try:
            h = loads_json(head)
            count, heads, d = (int(h[k]) for k in ("count", "heads", "head_dim"))
            if h.get("version") != 1 or not isinstance(h, dict):
                raise ValueError(f"version {h.get('version')!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptError(f"{name}: invalid header: {exc}") from None
        if not (0 < count <= MAX_COUNT and 0 < heads <= MAX_HEADS and 0 < d <= MAX_HEAD_DIM):
            raise CorruptError(f"{name}: {count} bases, {heads} heads, head_dim {d}: out of "
                               "bounds")
        want = start + hlen + 2 * count * heads * d * d + 4
        if len(data) != want:
            raise CorruptError(f"{name}: {len(data)} bytes, expected {want}")
        if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
            raise CorruptError(f"{name}: checksum mismatch")
        arr = np.frombuffer(data, dtype="<f2", count=count * heads * d * d, offset=start + hlen)
        book = cls(arr.reshape(count, heads, d, d), note=h.get("note", ""))
        book._bytes = data
        return book


_lock = threading.Lock()
_cache: OrderedDict = OrderedDict()


def register(book: Codebook) -> Codebook:
    """Keep ``book`` in the in-process cache (the last :data:`CACHED` used)."""
    with _lock:
        _cache[book.digest] = book
        _cache.move_to_end(book.digest)
        while len(_cache) > CACHED:
            _cache.popitem(last=False)
    return book


def clear() -> None:
    """Forget every codebook this process has loaded (the next :func:`get` looks again)."""
    with _lock:
        _cache.clear()


def register_bytes(data, digest: str | None = None, name: str = "codebook") -> Codebook:
    """Parse and register serialized bytes; with ``digest``, they must hash to it."""
    if digest is not None and hashlib.sha256(bytes(data)).hexdigest() != digest:
        raise CorruptError(f"{name}: its bytes do not hash to {digest[:16]}, the codebook "
                           "it names")
    return register(Codebook.from_bytes(data, name))


def search_dirs() -> list[Path]:
    """Folders holding ``<digest>.kvcb`` files: the user's (where ``calibrate`` writes)
    first, then the shipped configs'."""
    return [user_config_dir() / "codebooks"] + [d / "codebooks" for d in config_dirs()]


def loaded(digest: str) -> Codebook | None:
    """The codebook ``digest`` if this process holds it (no folder is looked in)."""
    with _lock:
        return _cache.get(digest)


def get(digest: str) -> Codebook:
    """The codebook named ``digest`` (see the module docstring for where it looks)."""
    if not valid_digest(digest):
        raise CorruptError(f"{digest!r:.80} is not a codebook name (64 hex digits)")
    with _lock:
        book = _cache.get(digest)
        if book is not None:
            _cache.move_to_end(digest)
            return book
    dirs = search_dirs()
    for d in dirs:
        path = d / f"{digest}{SUFFIX}"
        try:
            with open_regular(path) as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_BYTES:
                    raise CorruptError(f"{path}: larger than a codebook may be")
                data = fh.read(size + 1)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CodebookError(f"cannot read codebook {path}: {exc}") from None
        return register_bytes(data, digest, str(path))
    raise CodebookError(
        f"codebook {digest[:16]}... is not here (looked in {', '.join(map(str, dirs))}): "
        f"copy its {SUFFIX} file into one of those folders, or encode with "
        "embed_codebook=True (--embed-codebook) for files that carry it")


def save(book: Codebook, folder=None) -> Path:
    """Write ``book`` as ``<digest>.kvcb`` into ``folder`` (default: the user's codebook
    folder), atomically; an existing file of that name is left alone."""
    folder = Path(folder) if folder is not None else search_dirs()[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{book.digest}{SUFFIX}"
    if not path.exists():
        atomic_write(path, book.to_bytes())
    register(book)
    return path
