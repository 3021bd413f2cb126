"""Blended requests in a real vLLM engine (CPU build, fp32, the embedded model): RAG
documents cached independently and reused at any position (:mod:`kvcodec.integrations.
vllm.blending`), checked against transformers' :func:`kvcodec.blend.blend` with
``selector="none"`` on the same segments, and the store's and vLLM's prefix cache's
hygiene around them. The engine has vLLM's prefix caching on, as served."""
import gc
import os
import uuid

import pytest
import torch

import kvcodec
from kvcodec.blend import Cached, Text, blend, generate
from kvcodec.errors import ConfigError
from kvcodec.integrations.vllm import blending
from kvcodec.models import default_anchor, text_ids
from kvcodec.store import ChunkStore
from kvcodec.store.tails import RECENT_EXACT

HEAD = "You are a helpful assistant. Answer with the documents below.\n\n"
QUESTION = "\n\nQuestion: Which of these documents is about licensing?\nAnswer:"
SECOND_QUESTION = "\n\nQuestion: Quote one line.\nA:"
NEW = 16


def _ids(lm, text):
    return text_ids(lm.tokenizer, text, first=False)


def _docs(lm, texts, names, tokens=180):
    """Documents of ``tokens`` tokens, the later ones starting with their separator (a
    blend cannot compute text between two documents in vLLM: it lives in the entry)."""
    sep = _ids(lm, "\n\n")
    return [(sep if i else []) + _ids(lm, texts[n])[:tokens] for i, n in enumerate(names)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, lm):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from kvcodec.models.loading import resolve_model_path

    root = tmp_path_factory.mktemp("vllm-blend")
    llm = LLM(model=str(resolve_model_path(None)), dtype="float32", max_model_len=1024,
              enforce_eager=True, max_num_seqs=2, enable_prefix_caching=True,
              max_logprobs=-1, disable_log_stats=False,  # stats: the connector's metrics
              kv_transfer_config={
                  "kv_connector": "KVCodecConnector",
                  "kv_connector_module_path": "kvcodec.integrations.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                  "kv_connector_extra_config": {"store": str(root), "config": "default",
                                                "blend_rows_only": True}})
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    yield llm, ChunkStore(root, lm.fingerprint, "default"), get_kv_transfer_group()
    del llm
    # Collected now: the engine's finalizer tears down vLLM's global distributed state
    # (cleanup_dist_env_and_memory); run by a later collection, it could do that in the
    # middle of the next engine's start ("tensor model parallel group is not
    # initialized").
    gc.collect()


def _store_docs(lm, store, docs, head=None):
    anchor = default_anchor(lm.tokenizer)
    with torch.no_grad():
        for d in docs:
            store.put_document(kvcodec.capture_kv(lm, token_ids=d, anchor=anchor))
        if head is not None:  # the text before the documents, kept lossless for blends
            store.exact().put(kvcodec.capture_kv(lm, token_ids=head))


def _segments(store, head, docs, question):
    return [Text(token_ids=head)] + [Cached(store=store, token_ids=d) for d in docs] + [
        Text(token_ids=question)]


def _ask(llm, prompt, params=None, n=NEW, logprobs=None):
    from vllm import SamplingParams

    extra = {"kv_transfer_params": params} if params is not None else None
    sp = SamplingParams(max_tokens=n, temperature=0, logprobs=logprobs, extra_args=extra)
    return llm.generate([prompt] if isinstance(prompt, dict) else prompt, sp, use_tqdm=False)


def _first_logprobs(out, vocab: int) -> torch.Tensor:
    v = torch.full((vocab,), -float("inf"))
    for token, lp in out.outputs[0].logprobs[0].items():
        v[token] = lp.logprob
    return v


def _metrics() -> dict:
    """vLLM's Prometheus counters ``vllm:kvcodec_*`` in this process (both connector
    sides' store metrics reach them; the scheduler side's only there), by short name."""
    from prometheus_client import REGISTRY

    out = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name.startswith("vllm:kvcodec_") and s.name.endswith("_total"):
                name = s.name.removeprefix("vllm:kvcodec_").removesuffix("_total")
                if "cause" in s.labels:
                    name += ":" + s.labels["cause"]
                out[name] = out.get(name, 0) + s.value
    return out


