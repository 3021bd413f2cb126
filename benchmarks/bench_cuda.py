"""CUDA coder throughput: decode and encode GB/s of fp16-equivalent KV on the GPU, beside
a device-to-device copy of the same fp16 bytes (fraction of memory bandwidth) and the CPU
coder, in one run. Real KV from the embedded model, tiled to >= 64 MB of fp16.

``--json`` prints ``{"device", "fp16_bytes", "cases": [{"name", "seconds", "gb_per_s"}]}``.
Exits with a message (status 2) where no GPU is available.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import kvcodec
from kvcodec.core import tables
from kvcodec.core.streams import stream_input
from kvcodec.integrations import cuda


def timed(fn, repeats: int, sync=True) -> float:
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--min-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not cuda.available():
        print("bench_cuda: no CUDA device (or no CUDA build); nothing to measure", file=sys.stderr)
        sys.exit(2)
    lm = kvcodec.load_model()
    text = open("/usr/share/common-licenses/GPL-3").read()
    kv = kvcodec.capture_kv(lm, text, max_tokens=args.tokens)
    # Tile the layers until the fp16 cache is >= min-mb (same statistics, more data).
    reps = max(1, -(-args.min_mb * (1 << 20) // (kv.numel() * 2)))
    big = kvcodec.KVCache(kv.keys * reps, kv.values * reps, None, None,
                          None if kv.importance is None else kv.importance.repeat(reps, 1))
    data = kvcodec.encode(big)
    fp16_bytes = big.numel() * 2
    f = kvcodec.open(data)
    dev = cuda.DeviceFile(f)
    out = dev.decode(dtype=torch.float16)
    src = torch.empty(fp16_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    cases = {
        "gpu_decode_fused": timed(lambda: dev.decode(dtype=torch.float16, out=out), args.repeats),
        "d2d_copy": timed(lambda: dst.copy_(src), args.repeats),
        "cpu_decode": timed(lambda: f.decode(), 1, sync=False),
    }
    # Encode: symbols of one stream tiled, GPU vs CPU coder.
    layer = f._quant[(0, "value")]
    sym, _ = layer.quantize(stream_input(kv.values[0], "value", None), {})
    freqs = tables.freqs_from_levels(tables.levels_from_counts(
        tables.channel_counts(sym, layer.table_alphabet)))
    import numpy as np

    sym_big = np.tile(sym, (max(1, fp16_bytes // (sym.size * 2)), 1))
    cases["gpu_encode_symbols"] = timed(lambda: cuda.encode_symbols(sym_big, freqs, 256), 2)
    cases["cpu_encode_symbols"] = timed(lambda: tables.native().encode(sym_big, freqs, 256), 1,
                                        sync=False)
    enc_bytes = sym_big.size * 2  # fp16-equivalent bytes of those symbols
    rows = [{"name": k, "seconds": v,
             "gb_per_s": (enc_bytes if "encode" in k else fp16_bytes) / v / 1e9}
            for k, v in cases.items()]
    out = {"device": torch.cuda.get_device_name(0), "fp16_bytes": fp16_bytes,
           "bits_per_element": len(data) * 8 / big.numel(), "cases": rows}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
