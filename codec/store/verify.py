"""Whether a store entry's bytes are intact, checked at the speed of reading them
(``kvcodec store verify``): the header's checksum, every checksummed section's, every
payload item's (against the chunk index), the shared tables it names, its token ids,
and for a prefix's first chunk its key.

It works on the fetched bytes in place (a memoryview, no copies, no decode and no table
building), so it runs at the disk's speed rather than the decoder's. It checks what
bit rot, truncation and misplaced files break; the full structural validation of a
header (every field's range) stays with the reader, which runs it when an entry is
loaded and moves a bad one aside then.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os

import numpy as np

from ..core.paths import loads_json, open_regular
from ..errors import CorruptError, FormatError, TruncatedError, VersionError
from ..format.bounded import unzstd
from ..format.container import (DATA_ALIGN, MAGIC, PREAMBLE, SECTION_ALIGN, crc32,
                                parse_header, preamble)
from ..format.shared import DIGEST, SharedTables, max_bytes
from ..format.spec import INDEX_ENTRY, MAX_CONFIG_BYTES, MAX_TOKENS
from . import keys as keying

HEAD = 64 << 10  # bytes read for a header at first (entries' headers are ~5-20 KB)
MAX_REMOTE_BYTES = 2 << 30  # what verify fetches of one remote entry at most
LOCAL_READ_BYTES = 64 << 20  # local entries up to this are read whole, larger ones mapped
INDEX = np.dtype([("off", "<u8"), ("side", "<u4"), ("blob", "<u4"), ("crc", "<u4")])
assert INDEX.itemsize == INDEX_ENTRY.size


def head(data, name: str) -> tuple[int, dict, int] | int:
    """``(version, header, data start)`` of a .kvc file's first bytes, or how many bytes
    are needed when ``data`` is too short; the container's own checks
    (:func:`~kvcodec.format.container.preamble`, :func:`~kvcodec.format.container.parse_header`):
    FormatError when they are not a readable .kvc header, VersionError for a newer
    format."""
    if len(data) < PREAMBLE.size:
        if len(data) and not MAGIC.startswith(bytes(data[:8])):
            raise FormatError(f"{name} is not a .kvc file (bad magic)")
        return PREAMBLE.size
    version, hlen, hcrc = preamble(data[:PREAMBLE.size], name)
    if len(data) < PREAMBLE.size + hlen:
        return PREAMBLE.size + hlen
    header = parse_header(data[PREAMBLE.size:PREAMBLE.size + hlen], hcrc, name)
    start = -(-(PREAMBLE.size + hlen) // DATA_ALIGN) * DATA_ALIGN
    return version, header, start


def read_config(raw: bytes, rel: str) -> dict:
    """The codec config an entry's ``config`` section holds (CorruptError if it is not
    one)."""
    try:
        cfg = loads_json(unzstd(raw, MAX_CONFIG_BYTES, f"{rel}: section 'config'"))
    except ValueError:
        raise CorruptError(f"{rel}: config section is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise CorruptError(f"{rel}: config section is not a JSON object")
    return cfg


class Verifier:
    """Checks entries of one store; keeps what entries share (shared tables by digest,
    configs by their section's bytes, key seeds) across them."""

    def __init__(self, backend, salts=None):
        self.backend = backend
        self.salts = salts  # None: unknown (a first chunk's key is then unverifiable)
        self._where = {}
        for rel, _, _ in backend.scan("tables"):
            name = rel.rsplit("/", 1)[-1]
            if name.endswith(".kvt") and DIGEST.fullmatch(name[:-4]):
                self._where[name[:-4]] = rel
        self._tables: dict = {}
        self._configs: dict = {}
        self._seeds: dict = {}

    def tables(self, d: str, fp: dict) -> SharedTables:
        """The shared tables of digest ``d`` (CorruptError if gone or damaged)."""
        got = self._tables.get(d)
        if got is None:
            rel = self._where.get(d) if isinstance(d, str) else None
            if rel is None:
                raise CorruptError(f"its store's shared tables {str(d)[:12]}... are gone")
            try:
                data = self.backend.fetch(rel, max_bytes(fp))[0]
            except CorruptError:
                raise CorruptError(f"{rel}: larger than shared tables can be") from None
            got = self._tables[d] = SharedTables.stored(data, d, fp, rel)
        return got

    def check(self, rel: str, size: int | None = None) -> str | None:
        """None if entry ``rel`` is intact, ``"unverified"`` if only its key could not
        be checked (unknown salt), ``"newer"`` if its format is newer than this kvcodec
        reads (left alone, as every store reader does), else what is wrong. OSError if the store cannot be
        read now."""
        try:
            if self.backend.remote:
                if size is not None and size > MAX_REMOTE_BYTES:
                    raise OSError(f"{rel}: {size} bytes, more than the "
                                  f"{MAX_REMOTE_BYTES >> 20} MiB verify fetches from a remote "
                                  "store; verify a local copy")
                data, _ = self.backend.fetch(rel, min(self._limit(rel), MAX_REMOTE_BYTES))
                self._check(memoryview(data), rel)
            else:  # read whole (one syscall) up to 64 MiB; mapped beyond, in bounded memory
                with _local(self.backend.location(rel)) as mv:
                    self._check(mv, rel)
        except VersionError:
            return "newer"  # not damage: a newer kvcodec reads it (the store's rule)
        except FormatError as exc:
            return f"{type(exc).__name__}: {exc}"
        except KeyMismatch as exc:
            return str(exc) if self.salts is not None else "unverified"
        return None

    def _limit(self, rel: str) -> int:
        """The most bytes entry ``rel`` can take, from its header's geometry (as
        :meth:`ChunkStore.entry_limit`: 8 bytes per element and 16 MiB), so that a crafted
        file is refused before it is read whole."""
        data = self.backend.read_head(rel, HEAD)
        got = head(data, rel)
        if isinstance(got, int):
            data = self.backend.read_head(rel, got)
            got = head(data, rel)
        if isinstance(got, int):
            raise TruncatedError(f"{rel}: {len(data)} bytes, shorter than its header")
        h = got[1]
        dims = [h.get(k) for k in ("num_layers", "num_kv_heads", "head_dim", "num_tokens")]
        if not all(isinstance(v, int) and 0 < v <= MAX_TOKENS for v in dims):
            raise CorruptError(f"{rel}: header has no valid geometry")
        layers, heads, dim, n = dims
        return 8 * 2 * layers * heads * dim * n + (16 << 20)

    def _check(self, mv: memoryview, rel: str) -> None:
        got = head(mv, rel)
        if isinstance(got, int):
            raise TruncatedError(f"{rel}: {len(mv)} bytes, shorter than its header")
        _, h, start = got
        sections = self._sections(h, rel, len(mv) - start)
        for name, (off, length, crc) in sections.items():
            if crc is not None and crc32(mv[start + off:start + off + length]) != crc:
                raise CorruptError(f"{rel}: checksum mismatch in section {name!r}")
        if "index" in sections and "payload" in sections:
            self._payload(mv, start, sections, rel)
        fp = h.get("model")
        if not isinstance(fp, dict):
            raise CorruptError(f"{rel}: header names no model")
        if h.get("shared_tables") is not None:
            try:
                self.tables(h["shared_tables"], fp)
            except (KeyError, TypeError):
                raise CorruptError(f"{rel}: its header's model has no geometry") from None
        n = h.get("num_tokens")
        if not isinstance(n, int) or not 0 < n <= MAX_TOKENS:
            raise CorruptError(f"{rel}: header has no valid token count")
        ids = None
        if h.get("has_token_ids") and "tokens" in sections:
            off, length, _ = sections["tokens"]
            raw = unzstd(bytes(mv[start + off:start + off + length]), 4 * n, f"{rel}: tokens")
            if len(raw) != 4 * n:
                raise CorruptError(f"{rel} holds {len(raw) // 4} token ids for {n} tokens")
            ids = np.frombuffer(raw, "<u4").tolist()
        if ids is not None and not (h.get("position_offset") or h.get("anchor")
                                    or h.get("evicted")) and "config" in sections:
            off, length, _ = sections["config"]
            self._key(rel, fp, bytes(mv[start + off:start + off + length]), ids)

    @staticmethod
    def _sections(h: dict, rel: str, have: int) -> dict:
        table, total = h.get("sections"), h.get("data_length")
        if not isinstance(table, list) or not isinstance(total, int):
            raise CorruptError(f"{rel}: header lacks a valid section table")
        out, expect = {}, 0
        for s in table:
            if not isinstance(s, dict) or s.get("offset") != expect:
                raise CorruptError(f"{rel}: sections do not tile the data")
            length = s.get("length")
            if not isinstance(length, int) or length < 0:
                raise CorruptError(f"{rel}: malformed section entry")
            out[str(s.get("name"))] = (expect, length, s.get("crc32"))
            expect = -(-(expect + length) // SECTION_ALIGN) * SECTION_ALIGN
        if expect != total:
            raise CorruptError(f"{rel}: sections end at {expect}, not at data_length {total}")
        if have < total:
            raise TruncatedError(f"{rel}: holds {max(have, 0)} data bytes of {total}; "
                                 "it is truncated")
        if have > total:
            raise CorruptError(f"{rel}: {have - total} unexpected bytes after the data")
        return out

    @staticmethod
    def _payload(mv, start: int, sections: dict, rel: str) -> None:
        ioff, ilen, _ = sections["index"]
        poff, plen, _ = sections["payload"]
        if ilen % INDEX.itemsize:
            raise CorruptError(f"{rel}: index has {ilen} bytes, not whole records")
        idx = np.frombuffer(bytes(mv[start + ioff:start + ioff + ilen]), INDEX)
        if not len(idx):
            return
        ends = idx["off"] + idx["side"].astype(np.uint64) + idx["blob"]
        if idx["off"][0] != 0 or np.any(idx["off"][1:] != ends[:-1]) or int(ends[-1]) != plen:
            raise CorruptError(f"{rel}: index entries do not tile the payload")
        payload = mv[start + poff:start + poff + plen]
        for i, (o, e, c) in enumerate(zip(idx["off"].tolist(), ends.tolist(),
                                          idx["crc"].tolist())):
            if crc32(payload[o:e]) != c:
                raise CorruptError(f"{rel}: checksum mismatch in payload item {i}; the "
                                   "file is damaged")

    def _key(self, rel: str, fp: dict, config_raw: bytes, ids: list) -> None:
        """A prefix's first chunk is named by its tokens, model, config and tenant's
        salt: recompute its key under each known salt (later chunks chain on their
        predecessor's key, which they do not hold)."""
        cfg = self._configs.get(config_raw)
        if cfg is None:
            cfg = self._configs[config_raw] = read_config(config_raw, rel)
        ident = (config_raw, json.dumps(fp, sort_keys=True))
        seed = self._seeds.get(ident)
        if seed is None:
            seed = self._seeds[ident] = keying.base_seed(fp, cfg)
        for salt in (None,) if self.salts is None else self.salts:
            key = keying.chain(keying.salted(seed, salt), ids, max(1, len(ids)))[0]
            if keying.entry_name(key) == rel:
                return
        raise KeyMismatch(f"CorruptError: {rel} holds other tokens than its key says")


class KeyMismatch(Exception):
    """A first chunk's key matches none of the salts tried."""



@contextlib.contextmanager
def _local(path):
    """The bytes of the file at ``path`` as a memoryview: read whole when it is at most
    :data:`LOCAL_READ_BYTES` (faster than faulting a mapping in page by page), else a
    read-only mapping (any size, in bounded memory)."""
    with open_regular(path) as f:  # a FIFO blocked the open until a writer came
        size = os.fstat(f.fileno()).st_size
        if size <= LOCAL_READ_BYTES:
            yield memoryview(f.read(size + 1))
            return
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            m.madvise(mmap.MADV_SEQUENTIAL)
            yield memoryview(m)
        finally:
            try:
                m.close()
            except BufferError:  # a view is still alive: unmapped when it goes
                pass
