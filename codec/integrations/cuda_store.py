"""A store's prefix decoded on the GPU: its entries fetched and checked as the CPU path
fetches them (:func:`kvcodec.store.batch.fill`), then decoded in one launch
(:func:`kvcodec.integrations.cuda.prepare_many`) straight into cache buffers on the GPU,
in their dtype. Entries coded with the store's shared tables share one set of device
tables (built once per process and device), so the launch decodes each stream of all the
entries together, as it decodes the chunks of one file.

Measured on an H200 (``bench_cuda.py``, 2,048 tokens as 8 entries, 94 MB of fp16): the
launch takes 3.5-4.2 ms (one file's: 3.0-3.2 ms; entries with tables of their own: 8.7
ms), the whole call 42 ms against the CPU's ``store.fill`` 39 ms on 16 cores in the
same run (244 ms before staging went columnar, :mod:`.cuda_stage`). The rest is host
Python (opening and checking entries, building records), at parity with the CPU rather
than ahead, so :func:`kvcodec.integrations.hf.cache_from_store` still decodes on the CPU
and copies to the model's device."""
from __future__ import annotations

from ..store.batch import open_prefix
from . import cuda


def fill(store, bufs, token_ids, locs, kernel: str = "auto") -> int:
    """Decode the entries ``locs`` (consecutive chunks of ``token_ids`` from token 0, as
    :meth:`ChunkStore.lookup` gives them) into ``bufs``, per layer ``(keys, values)``
    ``[1, kv_heads, capacity, head_dim]`` on one GPU, up to the first entry that is
    missing or damaged (reported as the CPU path reports it: damage moves it aside);
    returns the number of tokens filled."""
    files, spans, n = open_prefix(store, token_ids, locs)
    try:
        if not n:
            return 0
        k0 = bufs[0][0]
        parts = [cuda.Part(cuda.DeviceFile(f, k0.device),
                           out=[(k[:, :, a:b], v[:, :, a:b]) for k, v in bufs])
                 for f, (a, b) in zip(files[:n], spans[:n])]
        run = cuda.prepare_many(parts, dtype=k0.dtype, kernel=kernel)
        run.launch()
        _, errors = run.finish(errors=True)
        n = next((i for i, e in enumerate(errors) if e is not None), n)
        if n < len(errors):
            store.quarantine(locs[n], errors[n], getattr(files[n], "identity", None))
    finally:
        for f in files:
            if f is not None:
                f.close()
    return spans[n - 1][1] if n else 0
