"""The native bindings against hostile arguments (issue 27, item 3).

The coder runs on raw pointers with the GIL released and on worker threads, so three
things must hold at the binding: whatever it reads or writes stays alive for the whole
call, and outputs are the caller's own arrays, never converted copies; buffers are read
as their strides say; and a size that would overflow, or an exception in a worker
thread, becomes a Python exception rather than a crash. Checks that crashed the process
before the fix run in a subprocess, so that a regression fails the test instead of
killing pytest.
"""
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import kvcodec
import numpy as np
import pytest

from kvcodec import _native as nat
from kvcodec.core import tables

INT_MAX = 2**31 - 1


def coded(rows=64, channels=20, alphabet=8, chunk=16, seed=0):
    """Symbols [rows, channels], their tables and their blobs."""
    rng = np.random.default_rng(seed)
    sym = rng.integers(0, alphabet - 3, (rows, channels)).astype(np.uint8)
    freqs = nat.normalize_freqs(tables.levels_from_counts(tables.channel_counts(sym, alphabet)))
    return sym, freqs, nat.encode(sym, freqs, chunk)


def run_isolated(*parts: str, timeout: int = 300) -> None:
    """Run the code `parts` in a fresh interpreter (with `coded` and the imports above)
    and require that it exits cleanly after printing OK: a crash takes down only that
    interpreter."""
    import inspect

    code = "\n".join(["import numpy as np", "from kvcodec import _native as nat",
                      "from kvcodec.core import tables", inspect.getsource(coded)]
                     + [textwrap.dedent(p) for p in parts] + ["print('OK')"])
    env = dict(os.environ)
    here = str(Path(kvcodec.__file__).parent.parent)  # where this kvcodec is imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, env=env)
    ok = r.returncode == 0 and r.stdout.strip().endswith("OK")
    assert ok, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"


# -- 1. lifetimes: outputs are the caller's arrays, inputs live until the call returns --

@pytest.mark.parametrize("kind", ["list", "array-like"])
def test_a_decode_output_that_is_not_an_array_is_refused(kind):
    """A nested list of uint8 scalars, or an object whose __array__ makes a new uint8
    array, converts to a temporary array that passes every other check; the decode (GIL
    released) then wrote into that temporary after it was freed, and the caller never
    saw a value. Before the fix: [None] returned, heap corrupted (the list: SIGSEGV on
    the way out; the array-like: SIGSEGV in the next allocation)."""
    run_isolated(f"""
        class Fresh:
            def __array__(self, dtype=None, copy=None):
                return np.zeros((64, 20), np.uint8)

        sym, freqs, blobs = coded()
        out = ([[np.uint8(0)] * sym.shape[1] for _ in range(sym.shape[0])]
               if {kind!r} == "list" else Fresh())
        try:
            nat.decode_many([(blobs, freqs, out)], 16)
        except ValueError as e:
            assert "out: expected a NumPy array" in str(e), e
        else:
            raise SystemExit("a non-array was accepted as the output")
        [np.zeros(1 << k, np.uint8) for k in range(22)]  # allocations see a corrupt heap
    """)


@pytest.mark.parametrize("bad", ["dtype", "strided", "read-only", "shape"])
def test_decode_outputs_must_be_writable_c_contiguous_uint8_arrays(bad):
    """Every other bad output is refused before anything is written (as before the fix:
    these guard the checks that the fix kept)."""
    sym, freqs, blobs = coded()
    out = {
        "dtype": np.zeros(sym.shape, np.int16),
        "strided": np.zeros((sym.shape[0], 2 * sym.shape[1]), np.uint8)[:, ::2],
        "read-only": np.zeros_like(sym),
        "shape": np.zeros((sym.shape[0] + 16, sym.shape[1]), np.uint8),
    }[bad]
    if bad == "read-only":
        out.flags.writeable = False
    with pytest.raises(ValueError, match="out|blobs"):
        nat.decode_many([(blobs, freqs, out)], 16)


