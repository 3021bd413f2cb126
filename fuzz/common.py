"""What the fuzz harnesses share: instrumentation, the budget check, the contract, and
the constants the seeds and the store harness agree on.

The contract every harness checks: an input either goes through (decodes, opens,
parses) or raises a :class:`kvcodec.errors.KVCodecError` subclass; any other exception
reaches atheris, which reports it as a crash. On top of that, each input must stay
within a memory and time budget proportional to its size (:class:`Budget`); a violation
is an AssertionError, also a crash.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import sys
import time

# Budget: a floor, plus so much per input byte, plus so much per byte of output the input
# legitimately declares (a .kvc file's decoded tensors, which the format caps: a valid file
# of constant K/V decodes to ~6000x its size, so output cannot be held to a ratio of the
# input; a corpus file's decompressed bytes).
MEM_FLOOR = 64 << 20
MEM_PER_INPUT_BYTE = 1024
MEM_PER_OUTPUT_BYTE = 4
TIME_FLOOR_S = 1.0
TIME_PER_INPUT_BYTE_S = 1.0 / (1 << 20)   # 1 s per MiB of input
TIME_PER_OUTPUT_BYTE_S = 50e-9            # 50 ms per MiB of declared output (native decode)
# Output that Python handles byte by byte or line by line (a corpus file's text: JSON
# parsing and checks per line) costs far more per byte: ~12 us for short JSONL lines
# under atheris's instrumentation.
TIME_PER_TEXT_BYTE_S = 20e-6
# Harnesses decode a .kvc file only when its decoded tensors are at most this large (a
# larger one is still opened, and its index and tables are read and checked): a header can
# declare up to the format caps (2**34 elements), which is the reader's contract, not the
# fuzzer's business, and would only make executions slow.
DECODE_CAP_BYTES = 64 << 20

# The store harness's model and token ids; fuzz/seeds.py writes its entries for them
# (STORE_FP is fingerprint() of the tiny LlamaConfig there, checked when seeds are made).
STORE_FP = {
    "architecture": "llama", "model_type": "llama", "num_layers": 2, "num_kv_heads": 1,
    "head_dim": 8, "rope_theta": 10000.0, "rope_type": "default", "sliding_window": None,
    "layer_types": None, "vocab_size": 512, "tokenizer_hash": None, "weights_hash": None,
    "rope": {"style": "half", "kinds": [{"rope_type": "default",
                                         "inv_freq": [1.0, 0.10000000149011612,
                                                      0.009999999776482582,
                                                      0.0010000000474974513],
                                         "scaling": 1.0, "max_position": None}],
             "layers": [0, 0]},
}
STORE_IDS = [(i * 37 + 11) % 512 for i in range(64)]

# Corpus inputs: a mode byte, then the file (see corpus_mode).
CORPUS_KINDS = ("jsonl", "parquet", "text")
CORPUS_COMPRESSIONS = (None, "gzip", "bz2", "xz", "zstd")
CORPUS_SUFFIX = {None: "", "gzip": ".gz", "bz2": ".bz2", "xz": ".xz", "zstd": ".zst"}
CORPUS_EXT = {"jsonl": ".jsonl", "parquet": ".parquet", "text": ".txt"}


def corpus_mode(kind: str, compression: str | None, id_field: bool) -> int:
    return (CORPUS_KINDS.index(kind) + 3 * CORPUS_COMPRESSIONS.index(compression)
            + 15 * int(id_field))


def corpus_unmode(byte: int) -> tuple:
    """``(kind, compression, id_field)`` of a mode byte (any byte is some mode)."""
    m = byte % 30
    return CORPUS_KINDS[m % 3], CORPUS_COMPRESSIONS[(m // 3) % 5], m >= 15


def compress(compression: str | None, data: bytes) -> bytes:
    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "bz2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    import zstandard
    return zstandard.ZstdCompressor(level=3).compress(data)


def decompress(compression: str | None, data: bytes, limit: int = 1 << 20) -> bytes | None:
    """At most ``limit`` decompressed bytes of ``data``, or None where it does not
    decompress (for the mutators, not for the code under test)."""
    if compression is None:
        return data
    try:
        if compression == "gzip":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                return f.read(limit)
        if compression == "bz2":
            return bz2.BZ2Decompressor().decompress(data, limit)
        if compression == "xz":
            return lzma.LZMADecompressor().decompress(data, limit)
        import zstandard
        with zstandard.ZstdDecompressor().stream_reader(data) as r:
            return r.read(limit)
    except Exception:  # noqa: BLE001 - any damage: not decompressible
        return None


def instrumented(active: bool, include=("kvcodec",)):
    """Instrument ``include`` as it is imported, when fuzzing (``active``); a plain
    context otherwise (replaying regression files under pytest, where kvcodec is imported
    already)."""
    if not active:
        return contextlib.nullcontext()
    import atheris
    return atheris.instrument_imports(include=list(include))


def one_thread_native() -> None:
    """Run the native batch calls (table building, decoding) on one thread while fuzzing:
    the same per-item native code, without a thread pool started per call, which here is
    most of a small file's decode time. Only the fuzzing process does this."""
    from kvcodec.core import tables

    real = tables.native()

    class OneThread:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def normalize_many(levels, threads=0):
            return real.normalize_many(levels, threads or 1)

        @staticmethod
        def build_decode_tables(freqs, threads=0):
            return real.build_decode_tables(freqs, threads or 1)

        @staticmethod
        def decode_many(items, chunk_tokens, threads=0):
            return real.decode_many(items, chunk_tokens, threads or 1)

    proxy = OneThread()
    tables.native = lambda: proxy


