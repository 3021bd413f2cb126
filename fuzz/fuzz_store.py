"""Fuzz the chunk store's entry opener: an entry whose bytes are the input, in a store
directory of the model common.STORE_FP.

    python fuzz/fuzz_store.py [libFuzzer flags] CORPUS_DIR...   (make fuzz runs it)

The input is written as an entry of a local ChunkStore (a temp directory) and read back
as each consumer of the store reads it, with the token ids common.STORE_IDS at the
position its header claims: a prefix chunk through ``read_chunk`` (transformers and
adapt loading: a damaged entry is moved aside and False returned, never raised), a
document chunk behind an anchor through ``open_entry(..., anchor)`` + ``decode_into`` at
another position (blending), an evicted entry through ``open_entry`` + ``decode``.
"""
import atexit
import json
import logging
import os
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

with common.instrumented(__name__ == "__main__"):
    import torch  # noqa: E402

    from kvcodec.store.chunks import ChunkStore  # noqa: E402

if __name__ == "__main__":  # a damaged entry is moved aside with a warning: not printed
    logging.getLogger("kvcodec").addHandler(logging.NullHandler())
    logging.getLogger("kvcodec").propagate = False

_ROOT = tempfile.mkdtemp(prefix="kvcodec-fuzz-store-")
atexit.register(shutil.rmtree, _ROOT, True)
STORE = ChunkStore(_ROOT, common.STORE_FP, {"name": "fuzz", "chunk_tokens": 8,
                                             "key": [{"quantizer": {"type": "lossless"}}],
                                             "value": [{"quantizer": {"type": "lossless"}}]})
LOC = STORE.path(STORE.keys(common.STORE_IDS)[0])
LOC.parent.mkdir(parents=True, exist_ok=True)


def _claims(data: bytes) -> dict:
    """The header's JSON as the entry claims it (unchecked: only to pick which tokens to
    ask for), or {}."""
    try:
        hlen = struct.unpack_from("<I", data, 12)[0]
        header = json.loads(data[24:24 + hlen])
        return header if isinstance(header, dict) else {}
    except (struct.error, ValueError, RecursionError):
        return {}


def _int(v, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def target(data: bytes, budget: common.Budget) -> None:
    LOC.write_bytes(data)
    h = _claims(data)
    anchor = h.get("anchor")
    anchor = anchor if isinstance(anchor, list) else None
    n = max(0, _int(h.get("num_tokens"), 8))
    t0 = min(max(0, _int(h.get("position_offset"), 0) - len(anchor or ())), len(common.STORE_IDS))
    ids = common.STORE_IDS[t0:t0 + n]
    fp = common.STORE_FP
    if h.get("evicted") is not None:
        with STORE.open_entry(LOC, ids, t0, anchor) as f:
            out = common.decoded_bytes(f)
            if out <= common.DECODE_CAP_BYTES:
                budget.allow(out, "decoded tensors")
                common.check_decoded(f, f.decode(threads=1))
        return
    shape = (1, fp["num_kv_heads"], len(ids), fp["head_dim"])
    dst = {l: (torch.empty(shape), torch.empty(shape)) for l in range(fp["num_layers"])}
    if anchor is None:
        STORE.read_chunk(LOC, ids, t0, dst, threads=1)
        return
    with STORE.open_entry(LOC, ids, t0, anchor) as f:
        f.decode_into(dst, threads=1, position_offset=f.position_offset + 3)


TestOneInput = common.harness(target)

if __name__ == "__main__":
    import mutate
    common.main(TestOneInput, mutate.mutate_kvc)