def _counts(conn):
    return conn.worker.tokens_loaded, conn.blocks_failed, _metrics()


def _moved(before, after, name):
    return after[2].get(name, 0) - before[2].get(name, 0)


def test_full_reuse_equals_transformers_blend_none(lm, texts, engine):
    """Three documents cached behind the anchor, blended after a system line in two
    orders: vLLM loads the system line's prefix entry and each document re-rotated to
    its offset, computes the question, and its first-token distribution and greedy
    answer are transformers' blend with no recompute: the documents are the same lossy
    entries on both sides, and the system line, computed by transformers, is loaded
    exact (the store's lossless view) by vLLM."""
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, QUESTION)
    docs = _docs(lm, texts, ["gpl3", "argparse_doc", "python_license"])
    _store_docs(lm, store, docs, head)
    for order in ([0, 1, 2], [2, 0, 1]):
        segs = _segments(store, head, [docs[i] for i in order], question)
        ref = blend(lm, segs, recompute=0, selector="none")
        answer, _ = generate(lm, segs, max_new_tokens=NEW, recompute=0, selector="none")
        prompt, params = blending.request_for(lm.tokenizer, segs)
        assert prompt["prompt_token_ids"] == ref.token_ids
        before = _counts(conn)
        out = _ask(llm, prompt, params, n=1, logprobs=-1)[0]  # the whole distribution
        after = _counts(conn)
        assert after[0] - before[0] == len(ref.token_ids) - len(question)  # all but the question
        assert _moved(before, after, "blend_requests") == 1
        assert _moved(before, after, "blend_documents") == 3
        p = torch.log_softmax(ref.logits.view(-1).float(), -1)
        q = _first_logprobs(out, p.numel())
        kl = float((p.exp() * (p - q)).sum())
        print(f"order {order}: first-token KL(transformers blend || vLLM blend) {kl:.2e}")
        assert kl < 1e-4
        # The answer (its blocks now in vLLM's prefix cache, under the blend's salt).
        assert list(_ask(llm, prompt, params)[0].outputs[0].token_ids) == list(answer)


