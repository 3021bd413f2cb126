"""Blended requests in vLLM: a RAG prompt whose documents were cached independently
(``kvcodec precompute --independent``, :meth:`ChunkStore.put_document`) reuses them at
whatever position they stand, with no recompute (CacheBlend's ``none``: what
:func:`kvcodec.blend.blend` computes with ``selector="none"``).

A request names its segments in ``kv_transfer_params`` (vLLM hands them to the
connector as ``request.kv_transfer_params``)::

    {"kvcodec_blend": {"segments": [["text", 41], ["document", 512], ["document", 514],
                                    ["text", 37]],
                       "anchor": [1], "tenant": null}}

Each segment is a kind and a token count, in prompt order, covering the prompt's token
ids exactly. ``document``: tokens stored as a position-independent document behind
``anchor`` (default: the served model's, :func:`kvcodec.models.default_anchor`);
``text``: anything else. ``tenant``: the store salt the documents were stored under.
:func:`request_for` builds the prompt, the salt and these parameters from
:class:`~kvcodec.blend.Text` and :class:`~kvcodec.blend.Cached` segments.

vLLM computes one contiguous suffix of a prompt after the tokens a connector claims, so
the scheduler side (:func:`plan`) claims the text before the first document (the
prompt's own prefix, loaded from lossless prefix entries, :meth:`ChunkStore.exact`:
every blend of a system prompt loads it, and its first tokens are the attention sinks;
where the store lacks it, the request is prefilled and that prefix saved, so that the
next one blends), then each document in order, decoded re-rotated to its offset, and
stops at the first text segment after a document (the question) or at the first
document the store lacks: vLLM computes the rest, as a prefill would given what was loaded. What is
claimed enters vLLM's own prefix cache, so with prefix caching on a blended request
must carry a ``cache_salt`` starting with :data:`SALT_PREFIX` (:func:`request_for`
makes one from the segment layout): a plain request of the same tokens never meets
blended K/V. Blended requests are never saved to the store.

With ``"recompute"`` > 0 (and ``"selector"``, ``"check_layer"``, ``"seed"`` as
:func:`kvcodec.blend.blend` takes them) the request is the quality path instead:
nothing is claimed, vLLM computes every token, and the stored documents' K/V are kept
in the layers after the check layer for the tokens the selector does not pick
(:mod:`.recompute`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ...core.checks import is_int
from ...errors import ConfigError

PARAM = "kvcodec_blend"            # the key in kv_transfer_params
SALT_PREFIX = "kvcodec-blend:"     # cache_salt of blended requests (prefix caching on)
KINDS = ("text", "document")
SELECTORS = ("hkvd", "boundary", "random", "none", "all")  # what vLLM lets us measure


@dataclass
class Segment:
    """A run of store entries a load reads: ``token_ids`` (a document's, or the prompt's
    prefix through its last whole or partial chunk) placed from position ``offset``;
    ``anchor``: the document's (None: the prompt's own prefix, decoded where coded);
    ``exact``: read from the store's lossless view (a blend's head)."""

    offset: int
    token_ids: list
    anchor: list | None = None
    exact: bool = False


@dataclass
class Blend:
    """A request's blend as asked (:func:`parse`): segments as ``(kind, start, end)``;
    with ``recompute`` > 0, selective recompute (:mod:`.recompute`) by ``selector``
    from ``check_layer`` (None: :func:`kvcodec.blend.blend`'s default)."""

    spans: list
    anchor: list | None = None
    tenant: str | None = None
    recompute: float = 0.0
    selector: str = "hkvd"
    check_layer: int | None = None
    seed: int = 0


@dataclass
class BlendPlan:
    """What the scheduler claims for a blended request: ``end`` (tokens from 0 loaded),
    ``segments`` to load, ``head`` (tokens before the first document; 0: none),
    ``head_cached`` (whether the store holds them), ``documents`` claimed and
    ``computed`` (documents vLLM computes instead: missing, or after the question);
    with selective recompute, the documents to preload (``preload``; nothing is
    claimed)."""

    end: int = 0
    segments: list = field(default_factory=list)
    preload: list = field(default_factory=list)
    head: int = 0
    head_cached: bool = True
    documents: int = 0
    computed: int = 0


def parse(params, n_tokens: int) -> Blend | None:
    """The blend ``params`` (a request's ``kv_transfer_params``) ask for, or None if they
    ask for none; a malformed request raises :class:`ConfigError` saying what is wrong."""
    spec = (params or {}).get(PARAM) if isinstance(params, dict) else None
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("segments"), list):
        raise ConfigError(f"kv_transfer_params[{PARAM!r}] must be an object with "
                          "'segments': [[kind, tokens], ...]")
    spans, at = [], 0
    for i, seg in enumerate(spec["segments"]):
        if (not isinstance(seg, (list, tuple)) or len(seg) != 2 or seg[0] not in KINDS
                or not is_int(seg[1], 1)):
            raise ConfigError(f"blend segment {i} is {seg!r:.60}; need [kind, tokens] with "
                              f"kind one of {KINDS} and tokens a positive integer")
        spans.append((seg[0], at, at + seg[1]))
        at += seg[1]
    if at != n_tokens:
        raise ConfigError(f"the blend segments cover {at} tokens; the prompt has {n_tokens}")
    anchor = spec.get("anchor")
    if anchor is not None and (not isinstance(anchor, list) or not anchor or not all(
            is_int(t, 0, (1 << 32) - 1) for t in anchor)):  # u32: the store's keys hold them
        raise ConfigError(f"blend anchor must be a list of token ids, got {anchor!r:.60}")
    tenant = spec.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise ConfigError(f"blend tenant must be a string, got {tenant!r:.60}")
    ratio = spec.get("recompute", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f"blend recompute must be a fraction in [0, 1], got {ratio!r:.60}")
    selector = spec.get("selector", "hkvd")
    if selector not in SELECTORS:
        raise ConfigError(f"blend selector {selector!r:.40} is not one of {SELECTORS} "
                          "(query needs the question's attention, which vLLM does not expose)")
    check = spec.get("check_layer")
    seed = spec.get("seed", 0)
    for name, v in (("check_layer", check), ("seed", seed)):
        if v is not None and not is_int(v, 0, (1 << 64) - 1):  # torch seeds take 64 bits
            raise ConfigError(f"blend {name} must be a non-negative integer, got {v!r:.40}")
    return Blend(spans, anchor, tenant, float(ratio), selector, check, seed)


