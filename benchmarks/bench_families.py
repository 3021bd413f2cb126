"""Bits against model quality per decoder family: tiny random-initialised models of
Llama 3 (llama3 RoPE), Qwen2 (YaRN), Qwen3, Mistral, Gemma 2/3 (sliding windows),
Phi-3 (partial rotary), OLMo2, GPT-NeoX, StableLM, plus real trained models on real text:
the embedded SmolLM2 and every model of ``benchmarks/real_models.py`` installed here
(``make bench-models``), or those named by ``--model``.

For each model and config: all-in bits per element, KL of the next-token distribution
over a teacher-forced continuation against the uncompressed cache, top-1 agreement, and
whether lossless decoding gave identical logits. Random-init models have no structure
for the codec to exploit and far sharper sensitivity than trained ones, so their lossy
figures show that every family codes, not how well a trained model of it would.

    python benchmarks/bench_families.py --json
    python benchmarks/bench_families.py --json --no-tiny --model gemma3-270m
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kvcodec  # noqa: E402
from kvcodec.integrations import hf  # noqa: E402
from kvcodec.models import LoadedModel, fingerprint  # noqa: E402
from kvcodec.quality.evaluate import compare_logits  # noqa: E402
from real_models import EMBEDDED, MODELS, resolve  # noqa: E402


@torch.no_grad()
def measure(model, kv, cont, config) -> dict:
    data = kvcodec.encode(kv, config=config)
    ref = model(input_ids=cont, past_key_values=kv.to_dynamic_cache(model.config)).logits[0]
    got = model(input_ids=cont, past_key_values=hf.load_cache(model, data)).logits[0]
    row = compare_logits(ref, got, cont[0, 1:].tolist())
    with kvcodec.open(data) as f:
        name = f.config.get("name")
        calibrated = bool(f.config.get("model_key"))
    return {"config": name + (" (calibrated)" if calibrated else ""),
            "bits_per_element": round(len(data) * 8 / kv.numel(), 4),
            "kl": round(row["kl"], 5), "top1_agreement": round(row["top1_agreement"], 4),
            "exact": bool(torch.equal(ref, got))}


def main():
    from conftest import real_texts
    from tiny_models import TINY, token_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--model", action="append", default=None,
                    help="real model for the real-text rows (repeatable): smollm2-135m, a "
                         "name in benchmarks/real_models.py, a .gguf file or a directory; "
                         "default: the embedded model and every installed real model")
    ap.add_argument("--no-tiny", action="store_true", help="real models only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for family, make in ({} if args.no_tiny else TINY).items():
        model = make()
        lm = LoadedModel(model, None, fingerprint(model.config, None, model))
        vocab = model.config.vocab_size
        kv = kvcodec.capture_kv(lm, token_ids=token_ids(args.tokens, vocab, 0)[0].tolist())
        cont = token_ids(args.continuation, vocab, 1)
        for config in ("lossless", "default", "cachegen"):
            rows.append({"family": family, "layer_tokens": sorted(set(kv.layer_tokens)),
                         **measure(model, kv, cont, config)})
    names = args.model or [EMBEDDED] + [n for n, m in MODELS.items() if m.gguf.is_file()]
    model_free = dict(kvcodec.load_config("default"), name="default-model-free")
    for name in names:
        lm = kvcodec.load_model(resolve(name))
        ids = kvcodec.models.text_ids(lm.tokenizer, real_texts()["gpl3"])
        kv = kvcodec.capture_kv(lm, token_ids=ids[:args.tokens])
        cont = torch.tensor([ids[args.tokens:args.tokens + args.continuation]])
        for config in ("lossless", "default", model_free, "cachegen"):
            rows.append({"family": f"{name} (real text)",
                         "layer_tokens": sorted(set(kv.layer_tokens)),
                         **measure(lm.model, kv, cont, config)})
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['family']:26s} {r['config']:22s} {r['bits_per_element']:7.3f} bits  "
                  f"KL {r['kl']:.5f}  top1 {r['top1_agreement']:.3f}"
                  + ("  exact" if r["exact"] else ""))


if __name__ == "__main__":
    main()
