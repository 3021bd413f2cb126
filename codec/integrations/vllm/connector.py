"""The V1 KV connector vLLM loads: a facade that builds the side its role needs
(:class:`ConnectorScheduler` in the scheduler, :class:`ConnectorWorker` in each worker)
and forwards vLLM's calls to it."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from ...errors import ConfigError
from ...models.fingerprint import fingerprint_dir
from ...store import ChunkStore
from .metrics import KVCodecPromMetrics, KVCodecStats, export_on_port
from .scheduler import ConnectorScheduler
from .settings import flag, number
from .subset import SubsetForward
from .worker import ConnectorWorker

log = logging.getLogger("kvcodec")


@functools.cache
def model_anchor(model_dir: Path) -> list:
    """The default anchor of the served model's tokenizer (blends that name none)."""
    from transformers import AutoTokenizer

    from ...models.capture import default_anchor

    return default_anchor(AutoTokenizer.from_pretrained(str(model_dir)))


class KVCodecConnector(KVConnectorBase_V1):
    """See :mod:`kvcodec.integrations.vllm`. ``kv_connector_extra_config`` keys: ``store``
    (the store directory or fsspec URL, required), ``storage_options`` (for a URL's
    filesystem), ``config`` (codec config for new chunks, default ``default``),
    ``threads`` (decoder threads, default all cores), ``save`` (default true),
    ``blend_rows_only`` (selective blends run only the recomputed rows after the check
    layer, :mod:`.subset`: eager engines, tested architectures; default false),
    ``load_timeout_s`` (how long a step waits for the store's entries before vLLM
    recomputes the rest, default 5), ``max_pending_save_mb`` (K/V copies queued for
    encoding at most, default 1024), ``max_bytes`` and ``ttl_s`` (the store's capacity
    and entries' lifetime, :class:`~kvcodec.store.ChunkStore`'s ``max_bytes`` and
    ``ttl``; default none), ``metrics_port`` (also serve the store's ``kvcodec_*``
    metrics at ``http://0.0.0.0:PORT/metrics`` from the worker's process; default
    none), ``overlap_loads`` (true: decode beside the forward pass, layer by layer;
    false: before it; ``auto``, the default: beside it unless the model computes on every
    core of the CPU, :func:`.cpu.overlap_loads`), ``recompute_last_tokens`` (the last
    prompt tokens vLLM computes even where the store holds them: default 64 for a lossy
    config, 1 for ``lossless``; :func:`kvcodec.store.tails.reuse_end`), ``whole_blocks``
    (true: loads end on a vLLM block boundary; default false: anywhere, mid-block). A
    request's ``cache_salt`` is part of its keys: tenants of different salts share no
    entry. Blended requests (RAG documents cached independently, reused at any position)
    name their segments in ``kv_transfer_params``: :mod:`.blending`.

    Metrics: both sides report their store's metrics through vLLM's connector stats
    (:meth:`get_kv_connector_stats`), which vLLM's ``/metrics`` exports as
    ``vllm:kvcodec_*`` (:mod:`.metrics`) while it logs stats (``vllm serve``'s
    default): the scheduler side's lookups and hit tokens, the worker side's reads,
    load latencies (open, decode, write into the paged cache), failures by cause
    (``timeout``: not delivered within ``load_timeout_s``), saves queued, written and
    dropped, and encodes."""

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
        if vllm_config.cache_config.cache_dtype not in ("auto", None):
            raise ConfigError("KVCodecConnector works on unquantized paged caches; drop "
                              f"kv_cache_dtype={vllm_config.cache_config.cache_dtype}")
        fp = fingerprint_dir(model_dir)
        store = ChunkStore(root, fp, extra.get_from_extra_config("config", "default"),
                           extra.get_from_extra_config("storage_options", None),
                           max_bytes=number(extra, "max_bytes", None, minimum=0, above=True,
                                            integer=True),
                           ttl=number(extra, "ttl_s", None, minimum=0, above=True))
        self.store = store
        store.metrics.interval()  # from now on it keeps latencies for vLLM's stats
        block = int(vllm_config.cache_config.block_size)
        if store.chunk_tokens % block:
            raise ConfigError(f"the store's chunks of {store.chunk_tokens} tokens are not a "
                              f"whole number of vLLM blocks of {block}; use a block size "
                              f"that divides {store.chunk_tokens}")
        save = flag(extra, "save", True)
        self.scheduler = self.worker = None
        if role == KVConnectorRole.SCHEDULER:
            recent = number(extra, "recompute_last_tokens", None, minimum=0, integer=True)
            pc = vllm_config.parallel_config  # one worker, in the scheduler's process
            beside = pc.world_size == 1 and pc.distributed_executor_backend in ("uni", None)
            self.scheduler = ConnectorScheduler(
                store, block, save, bool(vllm_config.cache_config.enable_prefix_caching),
                lambda: model_anchor(model_dir), recent, flag(extra, "whole_blocks", False),
                flag(extra, "hold_reads", beside))
        else:
            self.worker = ConnectorWorker(
                store, fp, block, number(extra, "threads", 0, minimum=0, integer=True), save,
                number(extra, "load_timeout_s", 5.0, minimum=0),
                int(number(extra, "max_pending_save_mb", 1024, minimum=0) * (1 << 20)))
            overlap = extra.get_from_extra_config("overlap_loads", "auto")
            self.worker.overlap = ("auto" if overlap in ("auto", None)
                                   else flag(extra, "overlap_loads", True))
            if flag(extra, "blend_rows_only", False):  # selective blends
                if vllm_config.model_config.enforce_eager:
                    self.worker.subset = SubsetForward(self.worker)
                else:
                    log.warning("kvcodec vLLM: blend_rows_only needs enforce_eager (a "
                                "compiled model would not see it); every row is computed")
        port = number(extra, "metrics_port", None, minimum=0, maximum=65535, integer=True)
        if port is not None:
            export_on_port(store, port, serve=self.worker is not None)

    # -- scheduler side ---------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids):
        return self.scheduler.request_finished(request, block_ids)

    # -- worker side --------------------------------------------------------------------
    def register_kv_caches(self, kv_caches):
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._get_connector_metadata(), forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        # Whole requests are saved in wait_for_save, after every layer has run; here a
        # selective blend's check layer picks the tokens to recompute.
        self.worker.save_kv_layer(layer_name)

    def wait_for_save(self):
        self.worker.wait_for_save(self._get_connector_metadata()
                                  if self.has_connector_metadata() else None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def shutdown(self):
        if self.worker is not None:
            self.worker.shutdown()

    # -- metrics (both sides; vLLM collects them after every step) -----------------------
    def get_kv_connector_stats(self) -> KVCodecStats | None:
        """What this side's store did since the last call (None: nothing)."""
        data = self.store.metrics.interval()
        return KVCodecStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict | None = None) -> KVCodecStats:
        return KVCodecStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames,
                           per_engine_labelvalues) -> KVCodecPromMetrics:
        return KVCodecPromMetrics(vllm_config, metric_types, labelnames,
                                  per_engine_labelvalues)

    # Counters and save barrier of the worker side (tests, benchmarks).
    @property
    def bytes_read(self) -> int:
        return self.worker.bytes_read

    @property
    def tokens_loaded(self) -> int:
        return self.worker.tokens_loaded

    @property
    def tokens_shared(self) -> int:
        return self.worker.tokens_shared

    @property
    def blocks_failed(self) -> int:
        return self.worker.blocks_failed

    def flush(self) -> None:
        """Wait until every save this worker queued is written."""
        self.worker.flush()
