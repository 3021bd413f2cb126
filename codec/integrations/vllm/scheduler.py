"""The connector's scheduler side: which prompt tokens the store holds, and what each
step asks the worker to load and to save (:class:`KVCodecConnectorMetadata`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class Load:
    req_id: str
    token_ids: list        # the prompt's tokens through the chunk that holds ``end - 1``
    block_ids: list
    start: int             # first token to load (what vLLM had computed already)
    end: int               # one past the last token to load
    salt: str | None = None  # the request's cache_salt: its tenant's keys


@dataclass
class Save:
    req_id: str
    token_ids: list        # the whole prompt
    block_ids: list
    salt: str | None = None


@dataclass
class KVCodecConnectorMetadata(KVConnectorMetadata):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)


class ConnectorScheduler:
    """Prefix lookups in ``store`` (a :class:`~kvcodec.store.ChunkStore`) for vLLM's
    scheduler, and the per-step loads and saves for the workers. ``block``: vLLM's block
    size (a divisor of the store's chunk size); ``save``: store what vLLM computes."""

    def __init__(self, store, block: int, save: bool):
        self.store, self.block, self.save = store, block, save
        self.chunk = store.chunk_tokens
        self._pending: dict[str, tuple] = {}     # req_id -> (start, end) to load
        self._blocks: dict[str, list] = {}       # req_id -> block ids so far
        self._prompts: dict[str, list] = {}      # req_id -> prompt token ids
        self._saved: set = set()
        self._salts: dict[str, str] = {}         # req_id -> its cache_salt, if any

    def _store(self, req_id: str):
        """The store as the request's tenant sees it (its ``cache_salt`` in every key)."""
        return self.store.with_salt(self._salts.get(req_id))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        ids = list(request.prompt_token_ids or [])
        salt = getattr(request, "cache_salt", None)
        if salt is not None:
            self._salts[request.request_id] = salt
        cached = self._store(request.request_id).cached_tokens(ids, partial=True)
        # vLLM computes at least one prompt token itself, and loads whole blocks.
        end = min(cached, (len(ids) - 1) // self.block * self.block)
        if end <= num_computed_tokens:
            return 0, False
        self._pending[request.request_id] = (num_computed_tokens, end)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens == 0:
            self._pending.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output) -> KVCodecConnectorMetadata:
        meta = KVCodecConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            self._blocks[new.req_id] = list(new.block_ids[0])
            self._prompts[new.req_id] = list(new.prompt_token_ids or [])
            if new.req_id in self._pending:
                start, end = self._pending.pop(new.req_id)
                # The entries' keys cover whole chunks (or the prompt's partial last
                # one), past `end` for a cut last entry.
                whole = -(-end // self.chunk) * self.chunk
                meta.loads.append(Load(new.req_id, self._prompts[new.req_id][:whole],
                                       list(self._blocks[new.req_id]), start, end,
                                       self._salts.get(new.req_id)))
            done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
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
        return meta

    def _maybe_save(self, meta, req_id: str, done: int) -> None:
        """Once a prompt's prefill completes this step, save its chunks that the store
        lacks, the partial last one included (the same prompt sent again loads all but
        its last block); the worker reads them from the blocks after the forward."""
        ids = self._prompts.get(req_id) or []
        if not self.save or req_id in self._saved or done < len(ids) or not ids:
            return
        self._saved.add(req_id)
        store = self._store(req_id)
        with store.metrics.bookkeeping():  # the request's lookup was counted already
            cached = store.cached_tokens(ids, partial=True)
        if cached < len(ids):
            n_blocks = -(-len(ids) // self.block)
            meta.saves.append(Save(req_id, list(ids), list(self._blocks[req_id][:n_blocks]),
                                   self._salts.get(req_id)))

    def request_finished(self, request, block_ids):
        for d in (self._blocks, self._prompts, self._pending, self._salts):
            d.pop(request.request_id, None)
        self._saved.discard(request.request_id)
        return False, None