def plan(store, ids: list, blend: Blend, anchor: list) -> BlendPlan:
    """What can be claimed of prompt ``ids`` (see the module docstring): ``store`` is
    the tenant's view of the store. The last prompt token is always left to vLLM. With
    selective recompute (:func:`selective`) nothing is claimed (vLLM computes every
    token, the text before the documents as :func:`kvcodec.blend.blend` computes text
    segments) and every stored document is preloaded."""
    out = BlendPlan()
    docs = [i for i, (kind, _, _) in enumerate(blend.spans) if kind == "document"]
    if not docs:
        return out
    first = docs[0]
    out.head = blend.spans[first][1]
    if selective(blend):  # vLLM computes every token, the text before documents too
        for i in docs:
            _, a, b = blend.spans[i]
            if store.document(ids[a:b], anchor) is not None:
                out.preload.append(Segment(a, ids[a:b], list(anchor)))
        out.documents = len(out.preload)
        out.computed = len(docs) - out.documents
        return out
    if out.head:  # kept exact: every blend loads it, and it holds the attention sinks
        out.head_cached = store.exact().cached_tokens(ids[:out.head], partial=True) == out.head
        if not out.head_cached:
            out.computed = len(docs)
            return out
        out.segments.append(Segment(0, ids[:out.head], exact=True))
    out.end = out.head
    for i, (kind, a, b) in enumerate(blend.spans[first:], first):
        if kind == "text" or store.document(ids[a:b], anchor) is None:
            break
        out.segments.append(Segment(a, ids[a:b], list(anchor)))
        out.documents += 1
        out.end = b
    out.computed = len(docs) - out.documents
    out.end = min(out.end, len(ids) - 1)
    return out