def test_stream_inputs_refuses_one_layer_twice():
    """Two layers' jobs writing the same rows of `out` at once are a data race (the
    result depends on which thread ends last). Before the fix: accepted."""
    xs = [np.ones((2, 4, 8), np.float32), np.full((2, 4, 8), 2, np.float32)]
    out = np.zeros((3, 4, 16), np.float32)
    with pytest.raises(ValueError, match="twice"):
        nat.stream_inputs(xs, out, [1, 1], None, None, 1.0, 2)
    assert nat.stream_inputs(xs, out, [2, 0], None, None, 1.0, 2)
    assert (out[2] == 1).all() and (out[0] == 2).all() and (out[1] == 0).all()


def vanishing(storage: np.ndarray, scribble, log: list) -> np.ndarray:
    """A new view of `storage` that overwrites storage with `scribble` once it is freed:
    a binding that lets it die before the coder (GIL released) reads it reads the
    scribble. `log` records that it was freed at all."""
    view = storage.view()

    def scribble_over():
        storage[...] = scribble
        log.append("freed")
    weakref.finalize(view, scribble_over)
    return view


class Vanishing:
    """An array-like converted by the binding into a temporary (a vanishing view)."""

    def __init__(self, storage, scribble, log):
        self.storage, self.scribble, self.log = storage, scribble, log

    def __array__(self, dtype=None, copy=None):
        return vanishing(self.storage, self.scribble, self.log)


def transient(*parts):
    """A one-shot iterable of `parts` that nothing else holds: the binding's tuple of it
    is the only owner of what is in it."""
    return (p for p in list(parts))


def _lifetime_case(case, log):
    """Runs one binding with an input that vanishes when the binding drops it; returns
    (got, expected)."""
    sym, freqs, blobs = coded()
    out = np.zeros_like(sym)
    if case == "decode freqs":
        errs = nat.decode_many([(blobs, Vanishing(freqs.copy(), 0, log), out)], 16)
        return (errs, out), ([None], sym)
    if case == "decode item":
        item = transient(blobs, vanishing(freqs.copy(), 0, log), out)
        errs = nat.decode_many([item], 16)
        return (errs, out), ([None], sym)
    if case == "decode tables":
        built = nat.build_decode_tables([freqs, Vanishing(freqs.copy(), 0, log)], 2)
        errs = nat.decode_many([(blobs, built[1], out)], 16)
        return (errs, out), ([None], sym)
    if case == "encode symbols":
        got = nat.encode_many([(sym, freqs), (Vanishing(sym.copy(), 255, log), freqs)], 16, 2)
        return got, [blobs, blobs]
    if case == "encode freqs":
        got = nat.encode_many([(sym, freqs), (sym, Vanishing(freqs.copy(), 0, log))], 16, 2)
        return got, [blobs, blobs]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["decode freqs", "decode item", "decode tables",
                                  "encode symbols", "encode freqs"])
def test_inputs_stay_alive_until_the_call_returns(case):
    """Before the fix each input here was freed before the coder read it (a converted
    temporary, or an array only the binding's temporary tuple held): the decodes read
    zeroed tables ('blob 0: truncated word stream') and the encodes scribbled symbols or
    zeroed tables (ValueError: '... has zero frequency in its table')."""
    log = []
    got, expected = _lifetime_case(case, log)
    assert log, "the input was never freed: the test did not exercise anything"
    if isinstance(expected, tuple):
        assert got[0] == expected[0]
        np.testing.assert_array_equal(got[1], expected[1])
    else:
        assert got == expected


def test_dequantizer_arguments_stay_alive_until_the_call_returns():
    """The fused dequantizer's arrays were borrowed from a tuple the binding let go of
    before decoding: a one-shot item's step grid was freed (here: overwritten with NaN)
    before the decoder read it. Before the fix: NaN values came out."""
    rng = np.random.default_rng(4)
    rows, heads, head_dim, r = 40, 2, 16, 7
    c = heads * head_dim
    sym = np.concatenate([rng.integers(0, 2 * r + 1, (rows, c)),
                          rng.integers(0, 256, (rows, 1))], 1).astype(np.uint8)
    freqs = nat.normalize_freqs(tables.levels_from_counts(tables.channel_counts(sym, 256)))
    blobs = nat.encode(sym, freqs, 16)
    grid = np.geomspace(1e-3, 10, 256).astype(np.float32)
    mult = rng.uniform(0.5, 2, c).astype(np.float32)
    ref = np.zeros((heads, rows, head_dim), np.float32)
    assert nat.decode_many([(blobs, freqs, sym.shape,
                             (grid, mult, r, heads, ref, None, None))], 16) == [None]
    log = []
    out = np.zeros_like(ref)
    deq = transient(vanishing(grid.copy(), np.nan, log), mult, r, heads, out, None, None)
    assert nat.decode_many([transient(blobs, freqs, sym.shape, deq)], 16) == [None]
    assert log
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


