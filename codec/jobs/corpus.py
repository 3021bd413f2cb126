"""The documents a precompute job reads: files, directories, globs and fsspec URLs.

Each input is a local file, a directory (read recursively), a glob (``docs/**/*.txt``)
or an fsspec URL of any of those (``s3://bucket/corpus/*.jsonl``, ``memory://...``,
``file://...``). Files of a directory or glob are read in path order; under a directory or
the literal part of a glob, files and directories whose names start with "." are skipped
(a hidden file named directly is read). A file matched by two inputs is read once. An
input that matches no file is a ConfigError, raised by ``Corpus(...)`` before any work.

The format follows the extension (case-insensitive), after a compression suffix
(``.gz``, ``.bz2``, ``.xz``, ``.lzma``, ``.zst``) that is decompressed on the fly (a
damaged or truncated compressed file is skipped from where it breaks, like a bad row):

- ``.jsonl`` / ``.ndjson``: one JSON object per non-blank line, text in ``text_field``.
- ``.parquet``: one row per document, text in the ``text_field`` column (read in batches).
- anything else: the whole file is one UTF-8 document (a BOM is dropped).

Document ids are stable: the ``id_field`` value when one is given (a string, or an integer
turned into one), else ``<source>:<line>`` for JSONL (1-based physical line),
``<source>#<row>`` for Parquet (0-based row) and ``<source>`` for a text file. ``source``
is the absolute local path, or the URL of a remote file.

Iterating yields a ``Document`` for each usable text and a ``Skipped`` (with a one-line
reason) for each unusable row or file, so a job can record what it left out; only input
resolution, a missing pyarrow and failures to read a file (an ``OSError``, or a
:class:`BackendError` for other errors of a remote filesystem) raise. Everything streams:
no file is loaded whole except a text file, which is a single document anyway. A
document (a text file, a JSONL line) over 64 MiB is skipped, read no further than that.
"""
from __future__ import annotations

import codecs
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec.utils
from fsspec.core import has_magic
from fsspec.implementations.local import LocalFileSystem

from ..core.paths import MAX_TEXT_BYTES, is_pipe
from ..errors import BackendError, ConfigError, KVCodecError
from ..store.backends import filesystem
from .parquet import ParquetSource, SourceError, Unreadable, pylist, pyarrow_modules
from .streams import COMPRESSIONS, DAMAGED, ReadError, open_stream

_BINARY_PROBE = 8192          # a NUL byte in this many leading bytes marks a binary file
_PARQUET_BATCH_ROWS = 1024    # rows decoded at a time from a Parquet file
_PARQUET_INFLATE = 1 << 30    # a compressed Parquet file is decompressed whole: at most this
_TOO_LONG = object()          # a JSONL line over MAX_TEXT_BYTES
_SURROGATE = re.compile("[\ud800-\udfff]")
_MISSING = object()
_PIPE = ("a FIFO or socket, not a file (a corpus file may be read twice: its documents "
         "counted, then prefilled)")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a non-integer number", bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class Document:
    """A usable document: its stable id, its text exactly as stored, and its file."""
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class Skipped:
    """A row or file left out: its id (the file itself for a whole-file problem), its file
    and a one-line reason."""
    id: str
    source: str
    reason: str


@dataclass(frozen=True)
class _File:
    fs: Any
    path: str
    source: str
    kind: str                 # "jsonl", "parquet", "text" or "pipe" (skipped)
    compression: str | None

    def open(self):
        return self.fs.open(self.path, "rb", compression=self.compression)

    def stream(self):
        """The decompressed bytes of a text or JSONL file (:func:`streams.open_stream`)."""
        return open_stream(self.fs, self.path, self.compression)


