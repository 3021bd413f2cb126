"""CUDA coder throughput: decode and encode GB/s of fp16-equivalent KV on the GPU, beside
a device-to-device copy of the same fp16 bytes (fraction of memory bandwidth) and the CPU
coder, in one run. Real KV from the embedded model (or ``--kv FILE``: a .kvc whose decode
is the source KV, for a GPU machine without the model), tiled to >= 64 MB of fp16.

``--config`` (repeatable) names the configs decoded. The layers are tiled, so the cache is
no longer the embedded model's and ``default`` is the model-free default (keys centered);
``uncentered`` is the same with keys not centered (the fused path without offsets).
Kernel rows are the median of CUDA-event timings after a second of warm-up launches;
whole calls and the CPU coder are the best host wall time. ``--json`` prints ``{"device",
"fp16_bytes", "sm_clock_mhz_now_max", "cases": [{"name", "seconds", "gb_per_s",
"bits_per_element"}]}``. ``gpu_entries_*`` rows decode the same tokens split into
``--entries`` files, one launch per entry vs one for all (``prepare_many``);
``*_store_*`` rows the same tokens as a ChunkStore's entries (shared tables), on the GPU
(one launch; the whole ``cuda_store.fill``) and the CPU (``store.fill``). Exits with a
message (status 2) where no GPU is available.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

import kvcodec
from kvcodec.core import tables
from kvcodec.core.streams import stream_input
from kvcodec.integrations import cuda


def timed(fn, repeats: int, sync=True) -> float:
    """Best host wall time of ``fn`` (synchronized before and after where ``sync``)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def kernel_time(launch, repeats: int, warm_s: float = 1.0) -> float:
    """Median device time of ``launch`` by CUDA events, after ``warm_s`` seconds of
    launches (the card's clocks rise under load; a few ms of work measures the idle
    clock)."""
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        launch()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        launch()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def sm_clock() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_kv(args):
    if args.kv:
        with open(args.kv, "rb") as fh:
            return kvcodec.decode(fh.read()).slice(0, args.tokens)
    lm = kvcodec.load_model()
    text = open("/usr/share/common-licenses/GPL-3").read()
    return kvcodec.capture_kv(lm, text, max_tokens=args.tokens)


def config(name: str):
    if name != "uncentered":
        return name
    from kvcodec.core.config import load_config

    cfg = load_config("default")
    cfg["key"][0]["quantizer"]["center"] = False
    return cfg


