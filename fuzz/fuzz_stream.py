"""Fuzz the streaming reader: a .kvc file read from a forward-only source as its bytes
arrive (StreamBuffer), decoded chunk by chunk by ChunkStreamer.

    python fuzz/fuzz_stream.py [libFuzzer flags] CORPUS_DIR...   (make fuzz runs it)

An input is a .kvc file, delivered by a reader without ``seek`` in reads of a size drawn
from the input's CRC (1 byte to 4 KiB, so header, sections and payload items straddle
reads differently). A dense file is decoded with ``iter_chunks`` (each chunk's items read
and checked while the previous decode runs), which must yield every chunk once, in order,
with the token ranges of the file; an evicted file is decoded whole from the stream.
"""
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

with common.instrumented(__name__ == "__main__"):
    import kvcodec  # noqa: E402

STEPS = (1, 7, 64, 509, 4096)


class Trickle:
    """A forward-only source: ``read(n)`` returns at most ``step`` bytes."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.at = data, step, 0

    def read(self, n: int = -1) -> bytes:
        n = self.step if n is None or n < 0 else min(n, self.step)
        out = self.data[self.at:self.at + n]
        self.at += len(out)
        return out


def target(data: bytes, budget: common.Budget) -> None:
    step = STEPS[zlib.crc32(data) % len(STEPS)]
    with kvcodec.open(Trickle(data, step)) as f:
        assert f.streaming
        out = common.decoded_bytes(f)
        if out > common.DECODE_CAP_BYTES:
            f.sections.index()
            f.sections.decode_tables()
            return
        budget.allow(out, "decoded tensors")
        if f.evicted:
            common.check_decoded(f, f.decode(threads=1))
            return
        cache = f.empty_cache()
        seen = []
        for c, t0, t1 in f.iter_chunks(out=cache, threads=1):
            seen.append(c)
            want = f.meta.span(range(c, c + 1))
            assert (t0, t1 - t0) == want, ((c, t0, t1), want)
        assert seen == list(range(f.num_chunks)), seen
        common.check_decoded(f, cache)


TestOneInput = common.harness(target)

if __name__ == "__main__":
    import mutate
    common.main(TestOneInput, mutate.mutate_kvc)