def test_blends_save_nothing_and_plain_requests_stay_prefills(lm, texts, engine):
    """Blended K/V never reach the store, nor vLLM's prefix cache under a plain
    request's hashes: the same tokens sent plainly afterwards get the prefill's answer.
    A blend without a blend salt (prefix caching is on) is refused and served plainly."""
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, "\n\nQuestion: Who may copy it?\nAnswer:")
    docs = _docs(lm, texts, ["gpl3", "argparse_doc", "python_license"], 150)
    _store_docs(lm, store, docs, head)
    segs = _segments(store, head, docs, question)
    prompt, params = blending.request_for(lm.tokenizer, segs)
    ids = prompt["prompt_token_ids"]
    reference = _ask(llm, {"prompt_token_ids": ids, "cache_salt": uuid.uuid4().hex})
    conn.flush()
    entries = set(store.root.rglob("*.kvc"))
    before = _counts(conn)
    blended = _ask(llm, prompt, params)
    conn.flush()
    assert _counts(conn)[0] > before[0]
    assert set(store.root.rglob("*.kvc")) == entries  # nothing saved
    plain = _ask(llm, {"prompt_token_ids": ids})
    assert blended[0].outputs[0].token_ids != reference[0].outputs[0].token_ids  # blends differ
    assert plain[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
    before = _counts(conn)
    unsalted = _ask(llm, {"prompt_token_ids": ids}, params)
    after = _counts(conn)
    # Served plainly: vLLM's prefix cache holds the plain prompt's whole blocks, the
    # store (lossy) the rest (saved by `plain`), loaded up to the last RECENT_EXACT.
    assert _moved(before, after, "blend_refused") == 1
    assert after[0] - before[0] == max(0, len(ids) - RECENT_EXACT - (len(ids) - 1) // 128 * 128)
    assert unsalted[0].outputs[0].token_ids == reference[0].outputs[0].token_ids


def test_a_missing_system_prefix_is_prefilled_once_then_blended(lm, texts, engine):
    llm, store, conn = engine
    head = _ids(lm, "You answer in one short sentence, quoting the documents.\n\n")
    docs = _docs(lm, texts, ["python_license", "gpl3"], 160)
    _store_docs(lm, store, docs)  # the system line is not stored
    first = _segments(store, head, docs, _ids(lm, "\n\nQuestion: Name one.\nAnswer:"))
    before = _counts(conn)
    _ask(llm, *blending.request_for(lm.tokenizer, first))
    conn.flush()
    assert _counts(conn)[0] == before[0]  # prefilled
    # Its system line saved exact (vLLM's prefill K/V, lossless), not as a lossy prefix.
    assert store.exact().cached_tokens(head, partial=True) == len(head)
    assert store.cached_tokens(head, partial=True) == 0
    second = _segments(store, head, docs, _ids(lm, "\n\nQuestion: Which is longer?\nAnswer:"))
    before = _counts(conn)
    _ask(llm, *blending.request_for(lm.tokenizer, second))
    assert _counts(conn)[0] - before[0] == len(head) + sum(map(len, docs))


def test_a_missing_document_is_computed_from_there(lm, texts, engine):
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, QUESTION)
    docs = _docs(lm, texts, ["argparse_doc", "gpl3", "python_license"], 170)
    docs[1] = docs[1][:-3] + _ids(lm, " (unstored)")  # never stored
    _store_docs(lm, store, [docs[0], docs[2]], head)
    before = _counts(conn)
    out = _ask(llm, *blending.request_for(lm.tokenizer, _segments(store, head, docs, question)))
    after = _counts(conn)
    assert after[0] - before[0] == len(head) + len(docs[0])
    assert _moved(before, after, "blend_documents") == 1
    assert _moved(before, after, "blend_computed") == 2
    assert len(out[0].outputs[0].token_ids) > 0


def _damage(lm, store, doc):
    """Flip a payload byte of the one-entry document ``doc``; its entry's path."""
    (entry,) = store.document(doc, default_anchor(lm.tokenizer))
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    return entry


def _damaged_blend(lm, texts, store, names, tokens, question):
    """The system line and documents ``names`` stored, the last document's entry damaged:
    ``(head, docs, that entry, the blend's segments)``."""
    head = _ids(lm, HEAD)
    docs = _docs(lm, texts, names, tokens)
    _store_docs(lm, store, docs, head)
    entry = _damage(lm, store, docs[-1])
    return head, docs, entry, _segments(store, head, docs, _ids(lm, question))


def test_a_damaged_document_is_computed_and_counted(lm, texts, engine):
    llm, store, conn = engine
    _, _, entry, segs = _damaged_blend(lm, texts, store, ["gpl3", "python_license"], 140,
                                       "\n\nQuestion: Summarise.\nAnswer:")
    before = _counts(conn)
    out = _ask(llm, *blending.request_for(lm.tokenizer, segs))
    after = _counts(conn)
    assert after[1] > before[1]  # its blocks reported: vLLM computed them
    assert _moved(before, after, "load_failures:damaged") == 1
    assert entry.with_name(entry.name + ".bad").exists() and not entry.exists()
    assert len(out[0].outputs[0].token_ids) > 0


def test_two_blended_requests_in_one_batch_equal_each_alone(lm, texts, engine):
    llm, store, conn = engine
    prompts = _two_blends(lm, texts, store, ["argparse_doc", "gpl3", "python_license"], 120,
                          ([0, 1, 2], [2, 1, 0]))
    alone = [list(_ask(llm, p, params)[0].outputs[0].token_ids) for p, params in prompts]
    before = _counts(conn)
    batch, outs = _in_one_batch(llm, prompts)
    assert _counts(conn)[0] - before[0] == sum(len(p["prompt_token_ids"]) for p in batch) - sum(
        len(_ids(lm, q)) for q in (QUESTION, SECOND_QUESTION))
    assert [list(o.outputs[0].token_ids) for o in outs] == alone


def _two_blends(lm, texts, store, names, tokens, orders, **kw) -> list:
    """Two blended requests of the same stored documents in ``orders``, each with its own
    question: ``[(prompt, params)] * 2``; ``kw`` as ``request_for`` takes it."""
    head = _ids(lm, HEAD)
    docs = _docs(lm, texts, names, tokens)
    _store_docs(lm, store, docs, head)
    return [blending.request_for(lm.tokenizer, _segments(
        store, head, [docs[i] for i in order], _ids(lm, q)), **kw)
        for order, q in zip(orders, (QUESTION, SECOND_QUESTION))]


def _in_one_batch(llm, prompts):
    """``prompts`` sent in one ``generate`` (fresh salts: vLLM's prefix cache has the
    blocks of the requests sent alone): the prompts sent and the outputs."""
    from vllm import SamplingParams

    batch = [dict(p, cache_salt=p["cache_salt"] + "-batch") for p, _ in prompts]
    sps = [SamplingParams(max_tokens=NEW, temperature=0,
                          extra_args={"kv_transfer_params": params}) for _, params in prompts]
    return batch, llm.generate(batch, sps, use_tqdm=False)


def _kl(p, q):
    return float((p.exp() * (p - q)).sum())


def _hf_prefill(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), -1)


