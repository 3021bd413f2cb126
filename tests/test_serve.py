"""The serving front doors: vLLM's own `vllm serve` command in this venv, and `kvcodec
serve` (the same server with the connector and a store configured in one line), started
as a user starts it and asked over HTTP."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvcodec.store.tails import RECENT_EXACT
from kvcodec_cli.main import main

RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"
QUESTION = "\n\nQuestion: In one sentence, what is this document about?\nAnswer:"
START_S = 300  # a cold start measured 73 s on 2 cores (model load, connector, KV cache)


def test_the_vllm_command_runs():
    """`vllm ...` asks importlib.metadata for the distribution `vllm`; the CPU build is
    `vllm-cpu`, and the alias packaging/vllm-alias (installed by the Makefile) names it,
    with the `+cpu` tag vLLM's platform detection reads."""
    vllm = Path(sys.executable).parent / "vllm"
    out = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0.32.0+cpu"


@pytest.fixture
def no_exec(monkeypatch):
    """`kvcodec serve` ends in os.execve: here it records the command instead of
    replacing the test process."""
    calls = []
    monkeypatch.setattr("kvcodec_cli.serve.os.execve",
                        lambda path, argv, env: calls.append((argv, dict(env))))
    monkeypatch.delenv(RESERVED, raising=False)  # cpu_env() sets it; restored after
    return calls


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/missing.gguf"], "is neither the embedded default"),
    (["--config", "nosuch"], "no config 'nosuch'"),
    (["--block-size", "96"], "chunks of 256 tokens must be a whole number of vLLM blocks"),
])
def test_a_mistake_is_one_line_before_vllm_starts(tmp_path, no_exec, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(main, ["serve", "--store", str(tmp_path / "kv"), *args])
    assert r.exit_code == 1 and not no_exec, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "kv").exists()  # refused before the store was touched


def test_a_store_url_no_filesystem_knows_is_one_line(no_exec):
    r = CliRunner().invoke(main, ["serve", "--store", "nosuch://bucket/kv"])
    assert r.exit_code == 1 and not no_exec
    assert r.stderr.startswith("error: store nosuch://bucket/kv: ") and r.stderr.count("\n") == 1


def test_usage_mistakes(tmp_path, no_exec):
    store = str(tmp_path / "kv")
    r = CliRunner().invoke(main, ["serve", "--store", store, "some/model"])
    assert r.exit_code == 2 and "give the model with --model" in r.output
    r = CliRunner().invoke(main, ["serve", "--store", store, "--kv-transfer-config", "{}"])
    assert r.exit_code == 2 and "sets vLLM's --kv-transfer-config itself" in r.output
    r = CliRunner().invoke(main, ["serve", "--store", store, "--max-bytes", "lots"])
    assert r.exit_code == 2 and "not a size" in r.output
    assert not no_exec