class Corpus:
    """The documents of ``inputs`` (see the module docstring), in a deterministic order."""

    def __init__(self, inputs, *, text_field: str = "text", id_field: str | None = None,
                 storage_options: dict | None = None):
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        inputs = [os.fspath(i) for i in inputs]
        if not inputs:
            raise ConfigError("no corpus inputs given")
        if not text_field or id_field == "":
            raise ConfigError("the text and id field names must not be empty")
        self.text_field = text_field
        self.id_field = id_field
        self._files: list[_File] = []
        seen = set()
        for spec in inputs:
            for file in _resolve(spec, storage_options or {}):
                if file.source not in seen:
                    seen.add(file.source)
                    self._files.append(file)
        if any(f.kind == "parquet" for f in self._files):
            pyarrow_modules()  # fail now, not at the first Parquet file of a long job

    @property
    def files(self) -> list[str]:
        """The resolved input files, in iteration order."""
        return [f.source for f in self._files]

    def __iter__(self) -> Iterator[Document | Skipped]:
        for file in self._files:
            if file.kind == "jsonl":
                yield from self._read_jsonl(file)
            elif file.kind == "parquet":
                yield from self._read_parquet(file)
            elif file.kind == "pipe":
                yield Skipped(file.source, file.source, _PIPE)
            else:
                yield self._read_text(file)

    def count(self) -> int:
        """How many items (documents and skips) iterating yields: one per text file, the
        non-blank lines of JSONL files (which are read) and the row counts in Parquet
        footers."""
        total = 0
        for file in self._files:
            if file.kind == "jsonl":
                total += sum(1 for _ in _jsonl_lines(file))
            elif file.kind == "parquet":
                with self._open_parquet(file) as (pf, problem):
                    total += 1 if problem else pf.metadata.num_rows
            else:
                total += 1
        return total

    # -- formats -------------------------------------------------------------------------

    def _read_text(self, file: _File) -> Document | Skipped:
        src = file.source
        try:
            with file.stream() as f:
                data = f.read(MAX_TEXT_BYTES + 1)
        except ReadError as exc:
            raise exc.reraise(src) from None
        except DAMAGED as exc:
            return Skipped(src, src, f"cannot decompress ({_one_line(exc)})")
        if len(data) > MAX_TEXT_BYTES:  # /dev/zero, a gzip bomb: read until memory ran out
            return Skipped(src, src, _over("text"))
        nul = data.find(b"\0", 0, _BINARY_PROBE)
        if nul >= 0:
            return Skipped(src, src, f"binary file (NUL byte at offset {nul})")
        start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        try:
            text = str(memoryview(data)[start:], "utf-8")
        except UnicodeDecodeError as exc:
            return Skipped(src, src, _not_utf8(data, start + exc.start))
        if not text.strip():
            return Skipped(src, src, "empty text")
        return Document(src, text, src)

    def _read_jsonl(self, file: _File) -> Iterator[Document | Skipped]:
        for n, line in _jsonl_lines(file):
            if n is None:  # the compressed stream broke off; `line` is the reason
                yield Skipped(file.source, file.source, line)
            elif line is _TOO_LONG:
                yield Skipped(f"{file.source}:{n}", file.source, f"line {n}: {_over('line')}")
            else:
                yield self._jsonl_record(file.source, n, line)

    def _jsonl_record(self, src: str, n: int, line: bytes) -> Document | Skipped:
        where, default_id = f"line {n}", f"{src}:{n}"
        line = line.rstrip(b"\r\n")
        start = len(codecs.BOM_UTF8) if n == 1 and line.startswith(codecs.BOM_UTF8) else 0
        try:
            obj = json.loads(str(memoryview(line)[start:], "utf-8"))
        except UnicodeDecodeError as exc:
            return Skipped(default_id, src, f"{where}: {_not_utf8(line, start + exc.start)}")
        except json.JSONDecodeError as exc:
            return Skipped(default_id, src,
                           f"{where}: invalid JSON ({exc.msg.removesuffix(' at')} "
                           f"at column {exc.colno})")
        except (ValueError, RecursionError) as exc:  # a huge integer, deep nesting
            return Skipped(default_id, src, f"{where}: invalid JSON ({_one_line(exc)})")
        if not isinstance(obj, dict):
            return Skipped(default_id, src, f"{where}: not a JSON object ({_kind(obj)})")
        raw_id = obj.get(self.id_field, _MISSING) if self.id_field else _MISSING
        return self._record(src, where, default_id, obj.get(self.text_field, _MISSING), raw_id)

    @contextmanager
    def _open_parquet(self, file: _File):
        """Yield (ParquetFile, None), or (None, reason) when the file cannot be used."""
        pa, pq = pyarrow_modules()
        if file.compression:  # a Parquet reader seeks (the footer is last): decompressed
            try:              # whole, as no compressed stream can seek
                with file.stream() as f:
                    raw = io.BytesIO(f.read(_PARQUET_INFLATE + 1))
                if len(raw.getbuffer()) > _PARQUET_INFLATE:
                    yield None, (f"decompresses to over {_PARQUET_INFLATE >> 30} GiB; store "
                                 "it uncompressed (Parquet compresses its own pages)")
                    return
            except ReadError as exc:
                raise exc.reraise(file.source) from None
            except DAMAGED as exc:
                yield None, f"cannot decompress ({_one_line(exc)})"
                return
        else:
            raw = file.open()
        with raw:
            try:
                pf = pq.ParquetFile(ParquetSource(raw))
                names = pf.schema_arrow.names
                meta = pf.metadata
                groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            except SourceError as exc:  # an I/O failure
                raise exc.error from None
            # pyarrow raises OSError for a footer that does not parse, and UnicodeDecodeError
            # for column names that are not UTF-8.
            except (pa.ArrowException, OSError, ValueError) as exc:
                yield None, f"not a valid Parquet file ({_one_line(exc)})"
                return
            missing = [c for c in (self.text_field, self.id_field) if c and c not in names]
            if meta.num_rows < 0 or min(groups, default=0) < 0 or sum(groups) != meta.num_rows:
                # count() and iteration rely on the footer's row count
                yield None, (f"not a valid Parquet file (its footer states {meta.num_rows} "
                             f"rows, its row groups {sum(groups)})")
            elif missing:
                yield None, f"no column '{missing[0]}' (columns: {', '.join(names)})"
            else:
                yield pf, None

    def _read_parquet(self, file: _File) -> Iterator[Document | Skipped]:
        pa, _ = pyarrow_modules()
        src = file.source
        with self._open_parquet(file) as (pf, problem):
            if problem:
                yield Skipped(src, src, problem)
                return
            columns = list(dict.fromkeys(c for c in (self.text_field, self.id_field) if c))
            row, reason, total = 0, None, pf.metadata.num_rows
            try:
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                    texts = pylist(batch.column(self.text_field))
                    ids = (pylist(batch.column(self.id_field)) if self.id_field
                           else [_MISSING] * len(texts))
                    # Rows past the footer's count are not the file's (count() says so).
                    for text, raw_id in list(zip(texts, ids))[:max(0, total - row)]:
                        yield self._record(src, f"row {row}", f"{src}#{row}", text, raw_id)
                        row += 1
            except SourceError as exc:
                raise exc.error from None
            except (pa.ArrowException, OSError, ValueError) as exc:
                reason = f"unreadable Parquet data ({_one_line(exc)})"
            # Damaged data (an error, or columns that end early, which pyarrow can return
            # without one): the rows not read are skipped, so count() stays exact.
            reason = reason or (f"unreadable Parquet data (its columns hold {row} of the "
                                f"{total} rows its footer states)")
            for r in range(row, total):
                yield Skipped(f"{src}#{r}", src, f"row {r}: {reason}")

    def _record(self, source: str, where: str, default_id: str, text, raw_id):
        """A Document for one JSONL line or Parquet row, or a Skipped saying what is wrong."""
        doc_id, problem = default_id, None
        if self.id_field:
            name = self.id_field
            if raw_id is _MISSING:
                problem = f"no field '{name}'"
            elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                problem = _wrong_type(name, raw_id, "a string or integer")
            elif raw_id == "":
                problem = f"'{name}' is empty"
            else:
                doc_id = str(raw_id)
        if problem is None:
            name = self.text_field
            if text is _MISSING:
                problem = f"no field '{name}'"
            elif not isinstance(text, str):
                problem = _wrong_type(name, text, "a string")
            elif not text.strip():
                problem = "empty text"
            elif (m := _SURROGATE.search(text)) is not None:
                problem = (f"'{name}' has a lone surrogate (U+{ord(m.group()):04X} "
                           f"at character {m.start()})")
        if problem:
            return Skipped(doc_id, source, f"{where}: {problem}")
        return Document(doc_id, text, source)