def test_selective_recompute_is_transformers_blend_on_vllm_kernels(lm, texts, engine):
    """15% recomputed after the check layer: vLLM (every token computed up to it, then
    only the recomputed, uncached and last tokens' rows: :mod:`.subset`; cached K/V kept
    in the later layers) picks the same tokens as transformers' blend (boundary: the same
    positions; hkvd: from the fresh K/V vLLM wrote, >= 90% the same) and gives its
    first-token distribution; it differs from a prefill as much as transformers' blend
    does (the kept K/V are really used)."""
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, "\n\nQuestion: Which text is code?\nAnswer:")
    docs = _docs(lm, texts, ["argparse_doc", "python_license", "gpl3"], 200)
    _store_docs(lm, store, docs, head)
    segs = _segments(store, head, docs, question)
    ids = blending.request_for(lm.tokenizer, segs)[0]["prompt_token_ids"]
    hf_prefill = _hf_prefill(lm, ids)
    vllm_prefill = _first_logprobs(_ask(llm, {"prompt_token_ids": ids,
                                              "cache_salt": uuid.uuid4().hex}, n=1,
                                        logprobs=-1)[0], hf_prefill.numel())
    for selector in ("boundary", "hkvd"):
        ref = blend(lm, segs, recompute=0.15, selector=selector)
        p = torch.log_softmax(ref.logits.view(-1).float(), -1)
        before, steps = conn.worker.tokens_preloaded, conn.worker.subset.steps
        out = _ask(llm, *blending.request_for(lm.tokenizer, segs, recompute=0.15,
                                              selector=selector), n=1, logprobs=-1)[0]
        assert conn.worker.tokens_preloaded - before == sum(map(len, docs))
        assert conn.worker.subset.steps == steps + 1, conn.worker.subset.unusable  # rows only
        got = list(conn.worker.selections.values())[-1]
        overlap = len(set(got.tolist()) & set(ref.selected.tolist())) / len(ref.selected)
        q = _first_logprobs(out, p.numel())
        kl, moved, hf_moved = _kl(p, q), _kl(vllm_prefill, q), _kl(hf_prefill, p)
        print(f"{selector}: {len(got)} recomputed, overlap with transformers {overlap:.3f}, "
              f"KL vs transformers blend {kl:.2e}, vs prefill {moved:.4f} (transformers "
              f"{hf_moved:.4f})")
        assert overlap == 1.0 if selector == "boundary" else overlap >= 0.9
        assert len(got) == len(ref.selected)
        assert kl < 1e-4
        assert moved > 1e-3 and abs(moved - hf_moved) < 0.1 * hf_moved