def test_the_command_it_runs(tmp_path, no_exec):
    """The store and its options reach the connector's extra config, vLLM's options pass
    through in order, and the dtype and threading are chosen and said unless given."""
    from kvcodec.integrations.vllm.cpu import fast_dtype
    from kvcodec.models.loading import resolve_model_path

    store = tmp_path / "kv"
    r = CliRunner().invoke(main, ["serve", "--store", str(store), "--max-bytes", "1.5G",
                                  "--ttl", "3600", "--port", "8123", "--metrics-port", "9400",
                                  "--max-model-len", "4096", "--", "--config", "vllm.yaml"])
    assert r.exit_code == 0, r.output
    (argv, env), = no_exec
    assert argv[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    model = str(resolve_model_path(None).resolve())
    assert argv[4] == model and store.is_dir()
    cfg = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert cfg["kv_connector"] == "KVCodecConnector"
    assert cfg["kv_load_failure_policy"] == "recompute"
    assert cfg["kv_connector_extra_config"] == {
        "store": str(store.resolve()), "config": "default", "max_bytes": 3 << 29,
        "ttl_s": 3600.0, "metrics_port": 9400}
    assert argv[-6:] == ["--port", "8123", "--max-model-len", "4096", "--config", "vllm.yaml"]
    dtype, why = fast_dtype()
    assert argv[argv.index("--dtype") + 1] == dtype
    assert f"kvcodec serve: dtype {dtype} ({why})" in r.stderr
    assert "kvcodec serve: threads: " in r.stderr
    if (os.cpu_count() or 1) <= 4:
        assert env[RESERVED] == "0" and f"{RESERVED}=0" in r.stderr
    shown = [l for l in r.stderr.splitlines() if l.startswith("$ vllm serve ")]
    assert len(shown) == 1 and model in shown[0]

    no_exec.clear()  # selective blends on their rows only: the option and an eager model
    r = CliRunner().invoke(main, ["serve", "--store", str(store), "--blend-rows-only"])
    assert r.exit_code == 0, r.output
    argv = no_exec[0][0]
    cfg = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert cfg["kv_connector_extra_config"]["blend_rows_only"] is True
    assert argv.count("--enforce-eager") == 1

    no_exec.clear()  # the user's dtype is theirs
    r = CliRunner().invoke(main, ["serve", "--store", str(store), "--dtype=bfloat16"])
    assert r.exit_code == 0, r.output
    argv = no_exec[0][0]
    assert argv.count("--dtype") == 0 and "--dtype=bfloat16" in argv
    assert "kvcodec serve: dtype bfloat16 (yours)" in r.stderr

    no_exec.clear()  # how many last prompt tokens vLLM computes itself
    r = CliRunner().invoke(main, ["serve", "--store", str(store), "--recompute-last-tokens",
                                  "128"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(no_exec[0][0][no_exec[0][0].index("--kv-transfer-config") + 1])
    assert cfg["kv_connector_extra_config"]["recompute_last_tokens"] == 128
    r = CliRunner().invoke(main, ["serve", "--store", str(store), "--recompute-last-tokens",
                                  "0"])
    assert r.exit_code == 2 and "--recompute-last-tokens" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _metric(text, name) -> float:
    """The sum of a Prometheus counter's samples (every label set)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_a_precomputed_document_is_a_hit_over_http(lm, texts, tmp_path):
    """`kvcodec precompute` a document, `kvcodec serve` the store, and an OpenAI
    completion whose text prompt starts with the document loads it (the default store is
    lossy: up to the prompt's last RECENT_EXACT tokens, which vLLM computes): vLLM's own
    counters of the connector's prefix hits say so."""
    from kvcodec.models import text_ids
    from kvcodec.models.loading import model_name
    from kvcodec.store import ChunkStore

    doc_text = texts["gpl3"][:2700]
    (tmp_path / "doc.txt").write_text(doc_text)
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["precompute", "--store", str(store), "--no-progress",
                                  str(tmp_path / "doc.txt")])
    assert r.exit_code == 0, r.output
    cached = ChunkStore(store, lm.fingerprint).cached_tokens(text_ids(lm.tokenizer, doc_text))
    assert cached == 512  # two whole chunks of the ~600-token document

    port, log = _free_port(), tmp_path / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")  # GiB
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvcodec_cli.main", "serve", "--store", str(store),
             "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
             "--dtype", "float32", "--enforce-eager"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0, deadline = time.monotonic(), time.monotonic() + START_S
        while True:
            try:
                _get(base + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, (f"no /health after {START_S} s\n"
                                                     + log.read_text()[-4000:])
                time.sleep(1)
        print(f"kvcodec serve answered /health after {time.monotonic() - t0:.0f} s")
        said = log.read_text()
        assert "kvcodec serve: dtype float32 (yours)" in said
        assert "kvcodec serve: threads: " in said and "$ vllm serve " in said

        body = json.dumps({"model": model_name(None), "prompt": doc_text + QUESTION,
                           "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.load(resp)
        assert answer["choices"][0]["text"].strip()
        prompt_tokens = answer["usage"]["prompt_tokens"]
        deadline = time.monotonic() + 15  # the stats reach /metrics after the step
        while True:
            metrics = _get(base + "/metrics")
            hits = _metric(metrics, "vllm:external_prefix_cache_hits_total")
            if hits or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert _metric(metrics, "vllm:external_prefix_cache_queries_total") == prompt_tokens
        whole = ChunkStore(store, lm.fingerprint).cached_tokens(
            text_ids(lm.tokenizer, doc_text + QUESTION), partial=True)  # its end too
        assert whole > cached
        assert hits == min(whole, prompt_tokens - RECENT_EXACT), (hits, prompt_tokens)
        assert hits >= 0.8 * prompt_tokens
        _blend_over_http(lm, texts, tmp_path, store, base)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _blend_over_http(lm, texts, tmp_path, store, base):
    """Two documents precomputed position-independently, asked about in the other order
    in one completion body (token ids, the blend salt, kv_transfer_params) that
    `kvcodec blend-request` printed: both are loaded from the store (the server's own
    counters say so)."""
    from kvcodec.blend import Cached, Text
    from kvcodec.integrations.vllm.blending import request_for
    from kvcodec.models.loading import model_name

    docs = [texts["python_license"][:900], "\n\n" + texts["argparse_doc"][:900]]
    for i, d in enumerate(docs):
        (tmp_path / f"ind{i}.txt").write_text(d)
    r = CliRunner().invoke(main, ["precompute", "--store", str(store), "--independent",
                                  "--no-progress", str(tmp_path / "ind0.txt"),
                                  str(tmp_path / "ind1.txt")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["blend-request", "--doc", str(tmp_path / "ind1.txt"),
                                  "--doc", str(tmp_path / "ind0.txt"), "--prompt", QUESTION,
                                  "--max-tokens", "8"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    prompt, params = request_for(lm.tokenizer, [Cached(text=docs[1]), Cached(text=docs[0]),
                                                Text(QUESTION)])
    assert (body["prompt"], body["cache_salt"], body["kv_transfer_params"]) == (
        prompt["prompt_token_ids"], prompt["cache_salt"], params)
    assert body["model"] == model_name(None)
    before = _metric(_get(base + "/metrics"), "vllm:kvcodec_blend_documents_total")
    body = json.dumps(dict(body, temperature=0)).encode()
    req = urllib.request.Request(base + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.load(resp)["choices"][0]["text"].strip()
    deadline = time.monotonic() + 15
    while True:
        got = _metric(_get(base + "/metrics"), "vllm:kvcodec_blend_documents_total") - before
        if got or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == 2
