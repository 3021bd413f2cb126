"""Where a lossy config's error comes from, on one model and text: per layer and K/V, the
KL when only that layer's keys (or values) are decoded and everything else is exact, the
relative error per KV head, and the channel statistics of the pre-RoPE keys that decide
whether a per-token step fits (the largest channel's RMS over the median channel's).

    python benchmarks/diagnose_codec.py --model qwen2.5-coder-1.5b --json

Prints one JSON object: the whole-cache KL and, per (layer, kind), ``kl_alone``, the
relative squared error per head (``rel_err``), and for keys ``channel_rms_ratio`` (max /
median over channels of the pre-RoPE key RMS over tokens, per head) and the top channels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvcodec  # noqa: E402
from bench_rd import heldout_texts  # noqa: E402
from kvcodec.core.kvcache import KVCache  # noqa: E402
from kvcodec.core.transforms import model_ropes, rope  # noqa: E402
from kvcodec.models.compare import ppl_change_text  # noqa: E402
from kvcodec.quality.evaluate import compare_logits, continuation_logits  # noqa: E402
from real_models import resolve  # noqa: E402


def mixed(kv: KVCache, dec: KVCache, layer: int, kind: str) -> KVCache:
    keys, values = list(kv.keys), list(kv.values)
    if kind == "key":
        keys[layer] = dec.keys[layer]
    else:
        values[layer] = dec.values[layer]
    return KVCache(keys, values, kv.token_ids, kv.model)


def pre_rope_keys(kv: KVCache, layer: int, ropes) -> torch.Tensor:
    k = kv.keys[layer].float()
    r = ropes[layer] if ropes else None
    if r is None:
        return k
    start = kv.num_tokens - k.shape[2]  # a sliding layer holds the last tokens
    return rope(k, r, start, inverse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default="default")
    ap.add_argument("--text", default="collections_src", help="a held-out text of bench_rd")
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="layers to run kl_alone for (default all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = kvcodec.load_model(resolve(args.model))
    ids = kvcodec.models.text_ids(lm.tokenizer, heldout_texts()[args.text])
    cont = ids[args.prefill:args.prefill + args.continuation]
    kv = kvcodec.capture_kv(lm, token_ids=ids[:args.prefill])
    cfg = kvcodec.load_config(args.config, model=lm.fingerprint)
    data = kvcodec.encode(kv, config=cfg)
    dec = kvcodec.decode(data)
    ref = continuation_logits(lm, kv, cont)
    whole = compare_logits(ref, continuation_logits(lm, dec, cont), cont[1:])
    try:
        ropes = model_ropes(lm.fingerprint, kv.num_layers, kv.head_dim)
    except kvcodec.ConfigError:
        ropes = None
    rows = []
    for layer in range(kv.num_layers):
        for kind in ("key", "value"):
            a = (kv.keys if kind == "key" else kv.values)[layer].float()
            b = (dec.keys if kind == "key" else dec.values)[layer].float()
            err = ((a - b) ** 2).sum((0, 2, 3)) / (a ** 2).sum((0, 2, 3)).clamp_min(1e-30)
            row = {"layer": layer, "kind": kind, "tokens": a.shape[2],
                   "rel_err": [round(float(e), 5) for e in err]}
            if kind == "key":
                pre = pre_rope_keys(kv, layer, ropes)[0]  # [H, T, D]
                rms = pre.pow(2).mean(1).sqrt()  # [H, D]
                med = rms.median(-1).values.clamp_min(1e-12)
                row["channel_rms_ratio"] = [round(float(x), 1) for x in rms.max(-1).values / med]
                row["top_channels"] = [[int(c) for c in rms[h].topk(3).indices]
                                       for h in range(rms.shape[0])]
                row["mean_abs_over_rms"] = round(float(
                    (pre.mean(1).abs() / rms.clamp_min(1e-12)).max()), 2)
            if args.layers is None or layer in args.layers:
                row["kl_alone"] = round(compare_logits(
                    ref, continuation_logits(lm, mixed(kv, dec, layer, kind), cont))["kl"], 6)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    se = whole["delta_ppl_se_pct"]
    out = {"model": args.model or "smollm2-135m", "config": cfg.get("name"),
           "text": args.text, "prefill": args.prefill, "continuation": args.continuation,
           "bits_per_element": round(len(data) * 8 / kv.numel(), 4),
           "kl": round(whole["kl"], 5), "top1_agreement": round(whole["top1_agreement"], 4),
           "delta_ppl_pct": round(whole["delta_ppl_pct"], 2),
           "delta_ppl_se_pct": None if se is None else round(se, 2), "layers": rows}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['model']} {out['config']}: {out['bits_per_element']} bits/element, KL "
              f"{out['kl']}, top-1 {out['top1_agreement']}, "
              f"dPPL {ppl_change_text(out['delta_ppl_pct'], out['delta_ppl_se_pct'])}")
        worst = sorted((r for r in rows if "kl_alone" in r), key=lambda r: -r["kl_alone"])[:10]
        for r in worst:
            print(f"  layer {r['layer']:2d} {r['kind']:5s} KL alone {r['kl_alone']:.5f}  "
                  f"rel err {max(r['rel_err']):.4f}"
                  + (f"  channel RMS max/median {max(r['channel_rms_ratio'])}"
                     if "channel_rms_ratio" in r else ""))


if __name__ == "__main__":
    main()
