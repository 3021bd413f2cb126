"""Integrations: decoded caches delivered where inference runs. ``hf`` builds Hugging
Face transformers caches (eager, layer-wise, reserved buffers; a store's cached prefix:
``cache_from_store``, ``prefill_with_store``); ``adapt`` picks a quality level or
recomputation per chunk within a TTFT budget; ``ragged`` loads evicted caches, where
each KV head keeps its own tokens, with a per-head attention mask
(``ragged.ragged_cache``); ``cuda`` decodes on the GPU into contiguous or paged
destinations, ``cuda_store`` a store's prefix there in one launch; ``vllm`` is a V1 KV connector serving a store into vLLM's paged cache
(prefixes, and RAG documents blended at any position).

Submodules are imported on demand (each pulls in a heavy framework). May import
``kvcodec.core``, ``kvcodec.format``, ``kvcodec.models``, ``kvcodec.store``,
``kvcodec.blend`` (the vLLM connector blends documents with its selectors) and
``kvcodec.errors``.
"""