def _status() -> dict:
    out = {}
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith((b"VmHWM", b"VmRSS")):
                out[line[:5].decode()] = int(line.split()[1]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); False where not
    possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Budget:
    """Peak memory growth and wall time of one input against its budget: a floor plus
    so much per input byte, plus so much per byte of output the target declares with
    :meth:`allow` (see the constants above). Peak RSS is read from ``/proc/self/status``
    after resetting it (``clear_refs``), so each input is measured on its own; where that
    is not possible the process-wide peak (``ru_maxrss``) growth is used, which can only
    under-count."""

    def __init__(self):
        self.exact = sys.platform.startswith("linux") and _reset_peak()
        self.size = self.allowed = 0
        self.allowed_s = 0.0
        self.notes = []

    def _peak_and_now(self):
        if self.exact:
            s = _status()
            return s["VmHWM"], s["VmRSS"]
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak

    def start(self, size: int) -> None:
        self.size, self.allowed, self.allowed_s, self.notes = size, 0, 0.0, []
        if self.exact:
            _reset_peak()
        self.base = self._peak_and_now()[1]
        self.t0 = time.perf_counter()

    def allow(self, nbytes: int, why: str, secs_per_byte: float = TIME_PER_OUTPUT_BYTE_S):
        """Let the input use memory and time for ``nbytes`` of output (``why``: what),
        ``secs_per_byte`` of time each."""
        self.allowed += int(nbytes)
        self.allowed_s += nbytes * secs_per_byte
        self.notes.append(f"{why}: {nbytes} bytes")

    def limits(self) -> tuple:
        mem = max(MEM_FLOOR, MEM_PER_INPUT_BYTE * self.size) + MEM_PER_OUTPUT_BYTE * self.allowed
        secs = max(TIME_FLOOR_S, TIME_PER_INPUT_BYTE_S * self.size) + self.allowed_s
        return mem, secs

    def check(self) -> None:
        secs = time.perf_counter() - self.t0
        growth = self._peak_and_now()[0] - self.base
        mem_limit, time_limit = self.limits()
        if growth > mem_limit:
            raise AssertionError(f"a {self.size}-byte input grew peak RSS by {growth >> 20} MiB, "
                                 f"over its {mem_limit >> 20} MiB budget ({self.notes})")
        if secs > time_limit:
            raise AssertionError(f"a {self.size}-byte input took {secs:.2f} s, over its "
                                 f"{time_limit:.2f} s budget ({self.notes})")


# KVCODEC_FUZZ_STRICT=1: a CorruptError that untrusted() made of a stray Python error
# ("malformed file (TypeError: ...)") is a finding too: validation that is implicit.
STRICT = os.environ.get("KVCODEC_FUZZ_STRICT") == "1"


def harness(target):
    """``TestOneInput`` for ``target(data, budget)``: KVCodecError is an answer, any other
    exception a crash, and the budget is checked either way."""
    budget = Budget()

    def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris's name
        from kvcodec.errors import KVCodecError

        budget.start(len(data))
        try:
            target(data, budget)
        except KVCodecError as exc:
            if STRICT and ": malformed file (" in str(exc):
                raise AssertionError(f"caught only by untrusted(): {exc}") from exc
        budget.check()

    TestOneInput.budget = budget
    return TestOneInput


def decoded_bytes(f) -> int:
    """Bytes of the tensors an open .kvc file decodes to (every layer's span, or an evicted
    file's full positions) in its own dtype."""
    import torch

    return f.numel() * torch.empty((), dtype=f.dtype).element_size()


def check_decoded(f, kv, chunks=None, dtype=None) -> None:
    """A decode returned what the header promises: one (keys, values) pair per layer of
    the file's dtype, the tokens each layer holds within ``chunks`` (evicted: at most the
    span's positions per head)."""
    m = f.meta
    rng = m.chunk_range(chunks)
    dtype = dtype or m.dtype
    assert kv.num_layers == m.num_layers, (kv.num_layers, m.num_layers)
    n = m.span(rng)[1]
    for l in range(m.num_layers):
        for t in (kv.keys[l], kv.values[l]):
            assert t.dtype == dtype, (t.dtype, dtype)
            assert t.shape[0] == 1 and t.shape[1] == m.num_kv_heads and t.shape[3] == m.head_dim, \
                (tuple(t.shape), m.num_kv_heads, m.head_dim)
            if m.evicted:
                assert t.shape[2] <= n, (tuple(t.shape), n)
            else:
                assert t.shape[2] == m.layer_span(l, rng)[1], (tuple(t.shape), l)
    if m.evicted:
        assert kv.kept is not None and len(kv.kept) == m.num_layers


def main(test_one_input, custom_mutator=None) -> None:
    """Fuzz ``test_one_input`` (libFuzzer flags and corpus directories in ``sys.argv``)."""
    import atheris

    one_thread_native()
    kwargs = {} if custom_mutator is None else {"custom_mutator": custom_mutator}
    # libFuzzer re-runs argv[0] in a shell for -minimize_crash and -merge: the interpreter too.
    argv = [f"{sys.executable} {os.path.abspath(sys.argv[0])}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input, **kwargs)
    atheris.Fuzz()


def here(*parts) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts)
