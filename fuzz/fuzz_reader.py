"""Fuzz the .kvc reader and the native decoder on a whole file held in memory.

    python fuzz/fuzz_reader.py [libFuzzer flags] CORPUS_DIR...   (make fuzz runs it)

An input is a .kvc file: it is opened (header, caps, config, tokens, kept bitmap), and,
when its decoded tensors are at most common.DECODE_CAP_BYTES, decoded whole (index,
tables, payload items, native rANS decode, dequantization, RoPE), and for a dense file
with several chunks its last chunk is decoded again, placed at another position. A
larger file has its index and decode tables read and checked instead.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

with common.instrumented(__name__ == "__main__"):
    import kvcodec  # noqa: E402


def target(data: bytes, budget: common.Budget) -> None:
    with kvcodec.open(data) as f:
        out = common.decoded_bytes(f)
        if out > common.DECODE_CAP_BYTES:
            f.sections.index()
            f.sections.decode_tables()
            return
        budget.allow(out, "decoded tensors")
        kv = f.decode(threads=1)
        common.check_decoded(f, kv)
        if f.num_chunks > 1 and not f.evicted:
            last = f.num_chunks - 1
            part = f.decode(last, threads=1, position_offset=f.position_offset + 5)
            common.check_decoded(f, part, last)


TestOneInput = common.harness(target)

if __name__ == "__main__":
    import mutate
    common.main(TestOneInput, mutate.mutate_kvc)
