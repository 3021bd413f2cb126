"""Time to first token in vLLM (CPU build) for a ~2,000-token document + question on the
embedded model, with a warm store: vLLM's own prefill (no connector), vLLM's
ExampleConnector (raw per-layer safetensors files of the paged K/V), and the kvcodec
connector in `lossless` and `default` modes.

Each case runs in its own process with its own engine (prefix caching off, so only the
connector can skip work); the request is sent once to fill the store, then timed.

    python benchmarks/bench_vllm.py --json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "\n\nQuestion: In one sentence, what is this document about?\nAnswer:"
CASES = ("prefill", "example", "kvcodec", "kvcodec-default", "kvcodec-default-512")
REQUIRED = CASES[:4]


def _config(name: str):
    """The store config of a kvcodec case: ``-512`` stores chunks of 512 tokens (half the
    entries, so half the per-entry table building, for coarser prefix reuse)."""
    if name == "kvcodec":
        return "lossless"
    if name.endswith("-512"):
        import kvcodec

        lm = kvcodec.load_model()
        return dict(kvcodec.load_config("default", model=lm.fingerprint), chunk_tokens=512,
                    name="default-512")
    return "default"


def run_case(name: str, tokens: int, rounds: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import real_texts
    from vllm import LLM, SamplingParams

    import kvcodec
    from kvcodec.models.loading import resolve_model_path

    lm = kvcodec.load_model()
    doc = lm.tokenizer(real_texts()["gpl3"], add_special_tokens=False)["input_ids"][:tokens]
    ids = doc + lm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    store = Path(tempfile.mkdtemp(prefix=f"bench-vllm-{name}-"))
    kv = None
    if name == "example":
        kv = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(store)}}
    elif name.startswith("kvcodec"):
        kv = {"kv_connector": "KVCodecConnector",
              "kv_connector_module_path": "kvcodec.integrations.vllm",
              "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {
                  "store": str(store),
                  "config": _config(name)}}
    llm = LLM(model=str(resolve_model_path(None)), dtype="bfloat16", max_model_len=4096,
              enforce_eager=True, max_num_seqs=1, enable_prefix_caching=False,
              kv_transfer_config=kv)
    params = SamplingParams(max_tokens=1, temperature=0)

    def ask():
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return time.perf_counter() - t, out

    ask()  # fills the store (and warms the engine)
    conn = None
    if name.startswith("kvcodec"):
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        conn = get_kv_transfer_group()
        conn._encoder.submit(lambda: None).result()  # the background encode is done
    stored = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    best, out, read = None, None, 0
    for _ in range(rounds):
        before = conn.bytes_read if conn else 0
        dt, out = ask()
        read = (conn.bytes_read - before) if conn else (stored if name == "example" else 0)
        best = dt if best is None else min(best, dt)
    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
    return {"name": name, "ttft_s": round(best, 4), "bytes_stored": stored,
            "bytes_read": read, "tokens_computed": len(ids) - cached,
            "prompt_tokens": len(ids)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child
    args = ap.parse_args()
    if args.case:
        print("CASE " + json.dumps(run_case(args.case, args.tokens, args.rounds)))
        return
    cases = []
    for name in args.cases:
        out = subprocess.run([sys.executable, __file__, "--case", name, "--tokens",
                              str(args.tokens), "--rounds", str(args.rounds)],
                             capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("CASE ")]
        if out.returncode or not line:
            sys.exit(f"case {name} failed:\n{out.stderr[-3000:]}")
        cases.append(json.loads(line[0][5:]))
        print(f"{name}: {cases[-1]}", file=sys.stderr, flush=True)
    by = {c["name"]: c for c in cases}
    if not set(REQUIRED) <= set(by):
        print(json.dumps({"cases": cases}))
        return
    link = lambda c: c["ttft_s"] + c["bytes_read"] * 8 / 1e9  # noqa: E731 - 1 Gbit/s
    summary = {
        "bytes_example_over_kvcodec_default":
            round(by["example"]["bytes_stored"] / by["kvcodec-default"]["bytes_stored"], 2),
        "ttft_prefill_over_kvcodec_default":
            round(by["prefill"]["ttft_s"] / by["kvcodec-default"]["ttft_s"], 2),
        "ttft_at_1gbps": {n: round(link(c), 4) for n, c in by.items()},
        "at_1gbps_example_over_kvcodec_default":
            round(link(by["example"]) / link(by["kvcodec-default"]), 2),
    }
    out = {"cases": cases, **summary}
    if args.json:
        print(json.dumps(out))
    else:
        for c in cases:
            print(f"{c['name']:16s} TTFT {c['ttft_s']:.3f} s  stored {c['bytes_stored']:>11,}  "
                  f"read {c['bytes_read']:>11,}  computed {c['tokens_computed']}")
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
