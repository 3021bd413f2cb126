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