def _resolve(spec: str, storage_options: dict) -> list[_File]:
    """The files one input names, sorted by path, hidden ones below it left out."""
    fs, path = filesystem(spec, storage_options, "corpus input")
    if has_magic(path):
        first_magic = min(path.find(c) for c in "*?[" if c in path)
        cut = path.rfind("/", 0, first_magic)
        root = path[:cut] if cut > 0 else ""
    else:
        root = path.rstrip("/")
    depth = len(root.split("/")) if root else 0

    def visible(p):
        return not any(part.startswith(".") for part in p.split("/")[depth:])

    try:
        if has_magic(path):
            matches = {p: info for p, info in fs.glob(path, detail=True).items() if visible(p)}
            paths, tops = [], []  # tops: matched directories not inside another one
            for p in sorted(matches, key=lambda p: p.split("/")):
                if matches[p].get("type") != "directory":
                    paths.append(p)
                elif not tops or not p.startswith(tops[-1] + "/"):
                    tops.append(p)
                    paths += fs.find(p)
        else:
            paths = fs.find(path) if fs.exists(path) else []
    except (OSError, KVCodecError):
        raise
    except Exception as exc:  # noqa: BLE001 - a remote filesystem's own errors (credentials...)
        raise BackendError(f"corpus input {spec}: cannot list it ({type(exc).__name__}: "
                           f"{_one_line(exc)})") from None
    paths = sorted(set(filter(visible, paths)))
    if not paths:
        raise ConfigError(f"corpus input {spec!r} matches no files")
    files = []
    for p in paths:
        compression = fsspec.utils.infer_compression(p)
        if compression not in COMPRESSIONS:
            compression = None
        name = p.lower()
        if compression:
            name = os.path.splitext(name)[0]
        ext = os.path.splitext(name)[1]
        kind = ("jsonl" if ext in (".jsonl", ".ndjson") else
                "parquet" if ext == ".parquet" else "text")
        if isinstance(fs, LocalFileSystem) and is_pipe(p):  # its open waited for a writer
            kind = "pipe"
        source = p if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(p)
        files.append(_File(fs, p, source, kind, compression))
    return files


