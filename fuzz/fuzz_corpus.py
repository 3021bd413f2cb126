"""Fuzz the precompute job's corpus reader: JSONL, Parquet and text files, plain or
gzip / bz2 / xz / zstd compressed.

    python fuzz/fuzz_corpus.py [libFuzzer flags] CORPUS_DIR...   (make fuzz runs it)

An input is a mode byte (common.corpus_unmode: the file's kind, its compression, whether
an id field is asked for) then the file's bytes. The file is written under a temp
directory with the matching name (``doc.jsonl.zst``...) and read as a job reads it:
``Corpus(path)``, iterated, and ``count()``. The reader's contract: a Document or a
Skipped for every row or file (raising only for input resolution, a missing pyarrow and
I/O failures, none of which an input here can cause), and ``count()`` equal to what
iterating yields. The budget counts the decompressed bytes as output.
"""
import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pyarrow.parquet  # noqa: E402,F401 - imported up front: not an input's memory

with common.instrumented(__name__ == "__main__", include=("kvcodec.jobs.corpus",)):
    from kvcodec.jobs.corpus import Corpus, Document, Skipped  # noqa: E402

_DIR = tempfile.mkdtemp(prefix="kvcodec-fuzz-corpus-")
atexit.register(shutil.rmtree, _DIR, True)


def target(data: bytes, budget: common.Budget) -> None:
    if not data:
        return
    kind, comp, id_field = common.corpus_unmode(data[0])
    body = data[1:]
    plain = common.decompress(comp, body, common.DECODE_CAP_BYTES)
    budget.allow(len(plain) if plain is not None else 0, "decompressed bytes",
                 common.TIME_PER_TEXT_BYTE_S)
    path = os.path.join(_DIR, "doc" + common.CORPUS_EXT[kind] + common.CORPUS_SUFFIX[comp])
    with open(path, "wb") as f:
        f.write(body)
    try:
        corpus = Corpus(path, id_field="id" if id_field else None)
        got = list(corpus)
        count = corpus.count()
    finally:
        os.unlink(path)
    assert all(isinstance(x, (Document, Skipped)) for x in got), got
    assert count == len(got), (count, len(got))
    for x in got:
        if isinstance(x, Document):
            assert isinstance(x.text, str) and x.text.strip() and isinstance(x.id, str)


TestOneInput = common.harness(target)

if __name__ == "__main__":
    import mutate
    common.main(TestOneInput, mutate.mutate_corpus)
