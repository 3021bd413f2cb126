"""Token eviction against kvpress, alone and compounded with the codec, on held-out texts.

Per text (the held-out texts of ``bench_rd.py``): prefill 1,536 tokens with every
attention statistic the policies use collected in the same pass (``kvcodec.evict.press``),
then per policy x kept ratio: evict, score the next 256 tokens at their true positions
over the evicted cache (``kvcodec.integrations.ragged``), and the same after a round trip
through the ``default`` codec (the compound, coded in one .kvc file). kvpress 0.5.5 runs
its presses on the same model and tokens in its own virtual environment
(``_kvpress_env.py``: it pins transformers<5.3, so it is never imported here).

KL is KL(full cache || evicted) of the next-token distribution, averaged over the
continuation; ``bits_per_element`` is all-in against the full fp16 cache (eviction
alone: kept K/V at 16 bits). ``--json`` prints ``{"results": [{"method", "source",
"codec", "kept", "bits_per_element", "kl", "top1"}], "targets": {...}}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvcodec  # noqa: E402
from bench_rd import heldout_texts  # noqa: E402
from kvcodec import evict  # noqa: E402
from kvcodec.evict.base import Policy  # noqa: E402
from kvcodec.integrations.ragged import ragged_cache  # noqa: E402
from kvcodec.quality.evaluate import compare_logits  # noqa: E402
from real_models import resolve  # noqa: E402

POLICIES = ["streaming", "knorm", "snapkv", "observed", "kvcompress", "replay"]
PRESSES = ["snapkv", "streaming_llm", "knorm", "expected_attention",
           "adakv_expected_attention", "kvzip"]


class _Everything(Policy):
    """Collects every statistic in one press, so all policies score the same prefill."""

    name = "all-statistics"
    needs = frozenset({"window", "observed", "replay"})


@torch.no_grad()
def logits_over(lm, cache, cont) -> torch.Tensor:
    ids = torch.tensor([list(cont)])
    return lm.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()


def kvcodec_rows(lm, name, prefill, cont, policies, ratios, codecs):
    with evict.press(lm, _Everything(), 1.0) as p:
        kv = kvcodec.capture_kv(lm, token_ids=prefill)
    stats = p.stats(kv)
    ref = logits_over(lm, kv.to_dynamic_cache(lm.config), cont)
    rows = []

    def score(method, codec, kept, bits, cache):
        r = compare_logits(ref, logits_over(lm, cache, cont))
        rows.append({"method": method, "source": "kvcodec", "codec": codec, "kept": kept,
                     "bits_per_element": bits, "kl": r["kl"], "top1": r["top1_agreement"]})
        print(f"{name:16s} {method:16s} {codec or '-':8s} kept {kept:.2f} "
              f"{bits:7.3f} b/e  KL {r['kl']:.4f}  top1 {r['top1_agreement']:.3f}",
              file=sys.stderr, flush=True)

    for codec in codecs:  # the codec alone, nothing evicted
        data = kvcodec.encode(kv, config=codec)
        score("full", codec, 1.0, len(data) * 8 / kv.numel(),
              kvcodec.decode(data).to_dynamic_cache(lm.config))
    for policy in policies:
        for ratio in ratios:
            ev = evict.evict(kv, policy, ratio, stats)
            kept = ev.stored_numel() / ev.numel()
            score(getattr(policy, "name", policy), None, ratio, 16 * kept, ragged_cache(ev, lm.model))
            for codec in codecs:
                data = kvcodec.encode(ev, config=codec)
                score(policy, codec, ratio, len(data) * 8 / ev.numel(),
                      ragged_cache(kvcodec.decode(data), lm.model))
    return rows


def average(rows: list) -> list:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["source"], r["codec"], r["kept"])].append(r)
    out = []
    for (method, source, codec, kept), rs in groups.items():
        row = {"method": method, "source": source, "codec": codec, "kept": kept}
        for k in ("bits_per_element", "kl", "top1"):
            row[k] = float(np.mean([r[k] for r in rs]))
        out.append(row)
    return out


def targets(results: list) -> dict:
    def best(source, codec, kept):
        rs = [r for r in results if r["source"] == source and r["codec"] == codec
              and r["kept"] == kept and r.get("kl") is not None]
        return min(rs, key=lambda r: r["kl"]) if rs else None

    ours, theirs = best("kvcodec", None, 0.5), best("kvpress", None, 0.5)
    compound = [r for r in results if r["source"] == "kvcodec" and r["codec"] == "default"
                and r["method"] != "full" and r["kl"] <= 0.05]
    smallest = min(compound, key=lambda r: r["bits_per_element"]) if compound else None
    return {
        "kvcodec_best_at_0.5": ours, "kvpress_best_at_0.5": theirs,
        "beats_kvpress_at_0.5": None if not (ours and theirs) else ours["kl"] <= theirs["kl"],
        "smallest_compound_at_kl_0.05": smallest,
        "compound_le_1_bit": None if smallest is None else smallest["bits_per_element"] <= 1.0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="*", default=POLICIES)
    ap.add_argument("--presses", nargs="*", default=PRESSES,
                    help="kvpress presses (`--presses` alone or `--presses none`: skip kvpress)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.25, 0.1])
    ap.add_argument("--codecs", nargs="*", default=["default"])
    ap.add_argument("--prefill", type=int, default=1536)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--texts", type=int, default=None, help="use only the first N texts")
    ap.add_argument("--model", default=None,
                    help="smollm2-135m (default), a name in benchmarks/real_models.py, a .gguf "
                         "file or a model directory (kvpress runs on the embedded model only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.presses == ["none"]:
        args.presses = []
    torch.set_num_threads(2)
    lm = kvcodec.load_model(resolve(args.model))
    if resolve(args.model) is not None and args.presses:
        print("kvpress runs on the embedded model only (its venv converts that GGUF): "
              "skipping the presses", file=sys.stderr)
        args.presses = []
    texts = []
    for name, text in list(heldout_texts().items())[:args.texts]:
        ids = kvcodec.models.text_ids(lm.tokenizer, text)
        if len(ids) < args.prefill + args.continuation:
            raise SystemExit(f"{name}: {len(ids)} tokens, need {args.prefill + args.continuation}")
        texts.append({"name": name, "prefill": ids[:args.prefill],
                      "continuation": ids[args.prefill:args.prefill + args.continuation]})
    t0 = time.time()
    rows = []
    for t in texts:
        rows += kvcodec_rows(lm, t["name"], t["prefill"], t["continuation"], args.policies,
                             args.ratios, args.codecs)
    results = average(rows)
    print(f"kvcodec rows: {time.time() - t0:.0f} s", file=sys.stderr)
    if args.presses:
        from _kvpress_env import ensure_venv, run_kvpress

        t0 = time.time()
        for r in run_kvpress(texts, presses=args.presses, kept=args.ratios,
                             python=ensure_venv()):
            results.append({k: r.get(k) for k in ("method", "source", "codec", "kept",
                                                  "bits_per_element", "kl", "top1")}
                           | ({"error": r["error"]} if r.get("error") else {}))
        print(f"kvpress rows: {time.time() - t0:.0f} s", file=sys.stderr)
    out = {"model": args.model or "smollm2-135m", "texts": [t["name"] for t in texts],
           "prefill": args.prefill,
           "continuation": args.continuation, "results": results, "targets": targets(results)}
    if args.json:
        print(json.dumps(out))
    else:
        for r in sorted(results, key=lambda r: (r["kept"], r["source"], r["codec"] or "",
                                                r["kl"] if r["kl"] is not None else 9)):
            kl = "error" if r["kl"] is None else f"{r['kl']:.4f}"
            print(f"{r['source']:8s} {r['method']:26s} {r['codec'] or '-':8s} kept "
                  f"{r['kept']:.2f} {r['bits_per_element']:7.3f} b/e  KL {kl}  top1 "
                  f"{r['top1'] if r['top1'] is not None else float('nan'):.3f}")
        print(json.dumps(out["targets"], indent=1))


if __name__ == "__main__":
    main()