def entries(big, args, fp16_bytes) -> list:
    """The same tokens as ``--entries`` store-sized files (the default config), decoded
    into one paged cache: each entry its own launch (and call) vs all in one
    ``prepare_many`` launch (and call)."""
    n = big.num_tokens
    size = -(-n // args.entries)
    datas = [kvcodec.encode(big.slice(a, min(n, a + size))) for a in range(0, n, size)]
    files = [kvcodec.open(data) for data in datas]
    devs = [cuda.DeviceFile(f) for f in files]
    h, d, block = big.num_kv_heads, big.head_dim, 16
    slots = torch.randperm(-(-n // block) * block, device="cuda")[:n].to(torch.int64)
    paged = [tuple(torch.empty((-(-n // block), block, h, d), dtype=torch.float16,
                               device="cuda") for _ in range(2)) for _ in range(big.num_layers)]
    parts = [cuda.Part(dev, out=paged, slots=slots[a:a + dev.f.meta.num_tokens].contiguous(),
                       block_size=block) for dev, a in zip(devs, range(0, n, size))]
    bits = sum(map(len, datas)) * 8 / big.numel()
    one = cuda.prepare_many(parts)
    each = [cuda.prepare_many([p]) for p in parts]

    def call_one():
        run = cuda.prepare_many(parts)
        run.launch()
        run.finish()

    def call_each():
        for p in parts:
            run = cuda.prepare_many([p])
            run.launch()
            run.finish()

    out = []
    for case, fn in [("kernel_one_launch", one.launch),
                     ("kernel_launch_per_entry", lambda: [r.launch() for r in each]),
                     ("call_one", call_one), ("call_per_entry", call_each)]:
        t = kernel_time(fn, 31) if "kernel" in case else timed(fn, args.repeats)
        out.append({"name": f"gpu_entries_{case}[{len(files)}x{size}]", "seconds": t,
                    "gb_per_s": fp16_bytes / t / 1e9, "bits_per_element": bits})
    return out


def store_rows(big, args, fp16_bytes) -> list:
    """The same tokens put in a ChunkStore (256-token entries coded with the store's
    shared tables, so one set of device tables serves them all): one launch over the
    entries, the whole ``cuda_store.fill`` call (open, stage, launch, finish) into fp16
    buffers on the GPU, and the CPU's ``store.fill`` into float32 buffers."""
    import tempfile

    from kvcodec.integrations import cuda_store
    from kvcodec.store import ChunkStore

    store = ChunkStore(tempfile.mkdtemp(prefix="bench-cuda-store-"), big.model)
    store.put(big)
    ids = big.token_ids
    locs = store.lookup(ids, partial=True)
    h, d, n = big.num_kv_heads, big.head_dim, big.num_tokens
    bits = sum(loc.stat().st_size for loc in locs) * 8 / big.numel()
    gpu = [tuple(torch.empty((1, h, n, d), dtype=torch.float16, device="cuda")
                 for _ in range(2)) for _ in range(big.num_layers)]
    cpu = [tuple(torch.empty((1, h, n, d)) for _ in range(2)) for _ in range(big.num_layers)]
    chunk = store.chunk_tokens
    files = [store.open_entry(loc, ids[i * chunk:(i + 1) * chunk], i * chunk)
             for i, loc in enumerate(locs)]
    run = cuda.prepare_many([cuda.Part(cuda.DeviceFile(f), out=[
        (k[:, :, i * chunk:i * chunk + f.meta.num_tokens],
         v[:, :, i * chunk:i * chunk + f.meta.num_tokens]) for k, v in gpu])
        for i, f in enumerate(files)])
    out = []
    for case, fn in [("gpu_store_kernel_one_launch", run.launch),
                     ("gpu_store_fill_call", lambda: cuda_store.fill(store, gpu, ids, locs)),
                     ("cpu_store_fill_call", lambda: store.fill(cpu, ids, locs))]:
        t = kernel_time(fn, 31) if "kernel" in case else timed(fn, args.repeats,
                                                                 case.startswith("gpu"))
        out.append({"name": f"{case}[{len(locs)}x{chunk}]", "seconds": t,
                    "gb_per_s": fp16_bytes / t / 1e9, "bits_per_element": bits})
    for f in files:
        f.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--min-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv", help="a .kvc file whose decode is the source KV")
    ap.add_argument("--config", action="append", help="configs to decode (default: default)")
    ap.add_argument("--entries", type=int, default=8, help="store-sized files for the "
                    "one-launch case (the same tokens split evenly)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not cuda.available():
        print("bench_cuda: no CUDA device (or no CUDA build); nothing to measure", file=sys.stderr)
        sys.exit(2)
    kv = source_kv(args)
    # Tile the layers until the fp16 cache is >= min-mb (same statistics, more data).
    reps = max(1, -(-args.min_mb * (1 << 20) // (kv.numel() * 2)))
    big = kvcodec.KVCache(kv.keys * reps, kv.values * reps, None, kv.model and {
        **kv.model, "num_layers": kv.num_layers * reps, "rope": {
            **kv.model["rope"], "layers": kv.model["rope"]["layers"] * reps}},
        None if kv.importance is None else kv.importance.repeat(reps, 1))
    fp16_bytes = big.numel() * 2
    src = torch.empty(fp16_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    rows, f = [], None
    for name in args.config or ["default"]:
        data = kvcodec.encode(big, config=config(name))
        f = kvcodec.open(data)
        dev = cuda.DeviceFile(f)
        out = dev.decode(dtype=torch.float16)
        run = dev.prepare(dtype=torch.float16, out=out)
        run_global = dev.prepare(dtype=torch.float16, out=out, kernel="global")
        bits = len(data) * 8 / big.numel()
        # gpu_decode: the whole call (plan in Python, payload upload, kernel, status check);
        # gpu_decode_kernel: a prepared decode's launch alone (what a CUDA graph replays),
        # tables in shared memory (the default) or read from global memory.
        for case, fn, reps_, sync in [
                ("gpu_decode", lambda: dev.decode(dtype=torch.float16, out=out), args.repeats, True),
                ("gpu_decode_kernel", run.launch, 0, True),
                ("gpu_decode_kernel_global", run_global.launch, 0, True),
                ("cpu_decode", lambda: f.decode(), 1, False)]:
            t = kernel_time(fn, 31) if "kernel" in case else timed(fn, reps_, sync)
            rows.append({"name": f"{case}[{name}]", "seconds": t,
                         "gb_per_s": fp16_bytes / t / 1e9, "bits_per_element": bits})
    rows += entries(big, args, fp16_bytes)
    rows += store_rows(dataclasses.replace(big, token_ids=kv.token_ids), args, fp16_bytes)
    t = kernel_time(lambda: dst.copy_(src), 31)
    rows.append({"name": "d2d_copy", "seconds": t, "gb_per_s": fp16_bytes / t / 1e9})
    # Encode: symbols of one stream tiled, GPU vs CPU coder.
    layer = f.meta.quant[(0, "value")]
    sym, _ = layer.quantize(stream_input(kv.values[0], "value", None), {})
    freqs = tables.freqs_from_levels(tables.levels_from_counts(
        tables.channel_counts(sym, layer.table_alphabet)))
    import numpy as np

    sym_big = np.tile(sym, (max(1, fp16_bytes // (sym.size * 2)), 1))
    enc_bytes = sym_big.size * 2  # fp16-equivalent bytes of those symbols
    for case, fn, reps_, sync in [
            ("gpu_encode_symbols", lambda: cuda.encode_symbols(sym_big, freqs, 256), 2, True),
            ("cpu_encode_symbols", lambda: tables.native().encode(sym_big, freqs, 256), 1, False)]:
        t = timed(fn, reps_, sync)
        rows.append({"name": case, "seconds": t, "gb_per_s": enc_bytes / t / 1e9})
    out = {"device": torch.cuda.get_device_name(0), "fp16_bytes": fp16_bytes,
           "sm_clock_mhz_now_max": sm_clock(), "cpu_threads": torch.get_num_threads(),
           "cases": rows}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