# -- 2. strides --------------------------------------------------------------------------

def _two_packings():
    """A buffer holding two valid packings of one row over 4 symbols, laid out so that
    its strided views read one (P1, levels 63 63) and a reader that ignores the stride
    reads the other (P2, levels 63 59) from the same start."""
    p1, p2 = [0, 1, 1, 1], [0, 1, 1, 5]
    forward = np.array([0, 1, 1, 5, 1, 0, 1], np.uint8)  # [::2] is P1, [:4] is P2
    backward = np.array(p1[::-1] + p2[1:], np.uint8)     # [3::-1] is P1, [3:7] is P2
    return p1, p2, forward, backward


def test_unpack_levels_honours_strides():
    """Before the fix unpack_levels read `size` bytes on from the buffer's pointer: a
    strided view decoded as the other packing (levels 63, 59 instead of 63, 63), and a
    reversed one read past its end."""
    p1, _, forward, backward = _two_packings()
    expected = nat.unpack_levels(bytes(p1), 1, 4)
    np.testing.assert_array_equal(expected, [[63, 63, 0, 0]])
    for view in (forward[::2], backward[3::-1], memoryview(forward.tobytes())[::2]):
        assert bytes(view) == bytes(p1)
        np.testing.assert_array_equal(nat.unpack_levels(view, 1, 4), expected)
        np.testing.assert_array_equal(tables.unpack_levels(view, 1, 4), expected)


def test_unpack_levels_of_a_strided_view_of_a_real_packing():
    rng = np.random.default_rng(9)
    levels = np.zeros((30, 256), np.uint8)
    for row in levels:
        lo = int(rng.integers(0, 200))
        row[lo:lo + 20] = rng.integers(1, 64, 20)
    packed = np.frombuffer(tables.pack_levels(levels), np.uint8)
    wide = np.zeros(2 * len(packed), np.uint8)
    wide[::2] = packed
    np.testing.assert_array_equal(nat.unpack_levels(wide[::2], 30, 256), levels)
    np.testing.assert_array_equal(nat.unpack_levels(packed[::-1].copy()[::-1], 30, 256),
                                  levels)


# -- 3. sizes and worker threads ----------------------------------------------------------

def test_a_chunk_size_near_int_max_codes_one_chunk_per_stream():
    """(rows + chunk - 1) / chunk overflowed int: a chunk of 2^31 - 1 tokens gave 0
    chunks for 64 rows and -1 for 2 rows. Before the fix encode() returned no blob at all
    (where this test stopped), and encode_many on two threads resized a vector to -1
    entries in a worker, whose std::length_error aborted the process (SIGABRT)."""
    run_isolated(f"""
        sym, freqs, blobs = coded()
        one = nat.encode(sym, freqs, {INT_MAX})
        assert len(one) == 1, len(one)
        out = np.zeros_like(sym)
        assert nat.decode_many([(one, freqs, out)], {INT_MAX}) == [None]
        assert (out == sym).all()
        got = nat.encode_many([(sym[:2], freqs), (sym[:3], freqs)], {INT_MAX}, 2)
        assert [len(b) for b in got] == [1, 1], got
        assert got == [nat.encode(sym[:2], freqs, 64), nat.encode(sym[:3], freqs, 64)]
    """)