def test_rows_only_gives_the_logits_of_every_row_computed(lm, texts, engine):
    """``blend_rows_only`` checked against the path that computes every row after the
    check layer (the same engine with it switched off): the same selection, and
    first-token log-probabilities within 1e-4 over the whole vocabulary."""
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, "\n\nQuestion: Which text is a license?\nA:")
    docs = _docs(lm, texts, ["gpl3", "argparse_doc", "python_license"], 180)
    _store_docs(lm, store, docs, head)
    segs = _segments(store, head, docs, question)
    prompt, params = blending.request_for(lm.tokenizer, segs, recompute=0.15, selector="hkvd")
    got, steps = {}, conn.worker.subset.steps
    for name, salt in (("rows", "-rows"), ("every", "-every")):
        sub = conn.worker.subset
        if name == "every":
            conn.worker.subset = None
        try:
            out = _ask(llm, dict(prompt, cache_salt=prompt["cache_salt"] + salt), params,
                       n=1, logprobs=-1)[0]
        finally:
            conn.worker.subset = sub
        got[name] = (_first_logprobs(out, lm.model.config.vocab_size),
                     list(conn.worker.selections.values())[-1])
    assert conn.worker.subset.steps == steps + 1
    assert torch.equal(got["rows"][1], got["every"][1])
    a, b = got["rows"][0], got["every"][0]
    assert torch.equal(a.isfinite(), b.isfinite())
    assert float((a - b)[a.isfinite()].abs().max()) < 1e-4


def test_selective_blends_in_one_batch_compute_every_row_and_equal_each_alone(
        lm, texts, engine):
    """Two selective blends in one step: the rows-only path (one request per step) stands
    aside, every token is computed as before, and each answer is the one it gets alone
    (rows only)."""
    llm, store, conn = engine
    prompts = _two_blends(lm, texts, store, ["python_license", "argparse_doc", "gpl3"], 150,
                          ([0, 1, 2], [2, 0, 1]), recompute=0.15, selector="boundary")
    steps = conn.worker.subset.steps
    alone = [list(_ask(llm, p, params)[0].outputs[0].token_ids) for p, params in prompts]
    assert conn.worker.subset.steps == steps + 2
    _, outs = _in_one_batch(llm, prompts)
    assert conn.worker.subset.steps == steps + 2  # both in one step: every row computed
    assert [list(o.outputs[0].token_ids) for o in outs] == alone


def test_recompute_all_is_a_prefill(lm, texts, engine):
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, "\n\nQuestion: Name the licenses.\nAnswer:")
    docs = _docs(lm, texts, ["gpl3", "python_license"], 200)
    _store_docs(lm, store, docs, head)
    segs = _segments(store, head, docs, question)
    prompt, params = blending.request_for(lm.tokenizer, segs, recompute=1.0, selector="all")
    prefill = _ask(llm, {"prompt_token_ids": prompt["prompt_token_ids"],
                         "cache_salt": uuid.uuid4().hex})
    before = conn.worker.tokens_preloaded
    assert _ask(llm, prompt, params)[0].outputs[0].token_ids == prefill[0].outputs[0].token_ids
    assert conn.worker.tokens_preloaded > before


