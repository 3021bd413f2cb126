"""Time to first token in vLLM (CPU build) for a ~2,000-token document + question on the
embedded model, with a warm store: vLLM's own prefill (no connector), vLLM's
ExampleConnector (raw per-layer safetensors files of the paged K/V), and the kvcodec
connector in `lossless` and `default` modes, and `default` once more with its store on S3
(moto on 127.0.0.1, with keep-alive connections as S3 has: ``s3_server.py``) behind a
real 1 Gbit/s link (``throttle.py``: a rate-limited relay).
kvcodec loads every prompt token but the last from a ``lossless`` store, and but the
last 64 from a lossy one (``reuse_end``: vLLM computes those), mid-block; the
ExampleConnector loads through the last whole block (1,920 of 2,017 tokens, 97
computed). ``kvcodec-default-blocks`` loads what the example loads
(the connector's ``whole_blocks``): the same work, so the decode against raw files.

Each case runs in its own process with its own engine (prefix caching off, so only the
connector can skip work); the request is sent once to fill the store, then timed (best
of ``--rounds``). A process's times vary by tens of percent from one process to the
next on a small shared machine (which cores, what runs beside it), more than within
one, so each case runs in ``--processes`` processes (3), interleaved with the other
cases, and the median process is reported, beside every process's time.

The engine runs in the dtype that is fast on this CPU (``--dtype auto``: bfloat16 with
AVX-512 BF16 or AMX, else float32; :func:`kvcodec.integrations.vllm.cpu.fast_dtype`),
and on a small machine no core is reserved for vLLM's scheduler, so the model runs on
every core (:func:`~kvcodec.integrations.vllm.cpu.cpu_env`); both are in the output.

    python benchmarks/bench_vllm.py --json
    python benchmarks/bench_vllm.py --concurrent 8 --cases prefill example kvcodec-default

``--concurrent N`` sends N requests at once (four ~2,000-token documents, each asked
different questions, all cached), records when each request's first token comes
(engine steps, not wall clock of the batch) and reports throughput and p50/p99 TTFT.
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
CASES = ("prefill", "example", "kvcodec", "kvcodec-default", "kvcodec-default-512",
         "kvcodec-default-1g", "kvcodec-default-blocks")
REQUIRED = CASES[:4]


def _config(name: str):
    """The store config of a kvcodec case: ``-512`` stores chunks of 512 tokens (half the
    entries, so half the per-entry table building, for coarser prefix reuse)."""
    if name == "kvcodec":
        return "lossless"
    if name.endswith(("-1g", "-blocks")):
        return "default"
    if name.endswith("-512"):
        import kvcodec

        lm = kvcodec.load_model()
        return dict(kvcodec.load_config("default", model=lm.fingerprint), chunk_tokens=512,
                    name="default-512")
    return "default"


def run_case(name: str, tokens: int, rounds: int, dtype: str, concurrent: int = 0,
             s3_server: str = "keepalive") -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from kvcodec.integrations.vllm.cpu import cpu_env

    threading = cpu_env()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import real_texts
    from vllm import LLM, SamplingParams

    import kvcodec
    from kvcodec.models.loading import resolve_model_path

    lm = kvcodec.load_model()
    doc = lm.tokenizer(real_texts()["gpl3"], add_special_tokens=False)["input_ids"][:tokens]
    ids = doc + lm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    store = Path(tempfile.mkdtemp(prefix=f"bench-vllm-{name}-"))
    root, options = str(store), None
    if name.endswith("-1g"):  # the store on S3 (moto) behind a real 1 Gbit/s link
        url = _s3_link(server=s3_server)
        root, options = "s3://bench/store", {"client_kwargs": {"endpoint_url": url}}
    kv = None
    if name == "example":
        kv = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(store)}}
    elif name.startswith("kvcodec"):
        kv = {"kv_connector": "KVCodecConnector",
              "kv_connector_module_path": "kvcodec.integrations.vllm",
              "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
              "kv_connector_extra_config": {
                  "store": root, "config": _config(name),
                  **({"whole_blocks": True} if name.endswith("-blocks") else {}),
                  **({"storage_options": options} if options else {})}}
    llm = LLM(model=str(resolve_model_path(None)), dtype=dtype, max_model_len=4096,
              enforce_eager=True, max_num_seqs=max(1, concurrent),
              enable_prefix_caching=False, kv_transfer_config=kv)
    params = SamplingParams(max_tokens=1, temperature=0)

    def ask():
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        return time.perf_counter() - t, out

    if concurrent:
        return _concurrent(llm, params, lm, "\n".join(real_texts().values()), tokens,
                           concurrent, rounds, name, threading)
    ask()  # fills the store (and warms the engine)
    conn = None
    if name.startswith("kvcodec"):
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        conn = get_kv_transfer_group()
        conn.flush()  # the background encode is done
    if options:
        import fsspec

        stored = fsspec.filesystem("s3", **options).du(root.removeprefix("s3://"))
    else:
        stored = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    best, out, read = None, None, 0
    for _ in range(rounds):
        before = conn.bytes_read if conn else 0
        dt, out = ask()
        read = (conn.bytes_read - before) if conn else (stored if name == "example" else 0)
        best = dt if best is None else min(best, dt)
    cached = int(getattr(out, "num_cached_tokens", 0) or 0)
    return {"name": name, "ttft_s": round(best, 4), "decode_ms_per_token": _decode_ms(llm),
            "bytes_stored": stored,
            "bytes_read": read, "tokens_computed": len(ids) - cached,
            "prompt_tokens": len(ids), "torch_threads": __import__("torch").get_num_threads(),
            **({"s3_server": s3_server} if name.endswith("-1g") else {}), **threading}


def _decode_ms(llm, n: int = 32) -> float:
    """Milliseconds per generated token for a short prompt that no store holds, best of
    3 (32 tokens less 1): the engine's own decode steps, after the case's loads and
    saves. A connector should leave them alone; threads of its own that run torch
    beside the model can slow every step (:func:`kvcodec.integrations.vllm.cpu.
    torch_one_thread`)."""
    from vllm import SamplingParams

    ids = list(range(1000, 1040))

    def run(k):
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}],
                     SamplingParams(max_tokens=k, temperature=0, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - t
    one = min(run(1) for _ in range(3))
    return round(1000 * (min(run(n + 1) for _ in range(3)) - one) / n, 2)


def _s3_link(gbps: float = 1.0, server: str = "keepalive") -> str:
    """moto on 127.0.0.1 with a bucket (``s3_server.py``: ``server`` keepalive serves
    connections as S3 does, moto's own closes each after one response), behind
    ``throttle.py`` at ``gbps``: the endpoint URL of the link (both processes end with
    this one)."""
    import atexit
    import socket
    import urllib.request

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    s3, link = port(), port()
    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[k] = v
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("s3_server.py")),
                               "--port", str(s3), "--server", server],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, str(Path(__file__).with_name("throttle.py")),
                               "--listen", str(link), "--to", f"127.0.0.1:{s3}", "--gbps",
                               str(gbps)])]
    atexit.register(lambda: [p.kill() for p in procs])
    url = f"http://127.0.0.1:{link}"
    for _ in range(150):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir("bench")
    return url


def _concurrent(llm, params, lm, text, tokens, n, rounds, name, threading) -> dict:
    """``n`` requests at once over four cached documents, two or more per document,
    each round with new questions: per request, the time from submission to its first
    (and only) token; the best of ``rounds`` rounds, and every round's wall time
    (``wall_s_rounds``).

    The four documents are sent alone first (the store, or the example's folder, holds
    them). A request then is a document and a question never asked before: kvcodec
    loads the whole document (it finds the document's partial last chunk under the
    longer prompt, :mod:`kvcodec.store.tails`; with ``whole_blocks``, through its last
    whole block) and vLLM computes the question; the example loads through the
    document's last whole block (1,920 of its 2,000 tokens: its files are named by the
    block-aligned prefix) and vLLM computes the rest. kvcodec also saves each request's
    last chunk (the document's end and the question), encoded in the background while
    the next round runs."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    docs = [ids[i * tokens:(i + 1) * tokens] for i in range(4)]
    if len(docs[-1]) < tokens:
        sys.exit(f"the text holds fewer than 4 x {tokens} tokens")

    def prompts(r):
        asks = [f"\n\nQuestion {r}.{i}: what does this part say?\nAnswer:" for i in range(n)]
        return [docs[i % 4] + lm.tokenizer(a, add_special_tokens=False)["input_ids"]
                for i, a in enumerate(asks)]
    for d in docs:  # fill the store (and warm the engine)
        llm.generate([{"prompt_token_ids": d}], params, use_tqdm=False)
    if name.startswith("kvcodec"):
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        get_kv_transfer_group().flush()
    engine = llm.llm_engine
    best, walls = None, []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i, p in enumerate(prompts(r)):
            engine.add_request(f"r{r}-{i}", {"prompt_token_ids": p}, params)
        done = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done.append(time.perf_counter() - t0)
        total = time.perf_counter() - t0
        walls.append(round(total, 4))
        if best is None or total < best[0]:
            best = (total, sorted(done))
    total, ttfts = best
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(round(q * (len(ttfts) - 1))))]  # noqa: E731
    return {"name": name, "concurrent": n, "wall_s": round(total, 4),
            "requests_per_s": round(n / total, 3), "ttft_p50_s": round(pct(0.5), 4),
            "ttft_p99_s": round(pct(0.99), 4), "wall_s_rounds": walls,
            "prompt_tokens": len(prompts(0)[0]),
            "torch_threads": __import__("torch").get_num_threads(), **threading}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    ap.add_argument("--dtype", default="auto", help="auto: the fast one for this CPU")
    ap.add_argument("--concurrent", type=int, default=0, help="N requests at once")
    ap.add_argument("--processes", type=int, default=3, help="engine processes per case "
                    "(each its best of --rounds; the median process is reported)")
    ap.add_argument("--s3-server", choices=("keepalive", "moto"), default="keepalive",
                    help="the -1g case's S3 (s3_server.py): keep-alive connections, as S3, "
                    "or moto's own server, which closes each")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child
    args = ap.parse_args()
    from kvcodec.integrations.vllm.cpu import fast_dtype

    dtype, why = fast_dtype() if args.dtype == "auto" else (args.dtype, "asked for")
    if args.case:
        print("CASE " + json.dumps(run_case(args.case, args.tokens, args.rounds, dtype,
                                            args.concurrent, args.s3_server)))
        return
    runs = {name: [] for name in args.cases}
    for _ in range(args.processes):  # interleaved, so drifts of the machine hit every case
        for name in args.cases:
            out = subprocess.run([sys.executable, __file__, "--case", name, "--tokens",
                                  str(args.tokens), "--rounds", str(args.rounds), "--dtype",
                                  dtype, "--concurrent", str(args.concurrent),
                                  "--s3-server", args.s3_server],
                                 capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("CASE ")]
            if out.returncode or not line:
                sys.exit(f"case {name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(line[0][5:]))
            print(f"{name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    key = "wall_s" if args.concurrent else "ttft_s"
    cases = []
    for name, rs in runs.items():  # the process of median time, with every process's time
        rs = sorted(rs, key=lambda r: r[key])
        cases.append(dict(rs[(len(rs) - 1) // 2], **{key + "_processes": [r[key] for r in rs]}))
    by = {c["name"]: c for c in cases}
    if args.concurrent:
        print(json.dumps({"dtype": dtype, "dtype_why": why, "cases": cases}))
        return
    if not set(REQUIRED) <= set(by):
        print(json.dumps({"cases": cases}))
        return
    # 1 Gbit/s, modelled: each case's TTFT plus its bytes' transfer time; the -1g case
    # went through a real throttled socket already.
    link = lambda c: c["ttft_s"] + (0 if c["name"].endswith("-1g")  # noqa: E731
                                    else c["bytes_read"] * 8 / 1e9)
    summary = {
        "dtype": dtype, "dtype_why": why,
        "example_over_kvcodec_default":
            round(by["example"]["ttft_s"] / by["kvcodec-default"]["ttft_s"], 2),
        **({"example_over_kvcodec_default_blocks":  # the same tokens loaded and computed
            round(by["example"]["ttft_s"] / by["kvcodec-default-blocks"]["ttft_s"], 2)}
           if "kvcodec-default-blocks" in by else {}),
        "bytes_example_over_kvcodec_default":
            round(by["example"]["bytes_stored"] / by["kvcodec-default"]["bytes_stored"], 2),
        "ttft_prefill_over_kvcodec_default":
            round(by["prefill"]["ttft_s"] / by["kvcodec-default"]["ttft_s"], 2),
        "decode_kvcodec_default_over_prefill": round(
            by["kvcodec-default"]["decode_ms_per_token"]
            / by["prefill"]["decode_ms_per_token"], 2),
        "ttft_at_1gbps": {n: round(link(c), 4) for n, c in by.items()},
        "at_1gbps_example_over_kvcodec_default":
            round(link(by["example"]) / link(by["kvcodec-default"]), 2),
        **({"at_1gbps_example_over_kvcodec_default_real_link":
            round(link(by["example"]) / by["kvcodec-default-1g"]["ttft_s"], 2)}
           if "kvcodec-default-1g" in by else {}),
    }
    out = {"cases": cases, **summary}
    if args.json:
        print(json.dumps(out))
    else:
        for c in cases:
            print(f"{c['name']:16s} TTFT {c['ttft_s']:.3f} s  stored {c['bytes_stored']:>11,}  "
                  f"read {c['bytes_read']:>11,}  computed {c['tokens_computed']}  "
                  f"decode {c['decode_ms_per_token']} ms/token")
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
