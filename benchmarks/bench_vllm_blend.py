"""Blended RAG requests in vLLM (CPU build) against vLLM's own prefill and against
transformers' blend, on ``bench_blend.py``'s ``qa`` probe: a chat system line, 4
documents of ~512 tokens in shuffled order, a question (~2,100 tokens).

Each document is stored once behind the model's anchor (``ChunkStore.put_document``:
what ``kvcodec precompute --independent`` does), each later one with its ``"\\n\\n"``
separator inside it (vLLM cannot compute text between two loaded documents), and the
system line as the prompt's own prefix, lossless (``ChunkStore.exact().put``: where the
connector keeps a blend's head; a first blended request would save it there). Per
prompt, in one engine
(prefix caching off, so each request pays its own work):

* ``prefill``: the prompt sent plainly (the connector finds nothing: vLLM computes it);
* each mode (``--modes``, ``selector:recompute``) as a blended request of the same
  tokens (:func:`kvcodec.integrations.vllm.blending.request_for`): ``none`` (full
  reuse: the system line and every document loaded, the question computed) and
  selective recompute (``hkvd:0.15``, ``boundary:0.15``: documents preloaded for the
  layers after the check layer, 15% of the cached tokens recomputed after it, and
  after it only the rows that matter computed: the connector's ``blend_rows_only``;
  ``hkvd:0.15:every`` computes every row after the check layer, the path it is
  checked against).

Reported per mode: median time to first token and its ratio to prefill's; the
first-token KL against transformers' ``blend`` with the same selector and budget on the
same segments (mean, max) and against vLLM's prefill, beside transformers' blend against
transformers' prefill on the same measure; the smallest overlap of the
recomputed positions with transformers'; how many 32-token greedy answers equal
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


def run(n_prompts: int, seed: int, config: str, dtype: str, modes) -> dict:
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
                    store.exact().put(kv) if d is head else store.put_document(kv)
                    stored.add(tuple(d))
            segs = ([Text(token_ids=head)] + [Cached(store=store, token_ids=d) for d in docs]
                    + [Text(p["question"])])
            refs = {}
            for sel, ratio in dict.fromkeys((m[1], m[2]) for m in modes):
                ref = blend(lm, segs, recompute=ratio, selector=sel)
                answer, _ = generate(lm, segs, max_new_tokens=ANSWER, recompute=ratio,
                                     selector=sel)
                refs[sel] = (ref.logits.view(-1).float(), list(answer), ref.selected)
            # Transformers' own blend-vs-prefill gap on the same measure, for scale.
            ids = ref.token_ids
            pre = lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
            refs["prefill"] = torch.log_softmax(pre.float(), -1)
            cases.append((segs, refs))

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
                                                "save": False, "blend_rows_only": True}})
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
    rows = {name: [] for name, *_ in modes}
    prefill_s, tokens = [], []
    for segs, refs in cases:
        ids = request_for(tok, segs)[0]["prompt_token_ids"]
        t, pre = ask({"prompt_token_ids": ids})
        prefill_s.append(t)
        tokens.append(len(ids))
        vocab = len(pre.outputs[0].logprobs[0])
        pre = first(pre, vocab)
        for name, sel, ratio, every in modes:
            ref_logits, answer, ref_selected = refs[sel]
            prompt, params = request_for(tok, segs, recompute=ratio, selector=sel)
            loaded, read = conn.worker.tokens_loaded, conn.bytes_read
            sub = conn.worker.subset
            conn.worker.subset = None if every else sub  # every row after the check layer
            try:
                t, got = ask(prompt, params)
                loaded, read = conn.worker.tokens_loaded - loaded, conn.bytes_read - read
                _, full = ask(prompt, params, n=ANSWER, logprobs=None)
            finally:
                conn.worker.subset = sub
            q = first(got, vocab)
            picked = (set(list(conn.worker.selections.values())[-1].tolist()) if ratio
                      else set())
            row = {"ttft_s": t, "loaded": loaded, "bytes_read": read}
            row["hf_kl_vs_prefill"] = kl(refs["prefill"], torch.log_softmax(ref_logits, -1))
            rows[name].append(dict(row, **{
                "kl_vs_hf_blend": kl(torch.log_softmax(ref_logits, -1), q),
                "kl_vs_prefill": kl(pre, q),
                "overlap": (len(picked & set(ref_selected.tolist())) / len(ref_selected)
                            if ratio else 1.0),
                "answer_equal": list(full.outputs[0].token_ids) == answer}))
    med, mean = statistics.median, statistics.mean
    out = {"bench": "bench_vllm_blend", "probe": "qa", "prompts": len(cases), "dtype": dtype,
           "config": config, "prefix_caching": False,
           "prompt_tokens_mean": round(mean(tokens), 1),
           "prefill_ttft_s": round(med(prefill_s), 4), "modes": []}
    for name, sel, ratio, every in modes:
        r = rows[name]
        kls = [x["kl_vs_hf_blend"] for x in r]
        out["modes"].append({
            "selector": sel, "recompute": ratio,
            "rows": "every" if every or not ratio else "recomputed only",
            "ttft_s": round(med(x["ttft_s"] for x in r), 4),
            "speedup_vs_prefill": round(med(prefill_s) / med(x["ttft_s"] for x in r), 2),
            "loaded_tokens_mean": round(mean(x["loaded"] for x in r), 1),
            "bytes_read_mean": round(mean(x["bytes_read"] for x in r)),
            "kl_vs_hf_blend_mean": round(mean(kls), 7), "kl_vs_hf_blend_max": round(max(kls), 7),
            "kl_vs_prefill_mean": round(mean(x["kl_vs_prefill"] for x in r), 5),
            "hf_kl_vs_prefill_mean": round(mean(x["hf_kl_vs_prefill"] for x in r), 5),
            "selection_overlap_min": round(min(x["overlap"] for x in r), 3),
            "answers_equal_hf_blend": sum(x["answer_equal"] for x in r)})
    sub = conn.worker.subset  # selective recompute that ran only its rows (or why not)
    out.update(rows_only_steps=sub.steps if sub else 0,
               rows_only_unusable=sub.unusable if sub else "not an eager model")
    out.update(torch_threads=torch.get_num_threads(), **threading)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="default", help="the store's codec config")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", nargs="+",
                    default=["none", "hkvd:0.15", "hkvd:0.15:every", "boundary:0.15"],
                    help="selector:recompute pairs (none: full reuse); ':every' computes "
                    "every row after the check layer (blend_rows_only off for that mode)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = [(m, m.split(":")[0], float(m.split(":")[1]) if ":" in m else 0.0,
              m.endswith(":every")) for m in args.modes]
    out = run(args.prompts, args.seed, args.config, args.dtype, modes)
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
