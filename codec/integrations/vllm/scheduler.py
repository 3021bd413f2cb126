"""The connector's scheduler side: which prompt tokens the store holds, and what each
step asks the worker to load and to save (:class:`KVCodecConnectorMetadata`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ...blend.api import default_check_layer
from ...errors import ConfigError
from ...store.tails import reuse_end
from . import blending
from .blending import Segment
from .recompute import Recompute

log = logging.getLogger("kvcodec")


@dataclass
class Load:
    req_id: str
    token_ids: list        # the prompt's tokens the store holds (their entries' keys)
    block_ids: list
    start: int             # first token to load (what vLLM had computed already)
    end: int               # one past the last token to load
    salt: str | None = None  # the request's cache_salt: its tenant's keys
    segments: list | None = None  # a blended request's runs of entries (blending.Segment)
    recompute: Recompute | None = None  # documents preloaded for selective recompute

    def runs(self) -> list:
        """The runs of entries to read: a blend's segments, or the prompt's prefix."""
        return self.segments or [Segment(0, self.token_ids)]


@dataclass
class Save:
    req_id: str
    token_ids: list        # the whole prompt
    block_ids: list
    salt: str | None = None
    exact: bool = False    # to the store's lossless view (a blend's head)


@dataclass
class KVCodecConnectorMetadata(KVConnectorMetadata):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)


class ConnectorScheduler:
    """Prefix lookups in ``store`` (a :class:`~kvcodec.store.ChunkStore`) for vLLM's
    scheduler, and the per-step loads and saves for the workers. ``block``: vLLM's block
    size (a divisor of the store's chunk size); ``save``: store what vLLM computes;
    ``prefix_caching``: whether vLLM's own prefix cache is on (blended requests then
    need a blend salt); ``anchor``: a callable giving the served model's default anchor
    for blends that name none (:mod:`.blending`); ``recent``: the last prompt tokens
    computed even where the store holds them (None: :func:`~kvcodec.store.tails.
    reuse_end`'s default); ``whole_blocks``: loads end on a block boundary (as vLLM's
    ExampleConnector's do); ``hold_reads``: the worker runs in this process, so a
    lookup fetches the entries it finds for the worker's load (:mod:`kvcodec.store.held`:
    one round trip per entry on an object store, not two)."""

    def __init__(self, store, block: int, save: bool, prefix_caching: bool = False,
                 anchor=None, recent: int | None = None, whole_blocks: bool = False,
                 hold_reads: bool = False):
        self.store, self.block, self.save = store, block, save
        self.hold_reads = hold_reads
        self.recent, self.whole_blocks = recent, whole_blocks
        self.prefix_caching, self._anchor = prefix_caching, anchor
        self.chunk = store.chunk_tokens
        self._pending: dict[str, tuple] = {}  # req_id -> (start, end, segments, tokens found)
        self._blocks: dict[str, list] = {}       # req_id -> block ids so far
        self._prompts: dict[str, list] = {}      # req_id -> prompt token ids
        self._saved: set = set()
        self._whole: set = set()  # requests whose whole prompt the store held
        self._salts: dict[str, str] = {}         # req_id -> its cache_salt, if any
        self._blends: dict[str, tuple] = {}      # req_id -> (Blend, head to save, preload)

    def _store(self, req_id: str):
        """The store as the request's tenant sees it (its ``cache_salt`` in every key)."""
        return self.store.with_salt(self._salts.get(req_id))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        ids = list(request.prompt_token_ids or [])
        salt = getattr(request, "cache_salt", None)
        if salt is not None:
            self._salts[request.request_id] = salt
        blend = self._blend_of(request, ids)
        if blend is not None:
            return self._match_blend(request.request_id, ids, blend, num_computed_tokens)
        store = self._store(request.request_id)
        cached = store.cached_tokens(ids, partial=True,
                                     hold=num_computed_tokens if self.hold_reads else None)
        # vLLM computes at least one prompt token itself; of a lossy store, the last
        # `recent` too (reuse_end); where the load ends, mid-block, vLLM's forward goes on.
        end = reuse_end(store.config, cached, len(ids), self.recent)
        if self.whole_blocks:
            end = end // self.block * self.block
        if end <= num_computed_tokens:
            return 0, False
        self._pending[request.request_id] = (num_computed_tokens, end, None, cached)
        return end - num_computed_tokens, False

    def _blend_of(self, request, ids: list):
        """The blend the request asks for (:mod:`.blending`), or None: none asked, or one
        that cannot be served (logged; the request is then a plain prompt)."""
        try:
            blend = blending.parse(getattr(request, "kv_transfer_params", None), len(ids))
        except ConfigError as exc:
            log.warning("kvcodec vLLM: request %s asks for a blend: %s; served as a plain "
                        "prompt", request.request_id, exc)
            self.store.metrics.blended(refused=True)
            return None
        if blend is None:
            return None
        n_layers = int(self.store.fingerprint["num_layers"])
        if blend.check_layer is None:
            blend.check_layer = default_check_layer(n_layers)
        if blending.selective(blend) and not blend.check_layer < n_layers - 1:
            log.warning("kvcodec vLLM: request %s: check_layer %d is not before the last "
                        "layer (%d layers); served as a plain prompt", request.request_id,
                        blend.check_layer, n_layers)
            self.store.metrics.blended(refused=True)
            return None
        salt = getattr(request, "cache_salt", None) or ""
        if self.prefix_caching and not salt.startswith(blending.SALT_PREFIX):
            log.warning("kvcodec vLLM: request %s asks for a blend without a blend salt "
                        "while vLLM's prefix caching is on (its blended K/V would serve "
                        "plain requests of the same tokens); served as a plain prompt: "
                        "build blended requests with kvcodec's request_for",
                        request.request_id)
            self.store.metrics.blended(refused=True)
            return None
        return blend

    def _match_blend(self, req_id: str, ids: list, blend, num_computed_tokens: int):
        store = self.store.with_salt(blend.tenant)
        anchor = blend.anchor if blend.anchor is not None else self._anchor()
        with store.metrics.bookkeeping():  # counted once, below, as the request's lookup
            p = blending.plan(store, ids, blend, anchor)
        store.metrics.lookup(len(ids), p.end)
        store.metrics.blended(p.documents, p.computed)
        # Where the store lacks the text before the first document, the request is
        # prefilled; that prefix (exact, vLLM's own) is saved for the next one.
        self._blends[req_id] = (blend, 0 if p.head_cached else p.head, p.preload)
        if p.end <= num_computed_tokens:
            return 0, False
        self._pending[req_id] = (num_computed_tokens, p.end, p.segments, None)
        return p.end - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens == 0:
            self._pending.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output) -> KVCodecConnectorMetadata:
        meta = KVCodecConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            self._blocks[new.req_id] = list(new.block_ids[0])
            self._prompts[new.req_id] = list(new.prompt_token_ids or [])
            if new.req_id in self._pending:
                start, end, segments, cover = self._pending.pop(new.req_id)
                if cover is not None and cover >= len(self._prompts[new.req_id]):
                    self._whole.add(new.req_id)  # nothing to save: see _maybe_save
                # The entries' keys: of the tokens the lookup found (whole chunks, the
                # prompt's partial last one, or a document's end it continues: their
                # keys are of exactly those tokens), past `end` for a cut last entry.
                whole = cover if cover is not None else -(-end // self.chunk) * self.chunk
                blend = self._blends.get(new.req_id)
                meta.loads.append(Load(new.req_id, self._prompts[new.req_id][:whole],
                                       list(self._blocks[new.req_id]), start, end,
                                       blend[0].tenant if blend else
                                       self._salts.get(new.req_id), segments))
            done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
            self._maybe_recompute(meta, new.req_id, new.num_computed_tokens, done)
            self._maybe_save(meta, new.req_id, done)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._blocks:
                continue
            if req_id in cached.resumed_req_ids:  # preempted: its blocks were replaced
                self._blocks[req_id] = []
                self._saved.discard(req_id)
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                self._blocks[req_id] += list(new_blocks[0])
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id]
            self._maybe_save(meta, req_id, done)
        if any(load.recompute is not None for load in meta.loads):
            # Preloads feed this step's forward: vLLM starts them before it (as its
            # HiSparse connector asks), not after, as it does for steps that load nothing.
            scheduler_output.has_sync_kv_loads = True
        return meta

    def _maybe_recompute(self, meta, req_id: str, start: int, done: int) -> None:
        """A selective blend's documents, preloaded for the layers after the check layer
        (:mod:`.recompute`), when this step computes the rest of its prompt at once; a
        prompt vLLM splits over steps (chunked prefill) is computed as a prefill."""
        blend, _, preload = self._blends.get(req_id) or (None, 0, [])
        if not preload:
            return
        ids = self._prompts[req_id]
        if done < len(ids):
            log.warning("kvcodec vLLM: %s is prefilled over several steps; its blend's "
                        "selective recompute needs one: computed as a prefill", req_id)
            self.store.metrics.blended(refused=True)
            return
        spans = [(s.offset, s.offset + len(s.token_ids)) for s in preload]
        rc = Recompute(blend.recompute, blend.selector, blend.check_layer, blend.seed,
                       len(ids), spans)
        meta.loads.append(Load(req_id, ids, list(self._blocks[req_id]), start, len(ids),
                               blend.tenant, preload, rc))

    def _maybe_save(self, meta, req_id: str, done: int) -> None:
        """Once a prompt's prefill completes this step, save its chunks that the store
        lacks, the partial last one included (the same prompt sent again loads all but
        its last block); the worker reads them from the blocks after the forward. A
        blended request saves nothing but, where the store lacked it, the text before
        its first document (computed as a prefill computes it)."""
        ids = self._prompts.get(req_id) or []
        if not self.save or req_id in self._saved or done < len(ids) or not ids:
            return
        self._saved.add(req_id)
        salt, exact = self._salts.get(req_id), req_id in self._blends
        if req_id in self._whole and not exact:  # its lookup found all of it, the last
            return  # partial chunk included: no second lookup in the first token's time
        if exact:  # a blend's head, kept lossless (blending.plan)
            blend, head, _ = self._blends[req_id]
            ids, salt = ids[:head], blend.tenant
            if not ids:
                return
        store = self.store.with_salt(salt)
        store = store.exact() if exact else store
        with store.metrics.bookkeeping():  # the request's lookup was counted already
            cached = store.cached_tokens(ids, partial=True)
        if cached < len(ids):
            n_blocks = -(-len(ids) // self.block)
            meta.saves.append(Save(req_id, list(ids), list(self._blocks[req_id][:n_blocks]),
                                   salt, exact))

    def request_finished(self, request, block_ids):
        for d in (self._blocks, self._prompts, self._pending, self._salts, self._blends):
            d.pop(request.request_id, None)
        self._saved.discard(request.request_id)
        self._whole.discard(request.request_id)
        return False, None
