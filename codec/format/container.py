"""The .kvc container: safe to open from an untrusted source.

Layout (all integers little-endian)::

    0   8 bytes   magic  b"\\x89KVC\\r\\n\\x1a\\n"
    8   u32       format version (readers refuse versions they do not know)
    12  u32       header length H (<= MAX_HEADER_BYTES)
    16  u32       CRC-32 of the header bytes
    20  u32       reserved, 0
    24  H bytes   UTF-8 JSON header
        zero padding to a multiple of 64 -> data start
        sections, each starting at an 8-byte aligned offset relative to data start,
        zero padding between them

The header lists its sections as ``{"name", "offset", "length", "crc32"}``. Offsets must
tile the data exactly (each one the previous end rounded up to 8, the first 0, the last
end rounded up to 8 equal to ``data_length``), and every size is checked against hard caps
before anything is allocated. Like safetensors, no code is ever loaded (no pickle); unlike
safetensors, every section is checksummed. The ``payload`` section has ``crc32: null``
because each of its items carries its own CRC in the index, so one chunk can be read and
verified without reading the rest.
"""
from __future__ import annotations

import io
import json
import struct
from contextlib import contextmanager

import zstandard

from ..core.checks import is_int
from ..core.paths import atomic_write, loads_json  # noqa: F401 (atomic_write: every writer's)
from ..core.tables import native
from ..errors import CorruptError, FormatError, KVCodecError, TruncatedError, VersionError

MAGIC = b"\x89KVC\r\n\x1a\n"
# v3: the header records the model's RoPE per layer and each layer's token span
# (sliding windows); v2 files (one default-RoPE theta, every layer full) still read.
# v4: the header may say ``"evicted": true`` (per-head kept tokens, a ``kept`` section,
# streams per head; see :mod:`kvcodec.format.kept`). Dense caches are still written as
# v3, so that older readers open them.
# v5: a quantizer may say ``"center": true`` (per-file channel means,
# :class:`kvcodec.core.quant.Uniform`); only files that use it are written as v5, so an
# older reader refuses them instead of decoding them without their means.
# v6: the header may say ``"shared_tables": "<digest>"``: the file's streams are coded
# with probability tables kept once by its store (:mod:`kvcodec.format.shared`), not in
# its tables section; only store entries coded that way are written as v6.
FORMAT_VERSION = 7
TRANSFORM_VERSION = 7
SHARED_VERSION = 6
CENTERED_VERSION = 5
EVICTED_VERSION = 4
DENSE_VERSION = 3
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7)
PREAMBLE = struct.Struct("<8sIIII")
MAX_HEADER_BYTES = 64 << 20
DATA_ALIGN = 64
SECTION_ALIGN = 8
MAX_DATA_BYTES = 1 << 40


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def crc32(data) -> int:
    """``zlib.crc32(data)``, by the native coder (several times faster: folded by
    carry-less multiplication where the CPU has it)."""
    return native().crc32(data)


