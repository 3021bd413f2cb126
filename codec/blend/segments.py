"""A blended prompt's parts: text to compute, and cached segments to place.

A prompt is an explicit list of segments, never found by separator strings: a
:class:`Text` (the system line, the question, glue between documents) is computed;
a :class:`Cached` segment (a .kvc file, a decoded :class:`KVCache`, or a document in a
:class:`~kvcodec.store.ChunkStore`) is decoded straight into the fused cache at its
offset in the prompt, keys re-rotated there. :func:`resolve` opens and checks every
segment and gives each cached one a loader; each segment's report says what happened: a
cached segment that cannot be used for a reason that is not
the caller's (damaged file, missing store entry) is computed from its tokens instead,
and the report says why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import format as kvc
from ..core.kvcache import KVCache, check_token_ids
from ..core.transforms import model_ropes, shift
from ..errors import (BlendError, ConfigError, CorruptError, FormatError, KVCodecError,
                      ShapeError)
from ..models.fingerprint import check_fingerprint
from ..models.tokens import check_ids, special_prefix, text_ids


@dataclass
class Text:
    """Tokens computed in the blend: give ``text`` (tokenized without special tokens:
    the prompt's BOS, where the model's tokenizer starts with one, is added by
    :func:`resolve`) or ``token_ids``."""

    text: str | None = None
    token_ids: list | None = None


@dataclass
class Cached:
    """A segment whose K/V come from a cache.

    ``source`` is a .kvc path, bytes, an open :class:`~kvcodec.KVCFile` or a
    :class:`KVCache`; or give ``store`` (a :class:`~kvcodec.store.ChunkStore`) and the
    document's ``text`` / ``token_ids`` to load it from there. The text, when known,
    also lets a damaged cache be recomputed instead of failing.
    """

    source: object = None
    text: str | None = None
    token_ids: list | None = None
    store: object = None
    name: str | None = None


@dataclass
class SegmentReport:
    """What happened to one segment: ``kind`` "cached" or "text", where it sits, and
    for a cached one whether its cache was reused (``fallback`` says why not)."""

    kind: str
    source: str
    offset: int
    tokens: int
    reused: bool = False
    fallback: str | None = None
    bytes_read: int = 0


@dataclass
class _Part:
    ids: list
    report: SegmentReport
    load: object = None  # callable(dst_rows: dict, offset) for a cached part
    files: list = field(default_factory=list)
    owned: list = field(default_factory=list)  # files opened here, closed after loading


def _ids(lm, text, token_ids) -> list | None:
    if token_ids is not None:  # a string was int()'s ValueError, 1.5 was cut to 1
        return check_token_ids(token_ids)  # the vocabulary: resolve() names the segment
    if text is not None:  # a piece inside the prompt: never a BOS of its own
        return text_ids(lm.tokenizer, text, first=False)
    return None


def _describe(seg: Cached, i: int) -> str:
    if seg.name:
        return seg.name
    if isinstance(seg.source, (str, Path)):
        return str(seg.source)
    if seg.store is not None:
        return f"store document (segment {i})"
    return f"segment {i} ({type(seg.source).__name__})"


def resolve(lm, segments, anchor: list) -> list:
    """Token ids and loaders of every segment (files opened, headers checked); errors
    that are the caller's (wrong model, another anchor, no tokens) raise here.

    The prompt starts as the model's tokenizer starts a sequence
    (:mod:`kvcodec.models.tokens`): where that is a BOS and the first segment does not
    begin with it (a text, or a position-independent document, which never carries one),
    a computed part holding it comes first.
    """
    if isinstance(segments, (str, bytes, dict)):  # a str went by characters, a dict by keys
        raise ShapeError(f"segments must be a list of Text, Cached or str, got a "
                         f"{type(segments).__name__} (one text is [text])")
    if not segments:
        raise ShapeError("blend needs at least one segment")
    parts = []
    try:
        for i, seg in enumerate(segments):
            parts.append(_resolve_one(lm, seg, i, anchor))
        for i, p in enumerate(parts):  # a raw-tensor cache's ids are checked nowhere else
            check_ids(lm.model, p.ids, f"segment {i} ({p.report.source})")
    except BaseException:
        for p in parts:
            for f in p.owned:
                f.close()
        raise
    prefix = special_prefix(lm.tokenizer) if lm.tokenizer is not None else []
    if prefix and parts[0].ids[:len(prefix)] != prefix:
        parts.insert(0, _Part(prefix, SegmentReport("text", "bos", 0, len(prefix))))
    return parts


def _resolve_one(lm, seg, i: int, anchor: list) -> _Part:
    if isinstance(seg, str):
        seg = Text(seg)
    if isinstance(seg, Text):
        ids = _ids(lm, seg.text, seg.token_ids)
        if not ids:
            raise ShapeError(f"segment {i} is empty (a Text needs text or token ids)")
        return _Part(ids, SegmentReport("text", "text", 0, len(ids)))
    if isinstance(seg, Cached):
        return _resolve_cached(lm, seg, i, anchor)
    raise ShapeError(f"segment {i} is a {type(seg).__name__}; give Text, Cached or str")


def _fallback(ids, name, reason) -> _Part:
    if not ids:
        raise BlendError(f"{name}: {reason}, and its tokens are unknown (give the "
                         "segment's text to recompute it)")
    return _Part(ids, SegmentReport("cached", name, 0, len(ids), False, reason))


def _resolve_cached(lm, seg: Cached, i: int, anchor: list) -> _Part:
    name = _describe(seg, i)
    given = _ids(lm, seg.text, seg.token_ids)
    if given is not None and not given:
        raise ShapeError(f"segment {i} ({name}) has empty text")
    if seg.store is not None:
        if given is None:
            raise ShapeError(f"segment {i}: loading from a store needs the document's text "
                             "or token ids")
        store = seg.store
        check_fingerprint(store.fingerprint, lm.fingerprint)
        paths = store.document(given, anchor)
        if paths is None:
            return _fallback(given, name, "not in the store (precompute it with "
                                          "--independent)")
        part = _Part(given, SegmentReport("cached", name, 0, len(given)), files=paths)
        part.load = lambda dst, offset: _load_store(store, paths, given, anchor, dst, offset)
        return part
    src = seg.source
    if src is None:
        raise ShapeError(f"segment {i}: a Cached segment needs a source (a .kvc path, bytes, "
                         "a KVCFile or a KVCache) or a store")
    if isinstance(src, KVCache):
        return _resolve_tensors(lm, src, given, name, anchor)
    try:
        f = src if isinstance(src, kvc.KVCFile) else kvc.open(src)
    except FormatError as exc:  # damaged or not a .kvc file: recompute it if we can
        return _fallback(given, name, f"unreadable ({exc})")
    owned = [] if f is src else [f]
    try:
        return _check_file(lm, f, given, name, anchor, owned)
    except BaseException:
        for g in owned:
            g.close()
        raise


def _check_file(lm, f, given, name, anchor, owned) -> _Part:
    check_fingerprint(f.model, lm.fingerprint)
    ids = f.token_ids
    if given is not None and ids is not None and given != ids:
        raise BlendError(f"{name} holds other tokens than the text given for it")
    ids = ids if ids is not None else given
    if not ids:
        raise BlendError(f"{name} carries no token ids; give the segment's text")
    if getattr(f, "evicted", False):
        raise BlendError(f"{name} is an evicted cache (heads keep different tokens); a "
                         "blended segment needs every token")
    if f.layer_tokens != [f.num_tokens] * f.num_layers:
        raise BlendError(f"{name} keeps only a sliding window in some layers; a blended "
                         "segment needs every token (capture it with an anchor)")
    _check_anchor(f.anchor, anchor, name)
    part = _Part(ids, SegmentReport("cached", name, 0, len(ids), bytes_read=f.size_bytes))
    part.files, part.owned = [f], owned
    part.load = lambda dst, offset: _load_file(f, dst, offset)
    return part


def _check_anchor(found, anchor, name):
    if found is not None and list(found) != list(anchor):
        raise BlendError(f"{name} was computed behind another anchor ({len(found)} tokens "
                         f"{list(found)[:8]}) than this blend's ({list(anchor)[:8]}); "
                         "capture it again or pass that anchor")


def _resolve_tensors(lm, kv: KVCache, given, name, anchor) -> _Part:
    if kv.model is not None:
        check_fingerprint(kv.model, lm.fingerprint)
    ids = kv.token_ids if kv.token_ids is not None else given
    if not ids:
        raise BlendError(f"{name} carries no token ids; give the segment's text")
    if kv.evicted:
        raise BlendError(f"{name} is an evicted cache (heads keep different tokens); a "
                         "blended segment needs every token")
    if not kv.uniform:
        raise BlendError(f"{name} keeps only a sliding window in some layers")
    found = kv.anchor
    _check_anchor(found, anchor, name)
    computed_at = len(found) if found else 0
    part = _Part(list(ids), SegmentReport("cached", name, 0, len(ids)))
    part.load = lambda dst, offset: _load_tensors(lm, kv, dst, offset, computed_at, found)
    return part


def check_in_place(part: _Part, offset: int) -> None:
    """A cache computed without an anchor is valid only where it was computed."""
    for f in part.files:
        if isinstance(f, kvc.KVCFile) and f.anchor is None and f.position_offset != offset:
            raise BlendError(
                f"{part.report.source} was computed in place at position {f.position_offset}, "
                f"not behind an anchor, so it cannot stand at position {offset}; encode the "
                "document position-independently (kvcodec encode --independent, "
                "capture_kv(..., anchor=...))")


def _load_file(f, dst: dict, offset: int) -> None:
    f.decode_into(dst, position_offset=offset)


def _load_store(store, paths, ids, anchor, dst: dict, offset: int) -> None:
    n = store.chunk_tokens
    for i, path in enumerate(paths):
        t0 = i * n
        t1 = min(len(ids), t0 + n)
        rows = {l: (k[:, :, t0:t1], v[:, :, t0:t1]) for l, (k, v) in dst.items()}
        try:
            f = store.open_entry(path, ids[t0:t1], t0, anchor)  # reports its failures
        except FileNotFoundError:
            raise CorruptError(f"store entry {path} vanished") from None
        except (KVCodecError, OSError) as exc:
            raise CorruptError(f"store entry {path}: {exc}") from None
        with f:
            try:
                f.decode_into(rows, position_offset=offset + t0)
            except (KVCodecError, OSError) as exc:
                store.quarantine(path, exc, f.identity)
                raise CorruptError(f"store entry {path}: {exc}") from None


def _load_tensors(lm, kv: KVCache, dst: dict, offset: int, computed_at: int, anchored) -> None:
    if not anchored and offset != computed_at:
        raise BlendError("a KVCache computed without an anchor is valid only at position 0; "
                         "capture it with capture_kv(..., anchor=...)")
    delta = offset - computed_at
    ropes = None
    if delta:
        try:
            ropes = model_ropes(lm.fingerprint, kv.num_layers, kv.head_dim)
        except ConfigError as exc:
            raise BlendError(f"cannot move this cache to position {offset}: {exc}") from None
    for l, (k, v) in dst.items():
        keys = kv.keys[l] if ropes is None or ropes[l] is None else shift(kv.keys[l], ropes[l], delta)
        k.copy_(keys)
        v.copy_(kv.values[l])