def test_a_damaged_document_is_computed_in_a_selective_blend(lm, texts, engine):
    """A damaged last document: vLLM computes it like text (never kept), as
    transformers' blend does with the entry it then finds moved aside."""
    llm, store, conn = engine
    head, docs, entry, segs = _damaged_blend(
        lm, texts, store, ["python_license", "argparse_doc"], 190,
        "\n\nQuestion: What is permitted?\nAnswer:")
    before = _counts(conn)
    out = _ask(llm, *blending.request_for(lm.tokenizer, segs, recompute=0.15,
                                          selector="boundary"), n=1, logprobs=-1)[0]
    after = _counts(conn)
    assert _moved(before, after, "load_failures:damaged") == 1 and after[1] == before[1]
    got = list(conn.worker.selections.values())[-1]
    start = len(head) + len(docs[0])
    assert not entry.exists() and int(got.max()) < start  # the second one: not cached
    ref = blend(lm, segs, recompute=0.15, selector="boundary")  # finds it moved aside
    assert ref.report.segments[2].fallback and torch.equal(got, ref.selected)
    p = torch.log_softmax(ref.logits.view(-1).float(), -1)
    assert _kl(p, _first_logprobs(out, p.numel())) < 1e-4


# -- without an engine ------------------------------------------------------------------

def test_request_for_tokenizes_as_transformers_blend(lm, bos_lm, texts, tmp_path):
    """The same segments give the same token ids in vLLM's request and in transformers'
    blend (BOS first on a tokenizer that adds one), and the blend salt follows the
    layout."""
    for model in (lm, bos_lm):
        store = ChunkStore(tmp_path / str(id(model)), model.fingerprint, "lossless")
        docs = _docs(model, texts, ["gpl3", "argparse_doc"], 40)
        _store_docs(model, store, docs)
        segs = [Text(HEAD)] + [Cached(store=store, token_ids=d) for d in docs] + [
            Text(QUESTION)]
        prompt, params = blending.request_for(model.tokenizer, segs)
        assert prompt["prompt_token_ids"] == blend(model, segs, recompute=0,
                                                   selector="none").token_ids
        spec = blending.parse(params, len(prompt["prompt_token_ids"]))
        kinds = [k for k, _, _ in spec.spans]
        assert kinds == (["text"] if model is bos_lm else []) + [
            "text", "document", "document", "text"]
        assert prompt["cache_salt"].startswith(blending.SALT_PREFIX)
        other, _ = blending.request_for(model.tokenizer, [segs[0], segs[2], segs[1], segs[3]])
        assert other["cache_salt"] != prompt["cache_salt"]


@pytest.mark.parametrize("spec, message", [
    ({"segments": "all"}, "must be an object"),
    ({"segments": [["text", 3], ["picture", 2]]}, "segment 1"),
    ({"segments": [["text", 0], ["document", 5]]}, "segment 0"),
    ({"segments": [["text", 2], ["document", 2]]}, "cover 4 tokens; the prompt has 5"),
    ({"segments": [["text", 5]], "anchor": "x"}, "anchor"),
    ({"segments": [["text", 5]], "tenant": 3}, "tenant"),
    ({"segments": [["text", 5]], "recompute": 1.5}, "recompute"),
    ({"segments": [["text", 5]], "selector": "query"}, "query needs"),
    ({"segments": [["text", 5]], "check_layer": -1}, "check_layer"),
    ({"segments": [["text", 5]], "anchor": [1, 2**32]}, "anchor"),
    ({"segments": [["text", 5]], "seed": 2**64}, "seed"),
])
def test_a_malformed_blend_is_a_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        blending.parse({blending.PARAM: spec}, 5)
    assert blending.parse({"other": 1}, 5) is None and blending.parse(None, 5) is None


def _spec(*parts):
    spans, at = [], 0
    for kind, ids in parts:
        spans.append((kind, at, at + len(ids)))
        at += len(ids)
    return blending.Blend(spans), [t for _, ids in parts for t in ids]


