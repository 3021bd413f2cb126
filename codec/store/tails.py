"""A document's partial last chunk, found under a longer prompt (the document and a
question): its end reused, not recomputed.

A store keys chunk ``i`` of a sequence by the chained hash of its tokens, the last one
too where it is partial (:mod:`.keys`). A document stored alone (``kvcodec precompute``,
:meth:`~.chunks.ChunkStore.put`) ends with a partial chunk, its last 208 tokens say. A
prompt of that document and a question holds, in that place, a chunk of those 208 tokens
and the question's first ones, under another key, so the document's end was never
reused: every such request computed up to ``chunk_tokens - 1`` tokens (half a chunk on
average) that the store held.

Beside a partial entry the store keeps a marker, an empty object
``tails/<h_{i-1}>/<n>``: after the chunks whose chain ends at key ``h_{i-1}`` (the
seed, for a first chunk) a partial chunk of ``n`` tokens is stored. A lookup whose whole
chunks end at ``h_{i-1}`` with tokens left lists those markers (one listing: a folder
on a disk, one LIST on an object store) and, for each length ``n`` shorter than what is
left, longest first, looks for the key of its own next ``n`` tokens: that entry exists
only where those tokens are the document's. A marker whose entry is gone (evicted,
moved aside) is a miss; a listing that fails is a miss, logged.
"""
from __future__ import annotations

import logging

from . import keys as keying

log = logging.getLogger("kvcodec")

FOLDER = "tails"

# Of a lossy store, the last prompt tokens a prefill computes itself even where the store
# holds them: the K/V of the tokens right before the answer move its first token most
# (KIVI and KVTC keep their most recent tokens exact too). `default`, 18 prompts of ~615
# tokens, KL of the first answer token / over 32 (top-1 of the first): every token but
# the last loaded lossy, SmolLM2-135M 0.44 / 0.040 (33%), Gemma 3 270M 0.059 / 0.017
# (89%); the last 64 computed, 0.0099 / 0.0056 (89%) and 0.0076 / 0.0030 (100%); the
# last 128, 0.0082 / 0.0048 and 0.0064 / 0.0023. A lossless store's are loaded: only
# the last token is computed.
RECENT_EXACT = 64


def reuse_end(config: dict, cached: int, n: int, recent: int | None = None) -> int:
    """How many leading tokens of an ``n``-token prompt to take from a store that holds
    ``cached`` of them (coded with ``config``): all but the last ``recent``, at least one
    (the prefill computes it, for its logits); by default 1 for a lossless config and
    :data:`RECENT_EXACT` for a lossy one."""
    if recent is None:
        recent = 1 if is_lossless(config) else RECENT_EXACT
    return max(0, min(cached, n - max(1, int(recent))))


def is_lossless(config: dict) -> bool:
    """Whether every rule of ``config`` codes its values bit-exactly."""
    rules = [r for kind in ("key", "value") for r in config.get(kind) or ()]
    return bool(rules) and all(r.get("quantizer", {}).get("type") == "lossless"
                               for r in rules)


class Prefix(list):
    """Locations of a cached prefix's entries, in token order (a list, as lookups always
    returned), and ``tokens``: how many leading tokens they hold (their last entry may
    hold fewer than a chunk: a document's end)."""

    def __init__(self, locs, tokens: int):
        super().__init__(locs)
        self.tokens = int(tokens)


def covered(locs, token_ids, chunk: int) -> int:
    """How many leading tokens of ``token_ids`` the entries ``locs`` hold: a
    :class:`Prefix` says; a plain list of chunks holds whole chunks (the last one up to
    the end of ``token_ids``)."""
    if isinstance(locs, Prefix):
        return min(len(token_ids), locs.tokens)
    return min(len(token_ids), len(locs) * chunk)


def marker(prev: str, n: int) -> str:
    """The marker of a partial chunk of ``n`` tokens stored after chain key ``prev``."""
    return f"{FOLDER}/{prev}/{int(n)}"


class StoreTails:
    """The markers of a :class:`~.chunks.ChunkStore` (a mixin: its backend, chunk size,
    seed and :meth:`_present`)."""

    def _mark_tail(self, keys: list, tokens: int, from_token: int, anchor=None) -> None:
        """For a ``put`` of ``tokens`` tokens (chunk keys ``keys``, from ``from_token``
        on): its last chunk's marker, where it is partial and not recorded yet (not for a
        document behind an anchor: blends look those up by their own tokens). Written
        before the entries: a marker whose entry is missing is a miss, while entries
        without their marker (a put killed after its last entry) looked stored to a
        resumed job, which then never wrote it. A marker that cannot be written costs
        later prompts this reuse only: logged."""
        last, chunk = len(keys) - 1, self.chunk_tokens
        if anchor is not None or not tokens % chunk or last * chunk < from_token:
            return
        rel = marker(keys[last - 1] if last else self._seed.hex(), tokens - last * chunk)
        try:
            if not self._backend.exists(rel):
                self._backend.write(rel, b"")
        except OSError as exc:
            log.warning("kvcodec store: cannot record the partial chunk %s (%s)", rel, exc)

    def _with_tail(self, ids: list, keys: list, locs: list, partial: bool) -> Prefix:
        """The :class:`Prefix` of ``ids`` whose entries ``locs`` a lookup found (``keys``:
        every chunk's); with ``partial``, where they are whole chunks with tokens left
        after them, the longest partial chunk stored there that ``ids`` continue joins
        them (:meth:`_find_tail`)."""
        got = covered(locs, ids, self.chunk_tokens)  # whole chunks
        if partial and got < len(ids):
            n = len(locs)
            tail = self._find_tail(ids, n, keys[n - 1] if n else self._seed.hex())
            if tail is not None:
                return Prefix(locs + [tail[0]], got + tail[1])
        return Prefix(locs, got)

    def _find_tail(self, ids: list, chunks: int, prev: str):
        """``(location, n)`` of the longest partial chunk stored after the ``chunks``
        whole chunks of ``ids`` (chain key ``prev``) that holds ``ids``' next ``n``
        tokens, with tokens of ``ids`` still after it; or None."""
        at = chunks * self.chunk_tokens
        most = min(len(ids) - at, self.chunk_tokens) - 1  # the exact one: looked up already
        if most < 1:
            return None
        sizes = set()
        try:
            for rel in self._backend.list(f"{FOLDER}/{prev}"):
                name = rel.rsplit("/", 1)[-1]
                if len(name) <= 6 and name.isdecimal() and 0 < int(name) <= most:
                    sizes.add(int(name))
        except Exception as exc:  # the store cannot say: a miss, as for an entry
            log.warning("kvcodec store: cannot list %s/%s (%s); a miss", FOLDER, prev, exc)
            return None
        seed = bytes.fromhex(prev)
        for n in sorted(sizes, reverse=True):
            rel = keying.entry_name(keying.chain(seed, ids[at:at + n], n)[0])
            if self._present(rel):
                return self._backend.location(rel), n
        return None
