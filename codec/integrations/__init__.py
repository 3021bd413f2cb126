"""Integrations: decoded caches delivered where inference runs. ``hf`` builds Hugging
Face transformers caches (eager, layer-wise, reserved buffers); ``ragged`` loads evicted
caches, where each KV head keeps its own tokens, with a per-head attention mask
(``ragged.ragged_cache``); ``cuda`` decodes on the GPU into contiguous or paged
destinations.

Submodules are imported on demand (each pulls in a heavy framework). May import
``kvcodec.core``, ``kvcodec.format``, ``kvcodec.models`` and ``kvcodec.errors``.
"""