def _jsonl_lines(file: _File):
    """(line number, bytes) of each non-blank line of a JSONL file; when its compressed
    stream is damaged, a last (None, reason). Shared by iteration and count()."""
    n = 0
    try:
        with file.stream() as f:
            while line := f.readline(MAX_TEXT_BYTES + 1):  # a line with no end filled memory
                n += 1
                if len(line) > MAX_TEXT_BYTES and not line.endswith(b"\n"):
                    while not line.endswith(b"\n") and (line := f.readline(1 << 20)):
                        pass  # the rest of the line, skipped in bounded pieces
                    yield n, _TOO_LONG
                elif line.strip():
                    yield n, line
    except ReadError as exc:
        raise exc.reraise(file.source) from None
    except DAMAGED as exc:
        yield None, f"cannot decompress after line {n} ({_one_line(exc)})"


def _over(what: str) -> str:
    return f"{what} over {MAX_TEXT_BYTES >> 20} MiB (a cache holds at most 2**24 tokens)"


def _not_utf8(data: bytes, offset: int) -> str:
    return f"not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})"


def _kind(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _wrong_type(name: str, value, wanted: str) -> str:
    if isinstance(value, Unreadable):
        return f"'{name}' cannot be read ({value.reason})"
    return f"'{name}' is null" if value is None else f"'{name}' is {_kind(value)}, not {wanted}"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
