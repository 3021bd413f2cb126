"""Entropy coders side by side on the same quantized symbols of real KV.

kvcodec's rANS (single thread) against torchac (the CPU arithmetic coder CacheGen used)
and constriction (a Rust rANS), each given the same per-(layer, channel) probability
tables. Prints one JSON object with ``--json``:
``{"coders": [{"name", "bits_per_symbol", "entropy_bits_per_symbol", "encode_msym_s",
"decode_msym_s"}, ...]}``; kvcodec's decode builds each stream's decode tables in the
timed call, and its rows add ``decode_prebuilt_msym_s``, with the tables built first (as
a file's decode does, once for all its chunks). The ``kvcodec`` row runs the decode path
this CPU picks (``decode_path``: avx512, avx2 or scalar); ``kvcodec-scalar`` is the
portable reference, and on an AVX-512 CPU ``kvcodec-avx2`` is the path of CPUs without it.
SIMD rows add ``gather``: a path reads its tables with the hardware's gathers
(``hardware``) or scalar loads (``loads``), whichever it timed faster on this CPU at its
first decode; ``kvcodec-<path>-<gather>`` runs the other way, and
``<path>_gather_<mine>_vs_<other>`` is the ratio of their prebuilt decode rates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kvcodec  # noqa: E402
from kvcodec.core import tables  # noqa: E402
from kvcodec.core.streams import KINDS, stream_input  # noqa: E402
from kvcodec.core.config import load_config, resolve_layers  # noqa: E402
from kvcodec.core.quant import make_quantizer  # noqa: E402
from kvcodec.core.transforms import key_transform, layer_ropes  # noqa: E402


def real_streams(tokens: int, config: str):
    """Quantized symbols ``[T, C]`` and frequency tables of every (layer, K/V)."""
    from conftest import real_texts

    lm = kvcodec.load_model()
    text = "\n".join(real_texts().values())
    kv = kvcodec.capture_kv(lm, text, max_tokens=tokens)
    cfg = load_config(config, model=kv.model)
    specs = resolve_layers(cfg, kv.num_layers)
    ropes = layer_ropes(key_transform(cfg, kv.model, kv.num_layers), kv.num_layers, kv.head_dim)
    streams = []
    for kind, src in zip(KINDS, (kv.keys, kv.values)):
        for layer, t in enumerate(src):
            q = make_quantizer(specs[kind][layer], kv.dtype)
            x = stream_input(t, kind, ropes[layer] if kind == "key" else None)
            sym, _ = q.quantize(x, q.fit(x))
            counts = tables.channel_counts(sym, q.table_alphabet)
            freqs = tables.freqs_from_levels(tables.levels_from_counts(counts))
            streams.append((np.ascontiguousarray(sym), freqs, counts))
    return streams


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_kvcodec(streams, chunk, repeats, paths):
    """Bits, then for each decode path ``(encode s, decode s, decode s with prebuilt
    tables)``. The paths are timed in alternating rounds, each keeping its best, so
    that a slow spell of a shared machine hits them alike."""
    from conftest import use_cpu_path

    nat = tables.native()
    jobs = [(s, f) for s, f, _ in streams]
    outs = [np.empty_like(s) for s, _, _ in streams]
    # As a file decodes: tables built once per stream (outside the timing), then its
    # chunks decoded with them.
    built = nat.build_decode_tables([f for _, f, _ in streams], 1)
    best, blobs = {}, None

    def timed(key, fn):
        t = time.perf_counter()
        out = fn()
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - t)
        return out

    for _ in range(repeats):
        for path in paths:
            assert use_cpu_path(nat, path)  # "avx2:loads": the AVX2 path's table reads
            try:
                blobs = timed((path, "enc"), lambda: nat.encode_many(jobs, chunk, 1))
                items = [(bl, f, o) for bl, (_, f, _), o in zip(blobs, streams, outs)]
                prebuilt = [(bl, t, o) for bl, t, o in zip(blobs, built, outs)]
                for kind, it in (("dec", items), ("pre", prebuilt)):
                    outs[0][:] = 0
                    errs = timed((path, kind), lambda it=it: nat.decode_many(it, chunk, 1))
                    assert all(e is None for e in errs)
                    assert all(np.array_equal(o, s) for o, (s, _, _) in zip(outs, streams))
            finally:
                use_cpu_path(nat, "auto")
    nbytes = sum(len(b) for bl in blobs for b in bl)
    return nbytes * 8, {p: (best[(p, "enc")], best[(p, "dec")], best[(p, "pre")]) for p in paths}


def bench_constriction(streams, repeats):
    import constriction

    models = []
    for _sym, _, counts in streams:
        models.append([constriction.stream.model.Categorical(
            (c / c.sum()).astype(np.float64), perfect=False) for c in counts])

    def enc():
        out = []
        for (sym, _, _), ms in zip(streams, models):
            coder = constriction.stream.stack.AnsCoder()
            for c in range(sym.shape[1] - 1, -1, -1):
                coder.encode_reverse(sym[:, c].astype(np.int32), ms[c])
            out.append(coder.get_compressed())
        return out

    t_enc, comp = best_of(enc, repeats)

    def dec():
        res = []
        for (sym, _, _), ms, data in zip(streams, models, comp):
            coder = constriction.stream.stack.AnsCoder(data)
            res.append(np.stack([coder.decode(ms[c], sym.shape[0])
                                 for c in range(sym.shape[1])], axis=1))
        return res

    t_dec, res = best_of(dec, repeats)
    assert all(np.array_equal(r, s) for r, (s, _, _) in zip(res, streams))
    return sum(c.size * 32 for c in comp), t_enc, t_dec


def _import_quietly(name):
    """Import a module whose first import builds a C++ extension: the build tools print
    to file descriptor 1, which must carry only the JSON."""
    import importlib
    import os

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        return importlib.import_module(name)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def bench_torchac(streams, max_symbols, repeats):
    torchac = _import_quietly("torchac")

    # torchac takes a float CDF per symbol, so it runs on a prefix of the streams.
    picked, n = [], 0
    for s in streams:
        if n >= max_symbols:
            break
        picked.append(s)
        n += s[0].size
    cdfs, syms = [], []
    for sym, _, counts in picked:
        # Trim the CDF to the symbols in use: torchac's cost grows with the alphabet.
        counts = counts[:, : int(sym.max()) + 1]
        p = counts / counts.sum(axis=1, keepdims=True)
        cdf = np.concatenate([np.zeros((p.shape[0], 1)), np.cumsum(p, axis=1)], axis=1)
        cdf = torch.from_numpy(np.clip(cdf, 0, 1)).float()
        cdfs.append(cdf.repeat(sym.shape[0], 1))  # row order: token-major, channel-minor
        syms.append(torch.from_numpy(sym.astype(np.int16)).reshape(-1))
    t_enc, data = best_of(lambda: [torchac.encode_float_cdf(c, s) for c, s in zip(cdfs, syms)], repeats)
    t_dec, res = best_of(lambda: [torchac.decode_float_cdf(c, d) for c, d in zip(cdfs, data)], repeats)
    assert all(torch.equal(r, s) for r, s in zip(res, syms))
    return picked, sum(len(d) * 8 for d in data), t_enc, t_dec


def row(name, bits, n, entropy, t_enc, t_dec):
    return {"name": name, "bits_per_symbol": bits / n, "entropy_bits_per_symbol": entropy / n,
            "encode_msym_s": n / t_enc / 1e6, "decode_msym_s": n / t_dec / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--config", default="default")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torchac-symbols", type=int, default=2_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    streams = real_streams(args.tokens, args.config)
    n = sum(s.size for s, _, _ in streams)
    entropy = sum(tables.entropy_bits(c) for _, _, c in streams)
    rows = []
    nat = tables.native()
    path = nat.simd_path()
    # "scalar" is the portable reference decoder of the same bitstream; on an AVX-512
    # CPU the AVX2 path (what CPUs without AVX-512 run) gets its own row too. Each SIMD
    # path reads its tables with hardware gathers or scalar loads, whichever it timed
    # faster on this CPU (simd_gather): the other way gets a row,
    # "kvcodec-<path>-<gather>".
    other = {"loads": "hardware", "hardware": "loads"}
    named, gathers = [], {}
    for name, p in (("kvcodec", path), ("kvcodec-avx2", "avx2")):
        if p in gathers or not nat.set_simd_path(p):
            continue
        if p == "scalar":  # a CPU without AVX2
            named.append((name, p))
            continue
        gathers[p] = g = nat.simd_gather()
        named += [(name, f"{p}:{g}"), (f"kvcodec-{p}-{other[g]}", f"{p}:{other[g]}")]
    nat.set_simd_path("auto")
    named.append(("kvcodec-scalar", "scalar"))
    bits, times = bench_kvcodec(streams, args.chunk_tokens, args.repeats, [p for _, p in named])
    for name, p in named:
        te, td, tp = times[p]
        simd, _, g = p.partition(":")
        rows.append(dict(row(name, bits, n, entropy, te, td), decode_path=simd,
                         decode_prebuilt_msym_s=n / tp / 1e6, **({"gather": g} if g else {})))
    try:
        bits, te, td = bench_constriction(streams, args.repeats)
        rows.append(row("constriction", bits, n, entropy, te, td))
    except ImportError:
        print("constriction not installed; skipped", file=sys.stderr)
    try:
        picked, bits, te, td = bench_torchac(streams, args.torchac_symbols, 1)
        m = sum(s.size for s, _, _ in picked)
        rows.append(row("torchac", bits, m, sum(tables.entropy_bits(c) for _, _, c in picked), te, td))
    except ImportError:
        print("torchac not installed; skipped", file=sys.stderr)
    out = {"symbols": n, "tokens": args.tokens, "config": args.config, "coders": rows}
    kv = next(r for r in rows if r["name"] == "kvcodec")
    for r in rows:
        if r["name"] == "kvcodec-scalar":
            out["decode_speedup_vs_scalar"] = kv["decode_msym_s"] / r["decode_msym_s"]
            out["decode_prebuilt_speedup_vs_scalar"] = (kv["decode_prebuilt_msym_s"]
                                                        / r["decode_prebuilt_msym_s"])
            avx2 = next((a for a in rows if a["name"] == "kvcodec-avx2"), None)
            if avx2:
                out["avx2_decode_speedup_vs_scalar"] = avx2["decode_msym_s"] / r["decode_msym_s"]
        elif r["name"].startswith("kvcodec-") and r.get("gather"):  # a path's other way
            simd, g = r["decode_path"], gathers[r["decode_path"]]
            mine = next(a for a in rows if (a["decode_path"], a.get("gather")) == (simd, g))
            if mine is not r:
                out[f"{simd}_gather_{g}_vs_{other[g]}"] = (mine["decode_prebuilt_msym_s"]
                                                          / r["decode_prebuilt_msym_s"])
        elif r["name"] not in ("kvcodec", "kvcodec-avx2"):
            out[f"decode_speedup_vs_{r['name']}"] = kv["decode_msym_s"] / r["decode_msym_s"]
            out[f"encode_speedup_vs_{r['name']}"] = kv["encode_msym_s"] / r["encode_msym_s"]
    if args.json:
        print(json.dumps(out))
    else:
        for r in rows:
            print(f"{r['name']:14s} {r['bits_per_symbol']:.4f} bits/sym "
                  f"(entropy {r['entropy_bits_per_symbol']:.4f})  "
                  f"encode {r['encode_msym_s']:8.2f} Msym/s  decode {r['decode_msym_s']:8.2f} Msym/s")
        for k, v in out.items():
            if k.startswith(("decode_speedup", "encode_speedup", "avx2_decode")):
                print(f"{k}: {v:.1f}x")


if __name__ == "__main__":
    main()
