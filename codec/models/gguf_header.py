"""A GGUF file's header, read within bounds before transformers is given the file.

transformers' GGUF loader trusts the header: a string or an array whose length runs past
the end of the file is cut to what is there, and a file with no tensors, or with fewer
blocks than its metadata says, becomes a model of the architecture's default size with
random weights (a 69-byte file that names ``llama`` asked for a 7B-parameter float32
model: ~27 GB allocated and initialized before any error). :func:`read_header` checks
what the format bounds (ggml's ``docs/gguf.md``): version 2 or 3, every count and length
within the file, known value and tensor types, at most 4 dimensions, each tensor's data
inside the data section at the file's alignment. :func:`check_model` checks that the file
holds the model its metadata describes: the token embedding and a tensor for each of
``{arch}.block_count`` blocks. Either raises :class:`BackendError`, after work and
memory proportional to the header's size (the vocabulary's strings are stepped over,
not kept).
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 2      # an array of arrays at most (none of llama.cpp's keys nests deeper)
_MAX_DIMS = 4         # GGML_MAX_DIMS
_MAX_NAME = 1 << 16   # a key's or a tensor's name, bytes
_ALIGNMENT = 32       # GGUF_DEFAULT_ALIGNMENT, unless general.alignment says otherwise
_BLOCK = re.compile(r"blk\.(\d{1,9})\.")


@dataclass
class Header:
    """The scalar and string metadata (arrays are checked and skipped) and every tensor's
    name -> (shape, ggml type, offset in the data section)."""
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)


class _Reader:
    def __init__(self, buf, path: Path):
        self.buf, self.size, self.pos, self.path = buf, len(buf), 0, path

    def fail(self, what: str):
        raise BackendError(f"{self.path.name} is not a readable GGUF file ({what} at byte "
                           f"{self.pos}); it may be truncated or damaged")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if n > self.size - self.pos:
            self.fail(f"{what} past the end of the file")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, what: str, least: int) -> int:
        """A length or count whose items take at least ``least`` bytes each."""
        n = self.unpack("<Q", what)
        if n > (self.size - self.pos) // least:
            self.fail(f"{what} {n} does not fit in the file")
        return n

    def string(self, what: str, limit: int | None = None, keep: bool = True):
        n = self.count(f"{what}'s length", 1)
        if limit is not None and n > limit:
            self.fail(f"{what} of {n} bytes")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start:self.pos]).decode("utf-8", "replace") if keep else None

    def value(self, kind: int, what: str, depth: int = 0, keep: bool = True):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what, keep=keep)
        if kind != _ARRAY:
            self.fail(f"{what} of unknown type {kind}")
        if depth >= _MAX_NESTING:
            self.fail(f"{what}: arrays nested deeper than {_MAX_NESTING}")
        item = self.unpack("<I", f"{what}'s item type")
        least = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8 if item == _STRING \
            else 12
        n = self.count(f"{what}'s item count", least)
        if item in _SCALARS:  # stepped over whole
            self.pos += n * least
            return None
        for _ in range(n):
            self.value(item, what, depth + 1, keep=False)
        return None


def read_header(path: Path) -> Header:
    """The header of the GGUF file ``path``, every bound checked (see the module)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not os.fstat(f.fileno()).st_size:  # nothing to map; refused as not GGUF
                return parse_header(b"", path)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return parse_header(buf, path)
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_header(buf, path: Path = Path("<bytes>")) -> Header:
    """:func:`read_header` of a GGUF file's bytes (``bytes``, ``mmap``), named ``path``
    in errors."""
    if bytes(buf[:4]) != b"GGUF":
        raise BackendError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    r = _Reader(buf, path)
    r.pos = 4
    version = r.unpack("<I", "version")
    if version not in (2, 3):
        r.fail(f"version {version}; kvcodec reads GGUF versions 2 and 3")
    n_tensors = r.count("tensor count", 8 + 4 + 8 + 4 + 8)
    n_kv = r.count("metadata count", 8 + 4 + 1)
    head = Header(version)
    for _ in range(n_kv):
        key = r.string("metadata key", _MAX_NAME)
        value = r.value(r.unpack("<I", f"{key}'s type"), key)
        if value is not None:
            head.metadata[key] = value
    for _ in range(n_tensors):
        name = r.string("tensor name", _MAX_NAME)
        dims = r.unpack("<I", f"{name}'s dimension count")
        if not 1 <= dims <= _MAX_DIMS:
            r.fail(f"tensor {name} of {dims} dimensions")
        shape = tuple(r.unpack("<Q", f"{name}'s shape") for _ in range(dims))
        kind = r.unpack("<I", f"{name}'s type")
        offset = r.unpack("<Q", f"{name}'s offset")
        if kind not in sizes:
            r.fail(f"tensor {name} of unknown type {kind}")
        if name in head.tensors:
            r.fail(f"tensor {name} twice")
        head.tensors[name] = (shape, kind, offset)
    align = head.metadata.get("general.alignment", _ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        r.fail(f"general.alignment {align!r} (a power of two)")
    data = -(-r.pos // align) * align
    for name, (shape, kind, offset) in head.tensors.items():
        block, nbytes = sizes[kind]
        elements = 1
        for d in shape:
            elements *= d
        if shape[0] % block or offset % align or \
                offset + elements // block * nbytes > r.size - data:
            r.fail(f"tensor {name} ({shape}, type {kind}) at data offset {offset}: outside "
                   "the file or not aligned")
    return head


def check_model(head: Header, path: Path) -> None:
    """The tensors a model of the file's own metadata needs are there (not random-filled
    by transformers at its default size)."""
    arch = head.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise BackendError(f"{path.name} names no architecture (general.architecture)")
    blocks = head.metadata.get(f"{arch}.block_count")
    if not isinstance(blocks, int) or blocks < 1:
        raise BackendError(f"{path.name} gives no block count ({arch}.block_count)")
    # Block numbers of at most 9 digits (int() refuses a name's 5,000 digits with a
    # ValueError), and at most one block per tensor: a count past that is missing blocks,
    # found without walking it (a crafted count of 620M made a list of 620M numbers).
    have = {int(m.group(1)) for m in map(_BLOCK.match, head.tensors) if m}
    missing = [i for i in range(min(blocks, len(head.tensors))) if i not in have]
    if blocks > len(head.tensors):
        missing.append(len(head.tensors))
    if "token_embd.weight" not in head.tensors:
        what = "token_embd.weight"
    elif missing:
        what = (f"block{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:5]))}"
                + (" ..." if len(missing) > 5 else ""))
    else:
        return
    raise BackendError(f"{path.name} lacks the tensors of {what} (of {blocks} blocks and "
                       f"{len(head.tensors)} tensors): not a whole model")
