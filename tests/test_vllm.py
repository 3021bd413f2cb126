"""The vLLM connector on a real vLLM engine (the CPU build), the embedded model.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the test can read
the connector's counters; everything else is vLLM as a user runs it.
"""
import gc
import os
import subprocess
import sys

import pytest

import kvcodec
from kvcodec.models.loading import resolve_model_path
from kvcodec.store.tails import RECENT_EXACT


QUESTION = "\n\nQuestion: In one sentence, what is this document about?\nAnswer:"
MAX_NEW = 24
SCORED = 64  # tokens the lossy check teacher-forces (test_lossy_default_agreement)


def _engine(store, config, model=None):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    from vllm import LLM  # installed by `make test` (the [vllm] extra)

    # Stats logged (as `vllm serve` does), so that the connector's metrics reach vLLM's
    # Prometheus metrics in this process.
    return LLM(model=str(model or resolve_model_path(None)), dtype="float32", max_model_len=1024,
               enforce_eager=True, max_num_seqs=2, enable_prefix_caching=False,
               disable_log_stats=False,
               kv_transfer_config={
                   "kv_connector": "KVCodecConnector",
                   "kv_connector_module_path": "kvcodec.integrations.vllm",
                   "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                   "kv_connector_extra_config": {"store": str(store), "config": config}})


def _connector():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def _vllm_metrics(prefix="vllm:kvcodec_") -> dict:
    """vLLM's Prometheus samples in this process whose names start with ``prefix``,
    summed over labels other than ``stage`` and ``cause`` (what /metrics would show)."""
    from prometheus_client import REGISTRY

    out = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name.startswith(prefix):
                key = s.name + "".join(f":{s.labels[k]}" for k in ("stage", "cause", "le")
                                       if k in s.labels)
                out[key] = out.get(key, 0) + s.value
    return out


def _ask(llm, ids, salt=None):
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": ids}
    if salt is not None:
        prompt["cache_salt"] = salt
    out = llm.generate([prompt],
                       SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids)


def _prompt(lm, text, tokens):
    doc = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return doc, doc + lm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]


def _agreement(a, b):
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    store = tmp_path_factory.mktemp("vllm-lossless")
    llm = _engine(store, "lossless")
    yield llm, store
    del llm
    # Collected now: the engine's finalizer tears down vLLM's global distributed state
    # (cleanup_dist_env_and_memory); run by a later collection, it could do that in the
    # middle of the next engine's start ("tensor model parallel group is not
    # initialized").
    gc.collect()


def test_second_request_loads_what_the_first_saved(lm, texts, lossless):
    from kvcodec.store import ChunkStore

    llm, store = lossless
    _, ids = _prompt(lm, texts["gpl3"], 600)
    start = _vllm_metrics()
    first = _ask(llm, ids)
    conn = _connector()
    conn.flush()  # the background encode has finished
    chunks = ChunkStore(store, lm.fingerprint, "lossless")
    # The prompt (600 document tokens and the question): two whole 256-token chunks and
    # its partial last one.
    assert chunks.cached_tokens(ids, partial=True) == len(ids)
    assert len(chunks.lookup(ids, partial=True)) == 3
    before = (conn.tokens_loaded, conn.bytes_read)
    second = _ask(llm, ids)
    # Every prompt token is loaded but the last, which vLLM computes itself (it used to
    # compute from the last whole block: 105 tokens, 512 loaded), from all three entries.
    assert conn.tokens_loaded - before[0] == len(ids) - 1
    assert conn.bytes_read - before[1] == sum(p.stat().st_size
                                              for p in chunks.lookup(ids, partial=True))
    assert second == first  # lossless: the same greedy answer
    # The store's metrics reached vLLM's Prometheus metrics through the connector stats:
    # the scheduler side's lookups (one per request; the second hit every token), the
    # worker side's reads, stages and saves (written after the first request's steps,
    # reported with the second's).
    got = {k: v - start.get(k, 0) for k, v in _vllm_metrics().items()}
    entries = chunks.lookup(ids, partial=True)
    assert got["vllm:kvcodec_lookups_total"] == 2
    assert got["vllm:kvcodec_lookup_tokens_total"] == 2 * len(ids)
    assert got["vllm:kvcodec_hit_tokens_total"] == len(ids)
    assert got["vllm:kvcodec_entries_read_total"] == 3
    assert got["vllm:kvcodec_bytes_read_total"] == conn.bytes_read - before[1]
    assert got["vllm:kvcodec_entries_written_total"] == 3
    assert got["vllm:kvcodec_bytes_written_total"] == sum(p.stat().st_size for p in entries)
    assert got["vllm:kvcodec_saves_queued_total"] == got["vllm:kvcodec_saves_written_total"] == 1
    assert got.get("vllm:kvcodec_saves_dropped_total", 0) == 0
    assert got["vllm:kvcodec_load_seconds_count:open"] == 3
    from kvcodec.integrations.vllm.worker import layer_groups

    # one plan per group: doubling groups beside the forward pass, else one (600 tokens)
    groups = len(layer_groups(list(range(30)), conn.worker.overlap, 1, 1 << 30))
    assert got["vllm:kvcodec_load_seconds_count:decode"] == groups
    assert got["vllm:kvcodec_load_seconds_count:write"] == groups
    assert got["vllm:kvcodec_encode_seconds_count"] == 3
    assert got["vllm:kvcodec_load_seconds_bucket:write:+Inf"] == groups
    assert sum(got.get(f"vllm:kvcodec_load_failures_total:{c}", 0)
               for c in ("damaged", "missing", "environment", "timeout")) == 0
    assert _vllm_metrics("vllm:external_prefix_cache_hits")  # vLLM's own count


def test_loads_before_or_beside_the_forward_pass_land_the_same(lm, texts, lossless):
    """``overlap_loads``: on a CPU whose every core the model computes on, the connector
    decodes in start_load_kv, before the forward pass (``auto``); beside it, the loader's
    thread decodes layer by layer while attention waits for each. Both land the same
    K/V. The connector's own threads (loader, fetches, saves) run torch on one thread:
    an OpenMP team of theirs would outnumber the CPUs and slow every forward pass."""
    import threading

    import torch

    from kvcodec.integrations.vllm.cpu import overlap_loads

    llm, _ = lossless
    _, ids = _prompt(lm, texts["gpl3"], 600)
    first = _ask(llm, ids)
    conn = _connector()
    conn.flush()
    worker = conn.worker
    assert worker.overlap is overlap_loads("auto", "cpu")
    threads = torch.get_num_threads()
    seen, load_layers = [], worker._load_layers

    def spy(jobs, beside=False):
        load_layers(jobs, beside)
        seen.append((threading.current_thread().name, torch.get_num_threads()))

    worker._load_layers = spy
    answers = {}
    try:
        for overlap in (False, True):
            worker.overlap = overlap
            answers[overlap] = _ask(llm, ids)
    finally:
        worker.overlap = overlap_loads("auto", "cpu")
        del worker._load_layers
    assert answers[False] == answers[True] == first  # lossless: the same greedy answer
    assert seen == [(threading.current_thread().name, threads), ("kvcodec-load", 1)]
    assert torch.get_num_threads() == threads
    assert worker._encoder.submit(torch.get_num_threads).result() == 1
    assert worker._fetcher.submit(torch.get_num_threads).result() == 1


def test_a_damaged_entry_is_recomputed(lm, texts, lossless):
    llm, store = lossless
    _, ids = _prompt(lm, texts["python_license"], 560)
    old = set(store.rglob("*.kvc"))
    first = _ask(llm, ids)
    conn = _connector()
    conn.flush()
    new = set(store.rglob("*.kvc")) - old
    assert new
    for path in new:  # damage the payload of every entry the first request saved
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    before = conn.blocks_failed
    second = _ask(llm, ids)
    assert second == first  # the request completed, with the prefill's output
    # Reported: vLLM recomputed every token the load was to bring, all but the last.
    assert conn.blocks_failed - before == -(-(len(ids) - 1) // 128)
    assert list(store.rglob("*.kvc.bad"))  # moved aside


def _ask_together(llm, prompts):
    """Several prompts submitted at once (scheduled in the same step, max_num_seqs=2)."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("damaged", [False, True])
def test_requests_of_a_step_sharing_a_document_decode_it_once(lm, texts, lossless, damaged):
    """Two requests in one step over the same cached document (different questions):
    the document's entries are decoded once and written into both requests' blocks, each
    request's own last entry (document end and its question) separately, with the
    answers each gets alone; a damaged shared entry stops both loads there."""
    from kvcodec.store import ChunkStore

    llm, store = lossless
    doc = lm.tokenizer(texts["argparse_doc"][20000 + 4000 * damaged:],
                       add_special_tokens=False)["input_ids"][:700]
    asks = [doc + lm.tokenizer(q, add_special_tokens=False)["input_ids"]
            for q in (QUESTION, "\n\nQuestion: Which names does it define?\nAnswer:")]
    alone = [_ask(llm, ids) for ids in asks]  # each stores its chunks, then answers alone
    conn = _connector()
    conn.flush()
    assert [_ask(llm, ids) for ids in asks] == alone  # loaded alone: lossless
    if damaged:
        entry = ChunkStore(store, lm.fingerprint, "lossless").lookup(doc)[1]
        data = bytearray(entry.read_bytes())
        data[-100] ^= 0xFF
        entry.write_bytes(bytes(data))
    chunks = ChunkStore(store, lm.fingerprint, "lossless")
    entries = {p for ids in asks for p in chunks.lookup(ids, partial=True)[:3]}
    assert len(entries) == 4  # two shared, one of each request's own
    size = sum(p.stat().st_size for p in entries)
    before = (conn.tokens_loaded, conn.tokens_shared, conn.blocks_failed, conn.bytes_read)
    together = _ask_together(llm, asks)
    assert together == alone
    loaded, shared, failed = (conn.tokens_loaded - before[0], conn.tokens_shared - before[1],
                              conn.blocks_failed - before[2])
    assert conn.bytes_read - before[3] == size  # each entry read once
    # Each prompt but its last token: the two shared chunks decoded once, then each its
    # own partial chunk (tokens 512 on); counted at the first layer group. Beside the
    # forward pass that is layer 0 alone, before the damage (in a late layer's bytes)
    # shows; before it, every layer: only the first chunk lands, once for both.
    early = not damaged or conn.worker.overlap
    assert (loaded, shared) == ((sum(len(a) - 1 for a in asks), 512) if early else (512, 256))
    if damaged:  # both loads stop at the damaged second chunk: blocks 2 on recomputed
        assert failed == sum(-(-(len(a) - 1) // 128) - 2 for a in asks)
        assert entry.with_name(entry.name + ".bad").exists()  # moved aside
    else:
        assert failed == 0


def test_a_failed_load_is_not_saved_back(lm, texts, lossless):
    """A cached document, a damaged chunk in its middle and an uncached question: the
    load fails there, vLLM recomputes, and what the step's forward saw in the failed
    blocks (another request's data) never reaches the store: the entry is either gone
    or holds this document's own K/V (before: it was rewritten with the stale blocks,
    valid checksums and wrong values, served to every later request)."""
    import torch

    from kvcodec.store import ChunkStore

    llm, store = lossless
    doc, ids = _prompt(lm, texts["argparse_doc"][3000:], 600)
    _ask(llm, ids)  # stores the document's chunks
    conn = _connector()
    conn.flush()
    chunks = ChunkStore(store, lm.fingerprint, "lossless")
    entry = chunks.lookup(doc)[1]
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    # Another request overwrites the freed blocks with other K/V.
    _ask(llm, _prompt(lm, texts["python_license"], 700)[1])
    conn.flush()
    other = doc + lm.tokenizer("\n\nQuestion: Who wrote it?\nAnswer:",
                               add_special_tokens=False)["input_ids"]
    before = conn.blocks_failed
    _ask(llm, other)
    conn.flush()
    assert conn.blocks_failed > before  # the damaged chunk was recomputed
    with torch.no_grad():
        ref = kvcodec.capture_kv(lm, token_ids=doc[:512], importance_window=0)
    if entry.exists():  # rewritten: it must be this document's chunk
        with kvcodec.open(entry) as f:
            got = f.decode()
        for a, b in zip(got.keys + got.values, ref.slice(256, 512).keys + ref.slice(256, 512).values):
            err = float((a.float() - b.float()).norm() / b.float().norm())
            assert err < 0.05, f"entry {entry.name} holds other K/V (relative error {err:.2f})"


def _saved(lm, llm, store, ids, salt=None):
    """Ask once (the engine saves the prompt), wait for the save; the entries' paths."""
    from kvcodec.store import ChunkStore

    _ask(llm, ids, salt)
    _connector().flush()
    chunks = ChunkStore(store, lm.fingerprint, "lossless", salt=salt)
    return chunks, chunks.lookup(ids)


def test_an_entry_of_another_geometry_is_refused(lm, texts, lossless):
    """An entry with twice the KV heads, under the right name and claiming the right
    model: decoded into vLLM's blocks it would overrun them (vLLM's op checks nothing).
    It is refused as damage and recomputed."""
    import torch

    from kvcodec.core.kvcache import KVCache

    llm, store = lossless
    _, ids = _prompt(lm, texts["gpl3"][9000:], 300)
    chunks, paths = _saved(lm, llm, store, ids)
    reference = _ask(llm, ids)
    # Through the store: a store entry names the store's shared tables, which a file
    # opened alone does not hold (run alone, this test has no other test's tables)
    with chunks.open_entry(paths[0], ids[:chunks.chunk_tokens], 0) as f:
        kv = f.decode()
    fp = dict(lm.fingerprint, num_kv_heads=2 * lm.fingerprint["num_kv_heads"])
    wide = KVCache([torch.cat([k, k], 1) for k in kv.keys],
                   [torch.cat([v, v], 1) for v in kv.values], kv.token_ids, fp)
    paths[0].write_bytes(kvcodec.encode(wide, config="lossless"))
    conn = _connector()
    before = (conn.blocks_failed, conn.tokens_loaded)
    assert _ask(llm, ids) == reference
    assert conn.blocks_failed > before[0] and conn.tokens_loaded == before[1]
    assert not paths[0].exists() and paths[0].with_name(paths[0].name + ".bad").exists()


def test_an_unreadable_store_is_recomputed_and_keeps_its_entries(lm, texts, lossless,
                                                                 monkeypatch, caplog):
    """Too many open files during a load, then a store slower than the load timeout:
    both recompute (with a log line), and neither moves a good entry aside (before:
    EMFILE became a KVCodecError and the entry went to .bad)."""
    import errno
    import time

    from kvcodec.store import backends

    llm, store = lossless
    _, ids = _prompt(lm, texts["gpl3"][20000:], 300)
    _, paths = _saved(lm, llm, store, ids)
    reference = _ask(llm, ids)
    conn = _connector()
    real_open = open

    def emfile(path, *a, **k):
        if str(path).endswith(".kvc"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr("builtins.open", emfile)
        m.setattr("io.open", emfile)
        before = conn.blocks_failed
        assert _ask(llm, ids) == reference
        assert conn.blocks_failed > before
    assert all(p.exists() and not p.with_name(p.name + ".bad").exists() for p in paths)
    assert "Too many open files" in caplog.text and "left in place" in caplog.text

    worker = conn.worker
    fetch = backends.LocalBackend.fetch

    def slow(self, rel, limit):
        time.sleep(worker.load_timeout_s + 0.5)
        return fetch(self, rel, limit)

    with monkeypatch.context() as m:
        m.setattr(worker, "load_timeout_s", 0.3)
        m.setattr(backends.LocalBackend, "fetch", slow)
        before = conn.blocks_failed
        assert _ask(llm, ids) == reference
        assert conn.blocks_failed > before
    assert "did not deliver" in caplog.text
    assert all(p.exists() for p in paths)
    before = conn.tokens_loaded
    assert _ask(llm, ids) == reference  # the store works again: a hit
    assert conn.tokens_loaded > before


def test_cache_salts_separate_tenants(lm, texts, lossless):
    """vLLM's ``cache_salt`` is part of the keys: what tenant A's request stored is a miss
    for tenant B (no shared entries, nothing to time) and a hit for A again."""
    llm, store = lossless
    _, ids = _prompt(lm, texts["gpl3"][30000:], 300)
    chunks_a, paths_a = _saved(lm, llm, store, ids, salt="tenant-a")
    assert paths_a
    conn = _connector()
    before = conn.tokens_loaded
    _ask(llm, ids, "tenant-b")
    assert conn.tokens_loaded == before  # B misses A's entries
    conn.flush()
    assert chunks_a.with_salt("tenant-b").lookup(ids)  # B's own, under other keys
    assert not set(chunks_a.with_salt("tenant-b").lookup(ids)) & set(paths_a)
    assert not chunks_a.with_salt(None).lookup(ids)  # nor unsalted ones
    _ask(llm, ids, "tenant-a")
    assert conn.tokens_loaded > before  # A hits its own


def test_precomputed_store_is_served_by_vllm(lm, texts, tmp_path, lossless):
    """`kvcodec precompute` (transformers) fills the store vLLM reads: HF's lossless K/V
    in vLLM's cache; HF and vLLM numerics differ slightly, so agreement is reported."""
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    llm, store = lossless
    doc, ids = _prompt(lm, texts["argparse_doc"], 520)
    reference = _ask(llm, ids)  # nothing stored yet: vLLM's own prefill
    conn = _connector()
    conn.flush()
    for p in store.rglob("*.kvc"):
        p.unlink()  # what vLLM saved goes; the store is refilled by transformers
    text = tmp_path / "doc.txt"
    text.write_text(texts["argparse_doc"])
    r = CliRunner().invoke(main, ["precompute", "--store", str(store), "--config", "lossless",
                                  "--max-tokens", str(len(doc)), str(text)])
    assert r.exit_code == 0, r.output
    before = conn.tokens_loaded
    served = _ask(llm, ids)
    assert conn.tokens_loaded - before == 512
    agreement = _agreement(served, reference)
    print(f"HF-precomputed store served by vLLM: greedy agreement {agreement:.2f} "
          f"over {MAX_NEW} tokens")
    assert agreement >= 0.5


def test_a_precomputed_documents_end_is_loaded_under_a_question(lm, texts, tmp_path,
                                                                  lossless):
    """A document precomputed alone ends with a partial chunk; a prompt of it and a
    question continues it, so vLLM loads the whole document (656-767 tokens here), not
    only its whole chunks (512), nor only through its last whole block (640)."""
    from click.testing import CliRunner

    from kvcodec.store import ChunkStore
    from kvcodec_cli.main import main

    llm, store = lossless
    tok = lm.tokenizer
    # A text of 640 + 16..127 tokens: two whole 256-token chunks, then past a block.
    size = lambda n: len(tok(texts["gpl3"][:n], add_special_tokens=False)["input_ids"])  # noqa
    cut = next(n for n in range(2000, 6000, 40) if 656 <= size(n) < 768)
    text = texts["gpl3"][:cut]
    doc = tok(text, add_special_tokens=False)["input_ids"]
    ids = doc + tok(QUESTION, add_special_tokens=False)["input_ids"]
    conn = _connector()
    conn.flush()
    for p in store.rglob("*.kvc"):
        p.unlink()  # only the precomputed document
    (tmp_path / "doc.txt").write_text(text)
    r = CliRunner().invoke(main, ["precompute", "--store", str(store), "--config", "lossless",
                                  str(tmp_path / "doc.txt")])
    assert r.exit_code == 0, r.output
    chunks = ChunkStore(store, lm.fingerprint, "lossless")
    assert chunks.cached_tokens(ids, partial=True) == len(doc)
    assert chunks.cached_tokens(ids) == 512  # whole chunks only
    before = conn.tokens_loaded
    _ask(llm, ids)
    assert conn.tokens_loaded - before == len(doc)


def test_lossy_default_agreement(lm, texts, tmp_path):
    """With the default config (in an engine of its own, in a subprocess): the second
    request is served from the store. Free-running greedy agreement with the first
    answer is reported; it collapses after the first flipped token, and vLLM computes no
    prompt logprobs for loaded tokens, so the quality check is teacher-forced, in
    transformers, on the entries vLLM saved: top-1 agreement and KL against the
    uncompressed prefix over the first answer, continued greedily (uncompressed) to
    SCORED tokens: over 24 tokens one flipped token moves top-1 by 0.04, and configs
    that are better on average (14 of 18 such answers, mean KL -11%) fell either side
    of the bar on this one prompt."""
    import json

    import torch

    from kvcodec.quality.evaluate import compare_logits
    from kvcodec.integrations.hf import prefill_with_store
    from kvcodec.store import ChunkStore

    code = f"""
import json, os, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import kvcodec, test_vllm as t
from conftest import real_texts
lm = kvcodec.load_model()
_, ids = t._prompt(lm, real_texts()["gpl3"], 600)
llm = t._engine({str(tmp_path)!r}, "default")
first = t._ask(llm, ids)
t._connector().flush()
before = t._connector().tokens_loaded
second = t._ask(llm, ids)
print("RESULT", json.dumps({{"loaded": t._connector().tokens_loaded - before,
                            "ids": ids, "first": first, "second": second}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and line, out.stderr[-3000:]
    r = json.loads(line[0][len("RESULT "):])
    # A lossy store: every prompt token but the last RECENT_EXACT, which vLLM computes
    # (exact K/V right before the answer; reuse_end).
    assert r["loaded"] == len(r["ids"]) - RECENT_EXACT and len(r["second"]) == MAX_NEW
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    with torch.no_grad():
        more = lm.model.generate(torch.tensor([r["ids"] + r["first"]]), do_sample=False,
                                 max_new_tokens=SCORED - MAX_NEW)[0, len(r["ids"]) + MAX_NEW:]
        answer = r["first"] + more.tolist()
        full = r["ids"] + answer
        ref = lm.model(input_ids=torch.tensor([full])).logits[0, len(r["ids"]) - 1:-1]
        cache, n, last = prefill_with_store(lm, store, r["ids"])
        assert n == r["loaded"]  # as vLLM: all but the last RECENT_EXACT, from the store
        rest = lm.model(input_ids=torch.tensor([answer[:-1]]), past_key_values=cache).logits[0]
    got = torch.cat([last[None], rest])
    assert len(got) == SCORED
    row = compare_logits(ref, got, answer)
    free = _agreement(r["second"], r["first"])
    print(f"default config in vLLM: loaded {r['loaded']} tokens; free-running greedy agreement "
          f"{free:.2f} over {MAX_NEW} tokens; teacher-forced over {SCORED} (HF on vLLM's "
          f"entries) top-1 {row['top1_agreement']:.2f}, KL {row['kl']:.4f}")
    assert row["top1_agreement"] >= 0.8 and row["kl"] < 0.1


def test_precompute_is_hit_by_a_text_prompt_on_a_bos_model(bos_model_dir, bos_lm, texts,
                                                          tmp_path):
    """A model whose tokenizer starts every sequence with BOS (Llama 3, Gemma, Mistral,
    Phi-3): vLLM tokenizes a *text* prompt with that BOS, and `kvcodec precompute` stores
    the document under the same ids, so a plain `llm.generate("document + question")`
    loads the document's whole chunks from the store (before the one tokenization rule,
    precompute stored ids without the BOS and vLLM never found them); so does `llm.chat`
    with a store filled by `precompute --chat`."""
    import json

    from click.testing import CliRunner

    import kvcodec
    from kvcodec.models import text_ids
    from kvcodec.store import ChunkStore
    from kvcodec_cli.main import main

    tok = bos_lm.tokenizer
    doc_text = texts["gpl3"][:2700]
    ids = text_ids(tok, doc_text)
    assert ids[0] == tok.bos_token_id and len(ids) > 512
    (tmp_path / "doc.txt").write_text(doc_text)
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["precompute", "--model", str(bos_model_dir), "--store",
                                  str(store), "--config", "lossless", str(tmp_path / "doc.txt")])
    assert r.exit_code == 0, r.output
    assert ChunkStore(store, bos_lm.fingerprint, "lossless").cached_tokens(ids) == 512
    # The same document for chat requests: the first user turn, after a system turn.
    system = "Answer from the document."
    r = CliRunner().invoke(main, ["precompute", "--model", str(bos_model_dir), "--store",
                                  str(store), "--config", "lossless", "--chat", "--system",
                                  system, str(tmp_path / "doc.txt")])
    assert r.exit_code == 0, r.output
    chat_ids = kvcodec.models.document_ids(tok, doc_text, chat=True, system=system)
    code = f"""
import json, os, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_vllm as t
from vllm import SamplingParams
llm = t._engine({str(store)!r}, "lossless", model={str(bos_model_dir)!r})
sp = SamplingParams(max_tokens=4, temperature=0)
before = t._connector().tokens_loaded
out = llm.generate([{doc_text + QUESTION!r}], sp, use_tqdm=False)[0]
text = t._connector().tokens_loaded - before
before = t._connector().tokens_loaded
chat = llm.chat([{{"role": "system", "content": {system!r}}},
                 {{"role": "user", "content": {doc_text + QUESTION!r}}}], sp, use_tqdm=False)[0]
print("RESULT", json.dumps({{"loaded": text, "prompt": list(out.prompt_token_ids),
                            "chat_loaded": t._connector().tokens_loaded - before,
                            "chat_prompt": list(chat.prompt_token_ids)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and line, out.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["prompt"][:len(ids)] == ids  # vLLM's ids: the BOS, then the document
    assert res["loaded"] == len(ids)  # its partial last chunk too (its end, then the question)
    assert res["chat_prompt"][:len(chat_ids)] == chat_ids  # vLLM's rendering of the template
    assert res["chat_loaded"] == len(chat_ids)


def test_fingerprint_of_the_vllm_model_dir_matches_transformers(lm):
    """The connector fingerprints the directory vLLM loads; it must key the store as
    transformers' side does, or neither would find the other's chunks."""
    from kvcodec.models import fingerprint_dir

    assert fingerprint_dir(resolve_model_path(None)) == lm.fingerprint


def test_layer_groups_double_after_the_first_layer():
    """The worker decodes layer 0 alone, then groups of 1, 2, 4, ... layers: every layer
    once, in order (no engine needed)."""
    from kvcodec.integrations.vllm.worker import layer_groups

    for n in (1, 2, 5, 30, 80):
        groups = layer_groups(list(range(n)))
        assert [l for g in groups for l in g] == list(range(n))
        sizes = [len(g) for g in groups]
        assert sizes[:2] == [1, 1][:n] and all(b == 2 * a for a, b in zip(sizes[1:-1], sizes[2:-1]))
    assert [len(g) for g in layer_groups(list(range(30)))] == [1, 1, 2, 4, 8, 14]


def test_loads_before_the_forward_pass_decode_in_as_few_groups_as_the_budget_holds():
    """Before the forward pass (nothing waits on a layer), the layers are decoded in one
    group where their buffers fit the budget, else in equal groups that each fit: a
    group decoded after another's writes into vLLM's cache shared the cores with the
    model's spinning OpenMP workers (no engine needed)."""
    from kvcodec.integrations.vllm.worker import layer_groups

    layers = list(range(30))
    assert layer_groups(layers, False, 3 << 20, 256 << 20) == [layers]
    for per_layer, budget in ((10 << 20, 256 << 20), (100, 1000), (7, 20), (5, 1)):
        groups = layer_groups(layers, False, per_layer, budget)
        assert [l for g in groups for l in g] == layers
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= max(sizes) // 2 + 1
        assert max(sizes) * per_layer <= budget or max(sizes) == 1
        assert len(groups) == -(-30 // max(1, budget // per_layer))


def test_loads_end_before_the_last_tokens_vllm_computes(lm, texts, tmp_path):
    """The scheduler side alone (the engine's tests above load through it): a prompt the
    store holds whole is loaded up to its last token (lossless), up to its last
    RECENT_EXACT (lossy) or ``recompute_last_tokens``, mid-block, or to the block before
    with ``whole_blocks``; never past what the store holds nor below what vLLM has."""
    from types import SimpleNamespace

    from kvcodec.integrations.vllm.scheduler import ConnectorScheduler
    from kvcodec.store import ChunkStore

    _, ids = _prompt(lm, texts["gpl3"], 600)
    kv = kvcodec.capture_kv(lm, token_ids=ids)
    req = SimpleNamespace(request_id="r", prompt_token_ids=ids, cache_salt=None,
                          kv_transfer_params=None)
    for config, recent in (("lossless", 1), ("default", RECENT_EXACT)):
        store = ChunkStore(tmp_path / config, lm.fingerprint, config)
        store.put(kv)
        n = len(ids)
        for kw, end in (({}, n - recent), ({"recent": 10}, n - 10),
                        ({"whole_blocks": True}, (n - recent) // 128 * 128)):
            sched = ConnectorScheduler(store, 128, True, **kw)
            assert sched.get_num_new_matched_tokens(req, 0) == (end, False)
            assert sched.get_num_new_matched_tokens(req, 256) == (end - 256, False)
            assert sched.get_num_new_matched_tokens(req, end) == (0, False)
        short = SimpleNamespace(**dict(vars(req), prompt_token_ids=ids[:300]))
        assert ConnectorScheduler(store, 128, True).get_num_new_matched_tokens(
            short, 0) == (min(256, 300 - recent), False)  # its first chunk only


def test_a_prompt_the_store_holds_whole_is_looked_up_once(lm, texts, tmp_path, monkeypatch):
    """The prompt's lookup found all of it: the step that completes its prefill saves
    nothing and asks the store nothing more (a second lookup was in the time to the
    first token: a round trip per chunk on an object store). A prompt it lacks the end
    of is looked up again there and saved."""
    from types import SimpleNamespace

    from kvcodec.integrations.vllm.scheduler import ConnectorScheduler
    from kvcodec.store import ChunkStore

    _, ids = _prompt(lm, texts["gpl3"], 600)
    store = ChunkStore(tmp_path / "s", lm.fingerprint, "default")
    store.put(kvcodec.capture_kv(lm, token_ids=ids))
    lookups = []
    real = ChunkStore.lookup
    monkeypatch.setattr(ChunkStore, "lookup",
                        lambda self, *a, **k: lookups.append(1) or real(self, *a, **k))
    for prompt, saved in ((ids, 0), (ids + ids[:40], 1)):
        lookups.clear()
        sched = ConnectorScheduler(store, 128, True)
        req = SimpleNamespace(request_id="r", prompt_token_ids=prompt, cache_salt=None,
                              kv_transfer_params=None)
        start, _ = sched.get_num_new_matched_tokens(req, 0)
        sched.update_state_after_alloc(req, None, start)
        blocks = list(range(-(-len(prompt) // 128)))
        out = SimpleNamespace(
            scheduled_new_reqs=[SimpleNamespace(req_id="r", block_ids=(blocks,),
                                                prompt_token_ids=prompt,
                                                num_computed_tokens=start)],
            num_scheduled_tokens={"r": len(prompt) - start},
            scheduled_cached_reqs=SimpleNamespace(req_ids=[]))
        meta = sched.build_connector_meta(out)
        assert len(meta.loads) == 1 and len(meta.saves) == saved
        assert len(lookups) == 1 + saved


def test_an_object_stores_entries_cost_one_request_each():
    """With one worker, in the scheduler's process (vLLM's ``uni`` executor), the
    connector's lookup fetches the entries it finds and the worker's load takes those
    bytes: a cached prompt's entries on an object store (``memory://``, in an engine of
    its own, in a subprocess) cost one GET each and no HEAD (a HEAD from the lookup,
    then a GET from the load, were two round trips each)."""
    import json

    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import kvcodec, test_vllm as t
from conftest import real_texts
from kvcodec.store.remote import FsspecBackend
lm = kvcodec.load_model()
_, ids = t._prompt(lm, real_texts()["gpl3"], 600)
llm = t._engine("memory://kvc-vllm/store", "lossless")
first = t._ask(llm, ids)
t._connector().flush()
calls = []
for name in ("exists", "_fetch"):
    real = getattr(FsspecBackend, name)
    setattr(FsspecBackend, name, lambda self, rel, *a, _r=real, _n=name:
            calls.append((_n, rel)) or _r(self, rel, *a))
before = t._connector().tokens_loaded
second = t._ask(llm, ids)
print("RESULT", json.dumps({{"loaded": t._connector().tokens_loaded - before,
                            "n": len(ids), "same": first == second,
                            "entries": [c for c in calls if c[1].endswith(".kvc")]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and line, out.stderr[-3000:]
    r = json.loads(line[0][len("RESULT "):])
    assert r["same"] and r["loaded"] == r["n"] - 1
    assert sorted(m for m, _ in r["entries"]) == ["_fetch"] * 3  # 600 + the question: 3
    assert len({rel for _, rel in r["entries"]}) == 3
