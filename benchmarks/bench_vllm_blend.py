"""Blended RAG requests in vLLM (CPU build) against vLLM's own prefill and against
transformers' blend, on ``bench_blend.py``'s ``qa`` probe: a chat system line, 4
documents of ~512 tokens in shuffled order, a question (~2,100 tokens).

Each document is stored once behind the model's anchor (``ChunkStore.put_document``:
what ``kvcodec precompute --independent`` does), each later one with its ``"\\n\\n"``
separator inside it (vLLM cannot compute text between two loaded documents), and the
system line as the prompt's own prefix (``ChunkStore.put``). Per prompt, in one engine
(prefix caching off, so each request pays its own work):

* ``prefill``: the prompt sent plainly (the connector finds nothing: vLLM computes it);
* ``blend``: the same tokens as a blended request
  (:func:`kvcodec.integrations.vllm.blending.request_for`): the system line and every
  document loaded from the store, the question computed.

Reported: median time to first token of each and their ratio; the first-token KL of
vLLM's blend against transformers' ``blend(selector="none")`` on the same segments
(mean, max) and against vLLM's prefill; how many 32-token greedy answers equal
transformers' blend's. The engine runs in float32, as transformers' reference does, so
the comparison measures the blend and not a dtype (``--dtype bfloat16`` for speed on a
CPU with AVX-512 BF16; the parity figures then mix in bf16 rounding).

    python benchmarks/bench_vllm_blend.py --prompts 20 --json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ANSWER = 32


def run(n_prompts: int, seed: int, config: str, dtype: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from bench_blend import prompts

    import kvcodec
    from kvcodec.blend import Cached, Text, blend, generate
    from kvcodec.integrations.vllm.blending import request_for
    from kvcodec.integrations.vllm.cpu import cpu_env
    from kvcodec.models import default_anchor, text_ids
    from kvcodec.models.loading import resolve_model_path
    from kvcodec.store import ChunkStore

    threading = cpu_env()
    lm = kvcodec.load_model()
    tok = lm.tokenizer
    anchor = default_anchor(tok)
    root = tempfile.mkdtemp(prefix="bench-vllm-blend-")
    store = ChunkStore(root, lm.fingerprint, config)
    sep = text_ids(tok, "\n\n", first=False)
    cases, stored = [], set()
    with torch.no_grad():
        for p in prompts(lm, n_prompts, seed)["qa"]:
            head = text_ids(tok, p["head"], first=False)
            docs = [(sep if i else []) + ids for i, (_, ids) in enumerate(p["docs"])]
            for d in docs + [head]:
                if tuple(d) not in stored:
                    kv = kvcodec.capture_kv(lm, token_ids=d, anchor=None if d is head else anchor)
                    store.put(kv) if d is head else store.put_document(kv)
                    stored.add(tuple(d))
            segs = ([Text(token_ids=head)] + [Cached(store=store, token_ids=d) for d in docs]
                    + [Text(p["question"])])
            ref = blend(lm, segs, recompute=0, selector="none")
            answer, _ = generate(lm, segs, max_new_tokens=ANSWER, recompute=0, selector="none")
            cases.append((segs, ref.logits.view(-1).float(), list(answer)))

    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    llm = LLM(model=str(resolve_model_path(None)), dtype=dtype, max_model_len=4096,
              enforce_eager=True, max_num_seqs=1, enable_prefix_caching=False,
              max_logprobs=-1,
              kv_transfer_config={
                  "kv_connector": "KVCodecConnector",
                  "kv_connector_module_path": "kvcodec.integrations.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                  "kv_connector_extra_config": {"store": root, "config": config,
                                                "save": False}})
    conn = get_kv_transfer_group()

    def ask(prompt, params=None, n=1, logprobs=-1):
        extra = {"kv_transfer_params": params} if params is not None else None
        sp = SamplingParams(max_tokens=n, temperature=0, logprobs=logprobs, extra_args=extra)
        t = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        return time.perf_counter() - t, out

    def first(out, vocab):
        v = torch.full((vocab,), -float("inf"))
        for token, lp in out.outputs[0].logprobs[0].items():
            v[token] = lp.logprob
        return v

    def kl(p, q):  # both log-probabilities over the whole vocabulary
        return float((p.exp() * (p - q)).sum())

    warm, warm_params = request_for(tok, cases[0][0])
    ask(warm, warm_params)  # warms the engine and the decoder
    ask({"prompt_token_ids": warm["prompt_token_ids"]})
    rows = []
    for segs, ref_logits, answer in cases:
        prompt, params = request_for(tok, segs)
        ids = prompt["prompt_token_ids"]
        t_prefill, pre = ask({"prompt_token_ids": ids})
        loaded = conn.worker.tokens_loaded
        read = conn.bytes_read
        t_blend, got = ask(prompt, params)
        loaded, read = conn.worker.tokens_loaded - loaded, conn.bytes_read - read
        vocab = ref_logits.numel()
        q = first(got, vocab)
        _, full = ask(prompt, params, n=ANSWER, logprobs=None)
        rows.append({"tokens": len(ids), "loaded": loaded, "bytes_read": read,
                     "prefill_s": t_prefill, "blend_s": t_blend,
                     "kl_vs_hf_blend": kl(torch.log_softmax(ref_logits, -1), q),
                     "kl_vs_prefill": kl(first(pre, vocab), q),
                     "answer_equal": list(full.outputs[0].token_ids) == answer})
    med = statistics.median
    kls = [r["kl_vs_hf_blend"] for r in rows]
    return {"bench": "bench_vllm_blend", "probe": "qa", "prompts": len(rows), "dtype": dtype,
            "config": config, "prefix_caching": False,
            "prompt_tokens_mean": round(statistics.mean(r["tokens"] for r in rows), 1),
            "loaded_tokens_mean": round(statistics.mean(r["loaded"] for r in rows), 1),
            "bytes_read_mean": round(statistics.mean(r["bytes_read"] for r in rows)),
            "prefill_ttft_s": round(med(r["prefill_s"] for r in rows), 4),
            "blend_ttft_s": round(med(r["blend_s"] for r in rows), 4),
            "speedup": round(med(r["prefill_s"] for r in rows) / med(r["blend_s"] for r in rows), 2),
            "kl_vs_hf_blend_mean": round(statistics.mean(kls), 7),
            "kl_vs_hf_blend_max": round(max(kls), 7),
            "kl_vs_prefill_mean": round(statistics.mean(r["kl_vs_prefill"] for r in rows), 5),
            "answers_equal_hf_blend": sum(r["answer_equal"] for r in rows),
            "torch_threads": torch.get_num_threads(), **threading}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="default", help="the store's codec config")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args.prompts, args.seed, args.config, args.dtype)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
