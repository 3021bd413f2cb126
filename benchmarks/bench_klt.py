"""What the KLT bases cost the decoder: the same 2,048 tokens of the embedded model's KV
coded with its shipped calibration (``default``: channels), with the same calibration in
per-head KLT bases (``klt``: the same steps, format v7), and with ``klt`` at steps x1.25
(``klt_equal_kl``: about the held-out KL of ``default`` at x1, 0.0071 against 0.0048,
at 27% fewer bits), each decoded whole into preallocated float32 buffers (the fused
native path: rANS, dequantize, the inverse basis, the means, RoPE), per CPU decode path.
With ``--model`` (a name in ``real_models.py``): that model's KV, its model-free
``default``, and its ``klt``: its calibration where it has one, else the first-encode
fit on this very cache (held in this process, nothing written); no ``klt_equal_kl``.

    python benchmarks/bench_klt.py --json [--model gemma3-270m]

Prints one JSON line per path: ``{"path", "tokens", "head_dim", "<name>_ms",
"<name>_bits", ..., "ratio", "ratio_equal_kl"}`` with the ratios ``klt`` / ``default``
and ``klt_equal_kl`` / ``default`` time (the fastest of ``--repeats`` runs, 2 threads).
The paths alternate round by round, so a slow minute of a shared machine touches all of
them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvcodec  # noqa: E402
from bench_center import setup  # noqa: E402
from kvcodec.core.fit import first_fit  # noqa: E402
from kvcodec.core.rate import scale_steps  # noqa: E402
from kvcodec.core.tables import native  # noqa: E402
from kvcodec.errors import ConfigError  # noqa: E402


def main():
    args, lm, kv = setup(__doc__, repeats=15)
    fp = lm.fingerprint
    klt = klt_config(kv, fp)
    files = {"default": kvcodec.encode(kv, config=kvcodec.load_config("default", model=fp)),
             "klt": kvcodec.encode(kv, config=klt)}
    if args.model is None:  # the shipped klt's x1.25: about the held-out KL of default
        files["klt_equal_kl"] = kvcodec.encode(kv, config=scale_steps(klt, 1.25))
    nat = native()
    paths = [p for p in ("scalar", "avx2", "avx512") if nat.set_simd_path(p)]
    buffers = {l: (torch.empty(kv.keys[l].shape), torch.empty(kv.values[l].shape))
               for l in range(kv.num_layers)}  # sliding-window layers hold fewer tokens
    best = {(p, n): float("inf") for p in paths for n in files}
    opened = {n: kvcodec.open(data) for n, data in files.items()}
    try:
        for f in opened.values():
            f.decode_into(buffers, threads=args.threads)  # tables built, pages touched
        for _ in range(args.repeats):
            for p in paths:
                nat.set_simd_path(p)
                for n, f in opened.items():
                    t = time.perf_counter()
                    f.decode_into(buffers, threads=args.threads)
                    best[p, n] = min(best[p, n], time.perf_counter() - t)
    finally:
        nat.set_simd_path("auto")
        for f in opened.values():
            f.close()
    for p in paths:
        row = {"path": p, "tokens": kv.num_tokens, "head_dim": kv.head_dim}
        for n, data in files.items():
            row[f"{n}_ms"] = round(1000 * best[p, n], 2)
            row[f"{n}_bits"] = round(len(data) * 8 / kv.numel(), 4)
        row["ratio"] = round(row["klt_ms"] / row["default_ms"], 3)
        text = (f"{p:7s} default {row['default_ms']:7.2f} ms, klt {row['klt_ms']:7.2f} ms "
                f"(x{row['ratio']})")
        if "klt_equal_kl" in files:
            row["ratio_equal_kl"] = round(row["klt_equal_kl_ms"] / row["default_ms"], 3)
            text += f", klt x1.25 {row['klt_equal_kl_ms']:7.2f} ms (x{row['ratio_equal_kl']})"
        print(json.dumps(row) if args.json else text)


def klt_config(kv, fp) -> dict:
    """The model's ``klt`` config where it has one (shipped, a calibration, or a fit kept
    before), else the fit a first encode makes on ``kv`` itself
    (:func:`~kvcodec.core.fit.first_fit`: its codebook held in this process only, as
    ``bench_rd.py``'s ``klt-first``; nothing is written)."""
    try:
        return kvcodec.load_config("klt", model=fp)
    except ConfigError:
        pass
    got = first_fit(kv, kvcodec.load_config("default", model=fp))
    if got is None:
        raise SystemExit("this cache cannot give a klt fit (too short? --tokens)")
    return got[0]

if __name__ == "__main__":
    main()