def test_plan_claims_through_the_last_stored_document(lm, texts, tmp_path):
    """The system line (a prefix stored exact), then documents in order up to the first
    text segment after one or the first the store lacks; never the prompt's last token.
    A system line stored only as a lossy prefix does not serve as a blend's head."""
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    anchor = default_anchor(lm.tokenizer)
    head = _ids(lm, HEAD)
    a, b, c = _docs(lm, texts, ["gpl3", "argparse_doc", "python_license"], 30)
    _store_docs(lm, store, [a, c], head)
    spec, ids = _spec(("text", head), ("document", a), ("document", c), ("text", [5, 6]))
    p = blending.plan(store, ids, spec, anchor)
    assert (p.end, p.documents, p.computed, p.head_cached) == (len(ids) - 2, 2, 0, True)
    assert [s.offset for s in p.segments] == [0, len(head), len(head) + len(a)]
    assert p.segments[0].anchor is None and p.segments[1].anchor == anchor
    assert [s.exact for s in p.segments] == [True, False, False]
    assert p.segments[2].token_ids == c
    spec, ids = _spec(("text", head), ("document", a), ("document", c))
    assert blending.plan(store, ids, spec, anchor).end == len(ids) - 1  # vLLM's last token
    spec, ids = _spec(("text", head), ("document", a), ("text", [7]), ("document", c),
                      ("text", [5]))
    assert blending.plan(store, ids, spec, anchor).end == len(head) + len(a)  # text inside
    spec, ids = _spec(("text", head), ("document", b), ("document", c), ("text", [5]))
    p = blending.plan(store, ids, spec, anchor)  # b is not stored: stop before it
    assert (p.end, p.documents, p.computed) == (len(head), 0, 2)
    spec, ids = _spec(("text", [9] + head[1:]), ("document", a), ("text", [5]))
    p = blending.plan(store, ids, spec, anchor)  # another system line: prefilled
    assert (p.end, p.head_cached, p.computed, p.head) == (0, False, 1, len(head))
    lossy = _ids(lm, "You are terse.\n\n")
    with torch.no_grad():
        store.put(kvcodec.capture_kv(lm, token_ids=lossy))
    spec, ids = _spec(("text", lossy), ("document", a), ("text", [5]))
    assert blending.plan(store, ids, spec, anchor).head_cached is False
    spec, ids = _spec(("document", a), ("document", c), ("text", [5]))
    p = blending.plan(store, ids, spec, anchor)  # no system line: documents from 0
    assert (p.end, p.documents, [s.offset for s in p.segments]) == (len(ids) - 1, 2,
                                                                     [0, len(a)])
    # Selective recompute: nothing claimed, every stored document preloaded, also after
    # one the store lacks.
    spec, ids = _spec(("text", head), ("document", b), ("document", c), ("text", [5]))
    spec.recompute = 0.15
    p = blending.plan(store, ids, spec, anchor)
    assert (p.end, p.segments, p.documents, p.computed) == (0, [], 1, 1)
    assert [(s.offset, s.token_ids) for s in p.preload] == [(len(head) + len(b), c)]


def test_a_wrong_blend_request_is_one_line():
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    r = CliRunner().invoke(main, ["blend-request", "--doc", __file__, "--prompt", "Q?",
                                  "--selector", "query"])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("error: blend selector 'query'")


@pytest.mark.parametrize("field,value", [("anchor", [2**40])])
def test_a_blend_request_out_of_range_is_served_plainly(lm, texts, engine, field, value):
    """A client's ``kv_transfer_params`` reach the scheduler: an anchor id past 32 bits
    (vLLM lets integers to 2**64 - 1 through; the store's key raised) is refused as a
    malformed blend, and the request is served as a plain prompt by an engine that goes
    on serving."""
    llm, store, conn = engine
    head, question = _ids(lm, HEAD), _ids(lm, "\n\nQuestion: What is it?\nAnswer:")
    docs = _docs(lm, texts, ["python_license", "gpl3"], 140)
    _store_docs(lm, store, docs, head)
    segs = _segments(store, head, docs, question)
    prompt, params = blending.request_for(lm.tokenizer, segs, recompute=0.1,
                                          selector="random")
    params[blending.PARAM][field] = value
    before = _counts(conn)
    out = _ask(llm, prompt, params, n=2)
    assert _moved(before, _counts(conn), "blend_refused") == 1 and out[0].outputs[0].token_ids
    again = _ask(llm, *blending.request_for(lm.tokenizer, segs), n=2)  # still serving
    assert again[0].outputs[0].token_ids