def selective(blend: Blend) -> bool:
    """Whether the blend recomputes some cached tokens (else: full reuse)."""
    return blend.selector != "none" and (blend.recompute > 0 or blend.selector == "all")


def salt_for(layout: list, tenant: str | None = None, anchor=None, mode=None) -> str:
    """The ``cache_salt`` of a blended request: :data:`SALT_PREFIX`, the tenant and a
    hash of the segment layout, anchor and recompute settings (the same tokens blended
    otherwise are other K/V, so they share no block in vLLM's prefix cache)."""
    key = [tenant, layout, anchor] + ([mode] if mode is not None else [])
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return f"{SALT_PREFIX}{tenant or ''}:{digest}"


def request_for(tokenizer, segments, *, tenant: str | None = None, anchor=None,
                recompute: float = 0.0, selector: str = "hkvd", check_layer=None,
                seed: int = 0) -> tuple:
    """``(prompt, kv_transfer_params)`` for a blended vLLM request: ``prompt`` a dict
    ``{"prompt_token_ids": [...], "cache_salt": ...}`` (vLLM's ``TokensPrompt``; over
    HTTP, send its token ids as ``prompt`` and its ``cache_salt``), the parameters for
    ``SamplingParams(extra_args={"kv_transfer_params": ...})`` (or the request body's
    ``kv_transfer_params``).

    ``segments`` as :func:`kvcodec.blend.blend` takes them: :class:`~kvcodec.blend.Text`
    (or a ``str``) is text, :class:`~kvcodec.blend.Cached` with ``text`` or
    ``token_ids`` a document of the server's store; tokenized as ``blend`` does (pieces
    without special tokens, the tokenizer's BOS first where it adds one), so the same
    segments give the same tokens in transformers and in vLLM. ``recompute``,
    ``selector``, ``check_layer`` and ``seed`` as :func:`kvcodec.blend.blend` takes them
    (selective recompute, :mod:`.recompute`; 0: full reuse)."""
    from ...blend.segments import Cached, Text
    from ...models.capture import default_anchor
    from ...models.tokens import special_prefix, text_ids

    layout, ids = [], []
    for i, seg in enumerate(segments):
        seg = Text(seg) if isinstance(seg, str) else seg
        if not isinstance(seg, (Text, Cached)):
            raise ConfigError(f"segment {i} is a {type(seg).__name__}; give Text, Cached "
                              "or str")
        if isinstance(seg, Cached) and seg.store is None and seg.source is not None:
            raise ConfigError(f"segment {i}: a vLLM blend reads documents from the "
                              "server's store; give the document's text or token_ids")
        got = ([int(t) for t in seg.token_ids] if seg.token_ids is not None else
               text_ids(tokenizer, seg.text, first=False) if seg.text is not None else [])
        if not got:
            raise ConfigError(f"segment {i} is empty")
        layout.append(["document" if isinstance(seg, Cached) else "text", len(got)])
        ids += got
    prefix = special_prefix(tokenizer)
    if prefix and ids[:len(prefix)] != prefix:
        layout.insert(0, ["text", len(prefix)])
        ids = prefix + ids
    anchor = [int(t) for t in (anchor if anchor is not None else default_anchor(tokenizer))]
    params = {PARAM: {"segments": layout, "anchor": anchor, "tenant": tenant,
                      "recompute": recompute, "selector": selector,
                      "check_layer": check_layer, "seed": seed}}
    blend = parse(params, len(ids))  # a mistake is raised here, not in the server's log
    mode = [recompute, selector, check_layer, seed] if selective(blend) else None
    prompt = {"prompt_token_ids": ids, "cache_salt": salt_for(layout, tenant, anchor, mode)}
    return prompt, params