@contextmanager
def untrusted(name: str):
    """Inside, whatever a malformed file can make parsing raise (wrong JSON types, a
    nesting deeper than Python's recursion, sizes that overflow, a damaged frame) is a
    :class:`CorruptError` naming ``name``: a reader raises only :class:`KVCodecError`
    for what is in the file, and ``OSError`` for what is around it."""
    try:
        yield
    except (KVCodecError, OSError):
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
            OverflowError, MemoryError, UnicodeError, zstandard.ZstdError) as exc:
        raise CorruptError(f"{name}: malformed file ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None


def build(header: dict, sections: list[tuple[str, bytes, bool]],
          version: int = FORMAT_VERSION) -> bytes:
    """Serialize a header and ``(name, data, checksummed)`` sections into .kvc bytes of
    format ``version``."""
    table, offset = [], 0
    for name, data, checked in sections:
        table.append({"name": name, "offset": offset, "length": len(data),
                      "crc32": crc32(data) if checked else None})
        offset = _align(offset + len(data), SECTION_ALIGN)
    header = dict(header, sections=table, data_length=offset)
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    if len(hbytes) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(hbytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte cap")
    out = io.BytesIO()
    out.write(PREAMBLE.pack(MAGIC, version, len(hbytes), crc32(hbytes), 0))
    out.write(hbytes)
    out.write(b"\0" * (_align(out.tell(), DATA_ALIGN) - out.tell()))
    for _, data, _ in sections:
        out.write(b"\0" * (_align(out.tell(), SECTION_ALIGN) - out.tell()))
        out.write(data)
    out.write(b"\0" * (_align(out.tell(), SECTION_ALIGN) - out.tell()))
    return out.getvalue()


class StreamBuffer:
    """Offset reads over a forward-only readable (a socket file, a pipe, a rate-limited
    reader): bytes are pulled from ``raw.read`` only as far as a read needs, so parsing and
    decoding start while later bytes are still arriving."""

    def __init__(self, raw, block: int = 1 << 16):
        self.raw, self.block = raw, block
        self.buf = bytearray()
        self.eof = False

    def fill_to(self, n: int) -> int:
        """Read until ``n`` bytes are buffered or the stream ends; return what is buffered."""
        while len(self.buf) < n and not self.eof:
            # At most 1 MiB per read: a buffered reader allocates what it is asked for
            # before the bytes exist, and ``n`` comes from a header the peer wrote.
            data = self.raw.read(min(max(n - len(self.buf), self.block), 1 << 20))
            if not data:
                self.eof = True
            else:
                self.buf += data
        return len(self.buf)

    def close(self):
        close = getattr(self.raw, "close", None)
        if close:
            close()


def preamble(raw: bytes, name: str) -> tuple[int, int, int]:
    """``(version, header length, header CRC)`` of a file's first ``PREAMBLE.size``
    bytes: FormatError for another kind of file, VersionError for a format this kvcodec
    does not read, CorruptError for a header over the cap."""
    magic, version, hlen, hcrc, _ = PREAMBLE.unpack(bytes(raw))
    if magic != MAGIC:
        raise FormatError(f"{name} is not a .kvc file (bad magic)")
    if version not in READABLE_VERSIONS:
        raise VersionError(
            f"{name} has .kvc format version {version}; this kvcodec reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade kvcodec to read newer files)")
    if hlen > MAX_HEADER_BYTES:
        raise CorruptError(f"{name}: header claims {hlen} bytes, over the "
                           f"{MAX_HEADER_BYTES}-byte cap")
    return version, hlen, hcrc


def parse_header(hbytes, hcrc: int, name: str) -> dict:
    """The header JSON object of ``hbytes``, checked against its CRC (CorruptError)."""
    if crc32(hbytes) != hcrc:
        raise CorruptError(f"{name}: header checksum mismatch; the file is damaged")
    try:
        header = loads_json(bytes(hbytes))
    except ValueError:
        raise CorruptError(f"{name}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CorruptError(f"{name}: header is not a JSON object")
    return header


class Reader:
    """Random-access reader of a .kvc file held in bytes, a seekable file object, or a
    :class:`StreamBuffer`.

    Parsing checks the preamble, header checksum and section tiling; section contents
    are read (and checksummed) on demand. For a stream, sizes are checked as bytes
    arrive: a stream that ends early raises :class:`TruncatedError` at the first read
    that needs the missing bytes.
    """

    def __init__(self, source, name: str = "<bytes>"):
        self.name = name
        self._stream = isinstance(source, StreamBuffer)
        # Bytes are read in place: the payload as views of them (read_range's ``view``).
        held = isinstance(source, (bytes, bytearray, memoryview))
        self._mem = memoryview(bytes(source)) if held else None
        self._f = None if held else source
        if self._stream:
            self.size = self._f.fill_to(PREAMBLE.size)
        elif self._mem is not None:
            self.size = len(self._mem)
        else:
            self._f.seek(0, io.SEEK_END)
            self.size = self._f.tell()
        self.header = self._read_header()
        self.sections = self._check_sections()

    @property
    def streaming(self) -> bool:
        return self._stream

    def close(self):
        if self._f is not None:
            self._f.close()
        else:  # reads fail from now on; views already handed out stay valid
            self._mem = self._mem[:0]

    def _read_at(self, offset: int, length: int, view: bool = False) -> bytes:
        if self._stream:
            have = self._f.fill_to(offset + length)
            if offset < 0 or length < 0 or have < offset + length:
                raise TruncatedError(f"{self.name}: the stream ended at byte {have} but byte "
                                     f"{offset + length} is needed; it is truncated")
            with memoryview(self._f.buf) as buf:  # one copy (a slice would be two)
                return bytes(buf[offset:offset + length])
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TruncatedError(
                f"{self.name}: needs bytes {offset}..{offset + length} but the file has "
                f"{self.size}; it is truncated")
        if self._mem is not None:
            got = self._mem[offset:offset + length]
            if len(got) != length:
                raise ValueError("I/O operation on closed file.")
            return got if view else got.tobytes()
        self._f.seek(offset)
        data = self._f.read(length)
        if len(data) != length:
            raise TruncatedError(f"{self.name}: short read at offset {offset}; truncated file")
        return data

    def _read_header(self) -> dict:
        if self.size < PREAMBLE.size:
            if self.size and not MAGIC.startswith(self._read_at(0, min(self.size, 8))):
                raise FormatError(f"{self.name} is not a .kvc file (bad magic)")
            raise TruncatedError(f"{self.name}: only {self.size} bytes; the file is empty or "
                                 "truncated")
        version, hlen, hcrc = preamble(self._read_at(0, PREAMBLE.size), self.name)
        self.version = version
        header = parse_header(self._read_at(PREAMBLE.size, hlen), hcrc, self.name)
        self.data_start = _align(PREAMBLE.size + hlen, DATA_ALIGN)
        return header

    def _check_sections(self) -> dict:
        table = self.header.get("sections")
        data_length = self.header.get("data_length")
        if not isinstance(table, list) or not is_int(data_length, 0, MAX_DATA_BYTES):
            raise CorruptError(f"{self.name}: header lacks a valid section table")
        sections, expect = {}, 0
        for entry in table:
            if not isinstance(entry, dict):
                raise CorruptError(f"{self.name}: malformed section entry")
            name, off, length = entry.get("name"), entry.get("offset"), entry.get("length")
            crc = entry.get("crc32")
            if (not isinstance(name, str) or name in sections or not is_int(off, 0, MAX_DATA_BYTES)
                    or not is_int(length, 0, MAX_DATA_BYTES)
                    or not (crc is None or is_int(crc, 0, 0xFFFFFFFF))):
                raise CorruptError(f"{self.name}: malformed section entry {entry!r:.200}")
            if off != expect:
                raise CorruptError(
                    f"{self.name}: section {name!r} starts at {off}, expected {expect}; "
                    "sections must tile the data")
            sections[name] = (off, length, crc)
            expect = _align(off + length, SECTION_ALIGN)
        if expect != data_length:
            raise CorruptError(f"{self.name}: sections end at {expect} but data_length is {data_length}")
        if self._stream:  # sizes are checked as the bytes arrive
            self.size = self.data_start + data_length
            return sections
        have = self.size - self.data_start
        if have < data_length:
            raise TruncatedError(
                f"{self.name}: holds {max(have, 0)} data bytes of {data_length}; it is truncated")
        if have > data_length:
            raise CorruptError(f"{self.name}: {have - data_length} unexpected bytes after the data")
        return sections

    def section_bounds(self, name: str) -> tuple[int, int]:
        if name not in self.sections:
            raise CorruptError(f"{self.name}: missing section {name!r}")
        off, length, _ = self.sections[name]
        return off, length

    def fill(self, upto: int, step: int = 1 << 17) -> bool:
        """For a stream, buffer at most ``step`` more bytes toward file offset ``upto``
        (a wait of at most one step); True once they are all in or the stream has ended
        (a read then says what is missing). Other sources hold every byte: True."""
        if not self._stream:
            return True
        have = len(self._f.buf)
        if have < upto and not self._f.eof:
            have = self._f.fill_to(min(upto, have + step))
        return have >= upto or self._f.eof

    def buffered(self) -> int:
        """How many of the file's first bytes can be read without waiting: what a stream
        has delivered so far; a file's whole size."""
        return len(self._f.buf) if self._stream else self.size

    def section_offset(self, name: str) -> int:
        """File offset of section ``name``'s first byte."""
        return self.data_start + self.section_bounds(name)[0]

    def read_section(self, name: str) -> bytes:
        """Whole section contents, checksum verified."""
        off, length = self.section_bounds(name)
        data = self._read_at(self.data_start + off, length)
        crc = self.sections[name][2]
        if crc is not None and crc32(data) != crc:
            raise CorruptError(f"{self.name}: checksum mismatch in section {name!r}; damaged file")
        return data

    def read_range(self, name: str, offset: int, length: int, view: bool = False) -> bytes:
        """Bytes ``[offset, offset+length)`` of a section (caller verifies them); with
        ``view``, a memoryview of them where the file is held in bytes (no copy)."""
        off, slen = self.section_bounds(name)
        if offset < 0 or length < 0 or offset + length > slen:
            raise CorruptError(f"{self.name}: range {offset}+{length} outside section {name!r}")
        return self._read_at(self.data_start + off + offset, length, view)