def test_rows_beyond_int_are_refused_before_any_thread_starts():
    """An array of 2^31 rows (virtual memory, never touched) had its row count cast to a
    negative int. Before the fix the chunk count came out negative and the workers threw
    std::length_error: the process aborted (SIGABRT)."""
    run_isolated(f"""
        sym, freqs, blobs = coded(channels=1)
        huge = np.empty(({INT_MAX} + 1, 1), np.uint8)
        try:
            nat.encode_many([(huge, freqs), (huge, freqs)], 256, 2)
        except ValueError as e:
            assert "symbols: rows" in str(e), e
        else:
            raise SystemExit("2^31 rows were accepted")
    """)


def test_max_encoded_size_refuses_sizes_that_overflow():
    """Before the fix the bound wrapped around 2^64: max_encoded_size(2^62, 4) was 96."""
    assert nat.max_encoded_size(256, 129) == 64 + 2 * 256 * 129 + 32
    with pytest.raises(ValueError, match="overflows"):
        nat.max_encoded_size(2**62, 4)
    with pytest.raises(ValueError, match="overflows"):
        nat.max_encoded_size(2**63, 1)


LIMIT_MEMORY = """
    import resource

    def limit_address_space(extra_mib):
        # Only `extra_mib` more of address space from here on: a new thread's stack
        # or a large buffer beyond that fails (std::system_error, std::bad_alloc).
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                size = int(line.split()[1]) * 1024
        limit = size + (extra_mib << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
"""


def test_an_exception_in_a_worker_thread_becomes_a_python_exception():
    """Two encodes on two threads that each need a 64 MiB buffer with 40 MiB of address
    space left. Before the fix the worker's std::bad_alloc escaped its std::thread:
    std::terminate aborted the process (SIGABRT)."""
    run_isolated(LIMIT_MEMORY, """
        rows = 1 << 20
        sym = np.ones((rows, 64), np.uint8)
        sym[::7] = 0
        freqs = nat.normalize_freqs(tables.levels_from_counts(tables.channel_counts(sym[:64], 2)))
        limit_address_space(40)
        try:
            nat.encode_many([(sym, freqs), (sym, freqs)], rows, 2)
        except MemoryError:
            pass
        else:
            raise SystemExit("the encodes fitted: the test did not exercise anything")
    """)


def test_a_thread_that_cannot_start_leaves_its_work_to_the_others():
    """64 decode threads asked for with room for a few of their stacks. Before the fix
    the failed std::thread constructor threw while started threads were still joinable:
    std::terminate aborted the process (SIGABRT). Now the decode completes."""
    run_isolated(LIMIT_MEMORY, """
        sym, freqs, blobs = coded()
        outs = [np.zeros_like(sym) for _ in range(64)]
        limit_address_space(48)
        assert nat.decode_many([(blobs, freqs, o) for o in outs], 16, 64) == [None] * 64
        assert all((o == sym).all() for o in outs)
    """)


# -- the CUDA binding (checks that run before anything reaches a device) ------------------

def test_cuda_decode_refuses_a_negative_first_row():
    """The kernel dequantizes rows [first_row, rows): a negative first_row read symbols
    and wrote values before the buffers. Before the fix it was staged and launched (with
    no GPU: RuntimeError from the copy instead of this ValueError)."""
    cuda = pytest.importorskip("kvcodec._cuda")
    from kvcodec.integrations.cuda_stage import item_dtype

    item = dict(blob=0, size=64, rows=4, channels=3, symbol_table=0, range_table=0,
                symbols=0, dst=1, dtype=2, heads=1, head_dim=2, half_range=7, grid=0,
                mult=0, cos=0, sin=0, stride_head=8, stride_token=2, stride_dim=1,
                first_row=-1)
    dt = item_dtype(tuple(cuda.DECODE_ITEM_FIELDS.items()), cuda.DECODE_ITEM_BYTES)
    records = np.array([tuple(item.get(name, 0) for name in dt.names)], dtype=dt)
    with pytest.raises(ValueError, match="first_row"):
        cuda.stage_decode(records, 0, 1 << 20, 0)
    with pytest.raises(ValueError, match="DecodeItem records"):  # not records of its layout
        cuda.stage_decode(np.zeros(3, dtype=np.int64), 0, 1 << 20, 0)
