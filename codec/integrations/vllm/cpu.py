"""vLLM's CPU backend on the machine at hand: the dtype that runs fast here, and the
threading a small machine needs.

- **dtype**: bfloat16 matmuls are fast only on CPUs with AVX-512 BF16 (or AMX); elsewhere
  they are emulated and a 2,000-token prefill takes ~10x longer than in float32.
  :func:`fast_dtype` says which to use, and why.
- **threads**: vLLM reserves cores for its scheduler process (one per rank, one more
  with a KV connector), and on a machine with that many cores or fewer it warns
  ("Selected CPU core number (2) should be greater than reserved CPU core number (2)")
  and runs the model on one thread. :func:`cpu_env` reserves none on such machines
  (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``), so the model gets every core; set the variable
  yourself to override it.
- **the connector's own threads** (its fetches, saves and loader) run torch on one thread
  (:func:`torch_one_thread`), and where the model computes on every core the connector
  loads before the forward pass instead of beside it (:func:`overlap_loads`).
"""
from __future__ import annotations

import os
import threading

SMALL_MACHINE_CORES = 4


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_dtype() -> tuple:
    """``(dtype, why)``: ``"bfloat16"`` where the CPU computes it natively, else
    ``"float32"``."""
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bfloat16", "the CPU has " + "/".join(sorted(flags & {"avx512_bf16", "amx_bf16"}))
    return "float32", "the CPU has no AVX-512 BF16 or AMX: bfloat16 would be emulated"


def cpu_env(environ=None) -> dict:
    """The vLLM CPU settings for this machine, set in ``environ`` (default
    ``os.environ``) unless already there; returns what applies. On a machine of at most
    :data:`SMALL_MACHINE_CORES` cores no core is reserved for vLLM's scheduler."""
    env = os.environ if environ is None else environ
    cores = os.cpu_count() or 1
    if cores <= SMALL_MACHINE_CORES:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return {"cores": cores,
            "reserved_cores": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vLLM's default"),
            "omp_threads_bind": env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}


def torch_one_thread() -> None:
    """Make torch single-threaded in the calling thread, one of the connector's own that
    run beside vLLM's model (its fetches, its saves, its loader).

    OpenMP (libgomp, torch's on Linux) gives each thread that enters a parallel region a
    team of worker threads of its own, kept while that thread lives. Once a process has
    more OpenMP threads than CPUs, libgomp stops letting idle workers spin and puts them
    to sleep, so every parallel region of the model then pays to wake its workers: one
    save made in the connector's save thread left vLLM ~1.5x slower at decoding for as
    long as the engine ran (58.4 against 38.2 ms per token, 2 cores). Single-threaded,
    torch runs an op in the calling thread and makes no team.

    vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op once it has bound
    its threads, so torch's own is called. That also sets the count threads started
    later begin with; it is put back at once (from a thread that does nothing else), so
    only the calling thread changes."""
    import torch

    n = torch.get_num_threads()  # as the process set it (this thread's first torch call)
    set_threads = torch._C.set_num_threads
    set_threads(1)
    restore = threading.Thread(target=set_threads, args=(n,), name="kvcodec-threads")
    restore.start()
    restore.join()


def overlap_loads(setting, device) -> bool:
    """Whether the connector decodes beside the forward pass (layer by layer, as the
    model reaches each) rather than before it. ``setting``: ``kv_connector_extra_config``'s
    ``overlap_loads``, true, false or ``"auto"`` (the default): overlap where the model
    does not compute on the CPU, or leaves cores the decoder can use (vLLM reserved some,
    or runs fewer threads than the process may use). Where the model computes on every
    core, a decode beside it only takes turns with it on the same cores, and its threads
    wake and stall the model's: on 2 cores, loading first made the first token of a
    2,017-token cached prompt 10-15% sooner (bench_vllm.py)."""
    if setting not in ("auto", None):
        return str(setting).lower() not in ("0", "false", "no", "off")
    if getattr(device, "type", device) != "cpu":
        return True
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()
