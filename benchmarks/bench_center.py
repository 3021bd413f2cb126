"""What centering keys costs the decoder: the same 2,048 tokens of the embedded model's KV
coded with the model-free default (keys centered, format v5), with the same steps
uncentered (v3), and centered with steps x1.25 (``centered_equal_bits``: about the
uncentered file's bits, since rANS decode time grows with the bits per symbol), each
decoded whole into preallocated float32 buffers (the fused native path: rANS,
dequantize (+ the channel means), RoPE), per CPU decode path.

    python benchmarks/bench_center.py --json

Prints one JSON line per path: ``{"path", "tokens", "<name>_ms", "<name>_bits", ...,
"ratio"}`` with ``ratio`` = centered_equal_bits / uncentered time (the fastest of
``--repeats`` runs, 2 threads).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kvcodec  # noqa: E402
from kvcodec.core.tables import native  # noqa: E402


def best_ms(f, buffers, repeats: int, threads: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f.decode_into(buffers, threads=threads)
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def setup(doc: str, repeats: int = 25):
    """``(args, model, kv)`` of a decode benchmark: ``--tokens`` of the KV of ``--model``
    (the embedded model, or one of ``real_models.py``) over the three held-out texts,
    ``--repeats``, ``--threads``, ``--json``."""
    from conftest import real_texts
    from real_models import resolve

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default=None,
                    help="smollm2-135m (default) or a name in benchmarks/real_models.py")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = kvcodec.load_model(resolve(args.model))
    kv = kvcodec.capture_kv(lm, "\n".join(real_texts().values()), max_tokens=args.tokens)
    return args, lm, kv


def main():
    args, _, kv = setup(__doc__)
    centered = kvcodec.load_config("default", model=kv.model)
    plain = copy.deepcopy(centered)
    plain["key"][0]["quantizer"].pop("center")
    from kvcodec.core.rate import scale_steps

    equal = scale_steps(centered, 1.25)
    files = {name: kvcodec.encode(kv, config=cfg) for name, cfg in
             (("centered", centered), ("uncentered", plain), ("centered_equal_bits", equal))}
    nat = native()
    for path in ("scalar", "avx2", "avx512"):
        if not nat.set_simd_path(path):
            continue
        row = {"path": path, "tokens": kv.num_tokens}
        for name, data in files.items():
            with kvcodec.open(data) as f:
                buffers = {l: (torch.empty(1, kv.num_kv_heads, kv.num_tokens, kv.head_dim),
                               torch.empty(1, kv.num_kv_heads, kv.num_tokens, kv.head_dim))
                           for l in range(kv.num_layers)}
                f.decode_into(buffers, threads=args.threads)  # tables built, pages touched
                row[f"{name}_ms"] = round(best_ms(f, buffers, args.repeats, args.threads), 2)
            row[f"{name}_bits"] = round(len(data) * 8 / kv.numel(), 4)
        row["ratio"] = round(row["centered_equal_bits_ms"] / row["uncentered_ms"], 3)
        print(json.dumps(row) if args.json else
              f"{path:7s} centered {row['centered_ms']:7.2f} ms, at equal bits "
              f"{row['centered_equal_bits_ms']:7.2f} ms, uncentered "
              f"{row['uncentered_ms']:7.2f} ms: ratio {row['ratio']}")
    nat.set_simd_path("auto")


if __name__ == "__main__":
    main()
