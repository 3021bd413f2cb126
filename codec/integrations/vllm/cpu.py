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
"""
from __future__ import annotations

import os

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
