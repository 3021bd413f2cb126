"""Blending cached segments: re-rotation, the exact recompute, selectors, bad input."""
from __future__ import annotations

import pytest
import torch
from tiny_models import TINY, token_ids
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcodec
from kvcodec.blend import SELECTORS, Cached, Text, blend, generate
from kvcodec.core.transforms import model_ropes, shift
from kvcodec.errors import (BlendError, ConfigError, KVCodecError, ModelMismatchError,
                            ShapeError)
from kvcodec.models import LoadedModel, default_anchor, fingerprint
from kvcodec.store import ChunkStore

ANCHOR = [1]


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, None, fingerprint(model.config, None, model))


def _ids(n, seed):
    return token_ids(n, seed=seed)[0].tolist()


@torch.no_grad()
def _prefill(lm, ids):
    out = lm.model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(),
                   use_cache=True)
    return kvcodec.KVCache.from_dynamic_cache(out.past_key_values), out.logits[0, -1]


# -- position independence ----------------------------------------------------------
ROTATING = [f for f in TINY]


@pytest.mark.parametrize("family", ROTATING)
def test_a_chunk_cached_at_0_placed_at_p_equals_its_keys_computed_at_p(family):
    """Shift invariance of RoPE attention: a text's keys computed at positions p.. are its
    keys computed at 0.. turned by p. Holds for the lossless file moved by the fingerprint's
    RoPE, and the rope_strip file decoded at p equals the same file turned by p."""
    model = TINY[family]()
    lm = _loaded(model)
    ids, p = _ids(48, 3), 37
    with torch.no_grad():
        at0 = model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(),
                    use_cache=True).past_key_values
        atp = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(p, p + 48)[None],
                    past_key_values=DynamicCache(), use_cache=True).past_key_values
    kv0 = kvcodec.KVCache.from_dynamic_cache(at0, ids, lm.fingerprint)
    kvp = kvcodec.KVCache.from_dynamic_cache(atp, ids, lm.fingerprint)
    moved = kvcodec.open(kvcodec.encode(kv0, config="lossless")).decode(position_offset=p)
    for l in range(kv0.num_layers):
        torch.testing.assert_close(moved.keys[l], kvp.keys[l], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moved.values[l], kvp.values[l], rtol=1e-4, atol=1e-4)
    f = kvcodec.open(kvcodec.encode(kv0, config={"name": "t", "chunk_tokens": 16,
                                                  "key_transform": {"type": "rope_strip"},
                                                  "key": [{"layers": [0, None], "quantizer": {
                                                      "type": "uniform", "bins": 255,
                                                      "scale": "token", "step": 0.2}}],
                                                  "value": [{"layers": [0, None], "quantizer": {
                                                      "type": "uniform", "bins": 255,
                                                      "scale": "token", "step": 0.5}}]}))
    here, there = f.decode(), f.decode(position_offset=p)
    ropes = model_ropes(lm.fingerprint, kv0.num_layers, kv0.head_dim)
    for l in range(kv0.num_layers):
        expect = here.keys[l] if ropes[l] is None else shift(here.keys[l], ropes[l], p)
        torch.testing.assert_close(there.keys[l], expect, rtol=1e-4, atol=1e-4)


def test_anchored_capture_drops_the_anchor_and_records_it(lm, texts):
    anchor = default_anchor(lm.tokenizer)
    kv = kvcodec.capture_kv(lm, texts["gpl3"][:600], anchor=anchor)
    full = kvcodec.capture_kv(lm, token_ids=anchor + kv.token_ids, importance_window=0)
    assert kv.anchor == anchor and kv.num_tokens == full.num_tokens - len(anchor)
    # The same keys up to GEMM rounding: the anchored capture prefills in other shapes
    # (the anchor, then the text), and MKL's SGEMM splits the sum over its 2 threads by
    # the row count (2.4e-5 seen); rows misaligned by the anchor would be off by O(1).
    torch.testing.assert_close(kv.keys[5], full.keys[5][:, :, len(anchor):], atol=1e-4,
                               rtol=1e-4)
    with kvcodec.open(kvcodec.encode(kv)) as f:
        assert f.anchor == anchor and f.position_offset == len(anchor)


# -- the recompute, exact -----------------------------------------------------------
def _files(lm, docs, config="lossless"):
    return [kvcodec.encode(kvcodec.capture_kv(lm, token_ids=d, anchor=ANCHOR,
                                              importance_window=0), config=config)
            for d in docs]


@pytest.mark.parametrize("family", ["llama3", "gemma2", "gemma3", "phi3", "qwen3"])
def test_ratio_one_is_full_prefill(family):
    lm = _loaded(TINY[family]())
    docs, head, tail = [_ids(70, 1), _ids(90, 2)], _ids(9, 4), _ids(7, 5)
    files = _files(lm, docs)
    segs = [Text(token_ids=head), Cached(files[0]), Cached(files[1]), Text(token_ids=tail)]
    res = blend(lm, segs, recompute=1.0, anchor=ANCHOR)
    ref, logits = _prefill(lm, head + docs[0] + docs[1] + tail)
    for l in range(ref.num_layers):
        torch.testing.assert_close(res.kv.keys[l], ref.keys[l], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.kv.values[l], ref.values[l], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.logits, logits.float(), rtol=1e-4, atol=1e-4)
    assert res.report.recomputed == 160 and res.report.reused_segments == 2


def test_ratio_zero_is_plain_concatenation():
    lm = _loaded(TINY["llama3"]())
    docs, tail = [_ids(60, 1), _ids(50, 2)], _ids(8, 3)
    files = _files(lm, docs)
    res = blend(lm, [Cached(files[0]), Cached(files[1]), Text(token_ids=tail)],
                recompute=0.0, selector="hkvd", anchor=ANCHOR)
    a = kvcodec.open(files[0]).decode(position_offset=0)
    b = kvcodec.open(files[1]).decode(position_offset=60)
    concat = kvcodec.KVCache([torch.cat([x, y], 2) for x, y in zip(a.keys, b.keys)],
                             [torch.cat([x, y], 2) for x, y in zip(a.values, b.values)])
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([tail]), past_key_values=concat.to_dynamic_cache(),
                       position_ids=torch.arange(110, 118)[None], use_cache=True)
    ref = kvcodec.KVCache.from_dynamic_cache(out.past_key_values)
    for l in range(ref.num_layers):
        torch.testing.assert_close(res.kv.keys[l], ref.keys[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.kv.values[l], ref.values[l], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.logits, out.logits[0, -1], rtol=1e-4, atol=1e-4)
    assert res.report.recomputed == 0 and res.report.computed == 8


@pytest.mark.parametrize("selector", [n for n, s in SELECTORS.items() if s.fixed_ratio is None])
def test_selected_tokens_are_recomputed_and_the_others_untouched(selector):
    lm = _loaded(TINY["llama3"]())
    docs, head, tail = [_ids(80, 1), _ids(80, 2)], _ids(6, 7), _ids(8, 3)
    files = _files(lm, docs)
    segs = [Text(token_ids=head), Cached(files[0]), Cached(files[1]), Text(token_ids=tail)]
    res = blend(lm, segs, recompute=0.25, selector=selector, anchor=ANCHOR, check_layer=0)
    assert res.report.recomputed == len(res.selected) == 40
    cached = torch.zeros(len(res.token_ids), dtype=torch.bool)
    cached[6:166] = True
    sel = torch.zeros_like(cached)
    sel[res.selected] = True
    assert bool(cached[res.selected].all())
    placed = [kvcodec.open(files[0]).decode(position_offset=6),
              kvcodec.open(files[1]).decode(position_offset=86)]
    old_k = [torch.cat([placed[0].keys[l], placed[1].keys[l]], 2) for l in range(2)]
    keep = (cached & ~sel)[6:166]
    changed = sel[6:166]
    for l in range(1, 2):  # after the check layer
        new = res.kv.keys[l][:, :, 6:166]
        assert torch.equal(new[:, :, keep], old_k[l][:, :, keep])
        assert bool(((new[:, :, changed] - old_k[l][:, :, changed]).abs().amax(dim=(0, 1, 3))
                     > 0).all())
    ref, _ = _prefill(lm, head + docs[0] + docs[1] + tail)  # layers up to the check: fresh
    torch.testing.assert_close(res.kv.keys[0], ref.keys[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_causal_mask_matches_a_dense_token_by_token_reference():
    """Three layers, check layer 0: every recomputed token, one at a time in position
    order, runs layers 1-2 with the model's own decoder layers over exactly the fused
    cache's positions before it (plus itself)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, initializer_range=0.15,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    lm = _loaded(model)
    docs, tail = [_ids(40, 1), _ids(40, 2)], _ids(5, 3)
    files = _files(lm, docs)
    res = blend(lm, [Cached(files[0]), Cached(files[1]), Text(token_ids=tail)],
                recompute=0.3, selector="random", anchor=ANCHOR, check_layer=0, seed=4)
    ids = res.token_ids
    n = len(ids)
    a = kvcodec.open(files[0]).decode(position_offset=0)
    b = kvcodec.open(files[1]).decode(position_offset=40)
    keys = [torch.cat([x, y, torch.zeros(1, 2, 5, 32)], 2) for x, y in zip(a.keys, b.keys)]
    values = [torch.cat([x, y, torch.zeros(1, 2, 5, 32)], 2) for x, y in zip(a.values, b.values)]
    full = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=True)
    fresh = kvcodec.KVCache.from_dynamic_cache(full.past_key_values)
    keys[0], values[0] = fresh.keys[0].clone(), fresh.values[0].clone()
    hidden0 = full.hidden_states[1][0]
    queries = sorted(set(res.selected.tolist()) | set(range(80, 85)))
    base = model.model
    for q in queries:
        h = hidden0[q].view(1, 1, -1)
        pos = torch.tensor([[q]])
        for l in (1, 2):
            cache = DynamicCache()
            for j in range(3):
                cache.update(keys[j][:, :, :q].clone(), values[j][:, :, :q].clone(), j)
            pe = base.rotary_emb(h, pos)
            h = base.layers[l](h, attention_mask=None, position_ids=pos, past_key_values=cache,
                               position_embeddings=pe, use_cache=True)
            h = h[0] if isinstance(h, tuple) else h
            keys[l][:, :, q] = cache.layers[l].keys[:, :, q]
            values[l][:, :, q] = cache.layers[l].values[:, :, q]
        if q == n - 1:
            last = model.lm_head(base.norm(h))[0, -1]
    for l in range(3):
        torch.testing.assert_close(res.kv.keys[l], keys[l], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.kv.values[l], values[l], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.logits, last, rtol=1e-4, atol=1e-4)


# -- on the real model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def rag(lm, texts):
    """A system line, two anchored documents (default codec) and a question."""
    tok = lm.tokenizer
    anchor = default_anchor(tok)
    d1 = tok(texts["gpl3"][2000:3200], add_special_tokens=False)["input_ids"]
    d2 = tok(texts["python_license"][:1200], add_special_tokens=False)["input_ids"]
    files = [kvcodec.encode(kvcodec.capture_kv(lm, token_ids=d, anchor=anchor)) for d in (d1, d2)]
    return {"docs": (d1, d2), "files": files,
            "head": "<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n",
            "question": "\nWho may copy these programs?<|im_end|>\n<|im_start|>assistant\n"}


def _segs(rag, files=None):
    files = files or rag["files"]
    return [Text(rag["head"]), Cached(files[0], name="d1"), Cached(files[1], name="d2"),
            Text(rag["question"])]


def test_every_selector_runs_on_the_real_model_and_reports(lm, rag):
    for name in SELECTORS:
        res = blend(lm, _segs(rag), recompute=0.15, selector=name)
        r = res.report
        assert r.reused_segments == 2 and r.selector == name
        assert r.cached == len(rag["docs"][0]) + len(rag["docs"][1])
        want = {"none": 0, "all": r.cached}.get(name, round(0.15 * r.cached))
        assert r.recomputed >= want and r.recomputed <= want + 4  # + the sink tokens
        assert "recomputed" in r.summary()
    out, res = generate(lm, _segs(rag), max_new_tokens=5)
    assert 1 <= len(out) <= 5 and res.report.num_tokens == len(res.token_ids)


def test_recomputing_brings_the_answer_closer_to_prefill(lm, rag):
    ids = blend(lm, _segs(rag), selector="none").token_ids
    _, ref = _prefill(lm, ids)
    lp = torch.log_softmax(ref.float(), -1)

    def kl(res):
        return float((lp.exp() * (lp - torch.log_softmax(res.logits, -1))).sum())

    none = kl(blend(lm, _segs(rag), selector="none"))
    half = kl(blend(lm, _segs(rag), recompute=0.5, selector="hkvd"))
    assert kl(blend(lm, _segs(rag), selector="all")) < 1e-6
    assert half < none


def test_store_documents_blend_like_files(lm, rag, tmp_path):
    store = ChunkStore(tmp_path, lm.fingerprint, "lossless")
    anchor = default_anchor(lm.tokenizer)
    d1, d2 = rag["docs"]
    kvs = [kvcodec.capture_kv(lm, token_ids=d, anchor=anchor) for d in (d1, d2)]
    for kv in kvs:
        assert store.put_document(kv) > 0
    assert store.document(d1, anchor) is not None and store.lookup(d1) == []
    with pytest.raises(KVCodecError, match="put_document"):
        store.put(kvs[0])
    segs = [Text(rag["head"]), Cached(store=store, token_ids=d1), Cached(store=store, token_ids=d2),
            Text(rag["question"])]
    from_store = blend(lm, segs, recompute=0.15)
    in_memory = blend(lm, [Text(rag["head"]), Cached(kvs[0]), Cached(kvs[1]),
                           Text(rag["question"])], recompute=0.15)
    assert from_store.report.reused_segments == 2
    assert torch.equal(from_store.selected, in_memory.selected)
    torch.testing.assert_close(from_store.logits, in_memory.logits, rtol=1e-4, atol=1e-4)
    missing = blend(lm, [Text(rag["head"]), Cached(store=store, text="never stored here"),
                         Text(rag["question"])])
    assert missing.report.reused_segments == 0
    assert "not in the store" in missing.report.segments[1].fallback


# -- bad input ------------------------------------------------------------------------
def test_bad_input_gets_clear_errors(lm, rag, tmp_path):
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        blend(lm, _segs(rag), recompute=1.5)
    with pytest.raises(ConfigError, match="known: hkvd"):
        blend(lm, _segs(rag), selector="best")
    with pytest.raises(ShapeError, match="empty"):
        blend(lm, [Text(""), Cached(rag["files"][0])])
    with pytest.raises(ShapeError, match="at least one"):
        blend(lm, [])
    with pytest.raises(ShapeError, match="context"):
        blend(lm, [Text(token_ids=[5] * 9000)])
    with pytest.raises(BlendError, match="another anchor"):
        blend(lm, _segs(rag), anchor=[2, 3])
    in_place = kvcodec.encode(kvcodec.capture_kv(lm, token_ids=rag["docs"][0]))
    with pytest.raises(BlendError, match="in place"):
        blend(lm, [Text(rag["head"]), Cached(in_place)])
    blend(lm, [Cached(in_place), Text(rag["question"])])  # where it was computed: fine
    tiny = _loaded(TINY["llama3"]())
    other = _files(tiny, [_ids(20, 1)])[0]
    with pytest.raises(ModelMismatchError):
        blend(lm, [Text(rag["head"]), Cached(other)])


def test_hostile_arguments_are_clear_errors(lm, rag):
    """Each of these raised a TypeError, an IndexError from the embedding lookup, an
    OverflowError or transformers' ValueError, or was taken silently (a str of segments
    went by characters, token ids of 1.5 were cut to 1)."""
    segs, f = _segs(rag), rag["files"][0]
    for kw, needle in (({"check_layer": "1"}, "check_layer"),
                       ({"check_layer": True}, "check_layer"), ({"candidates": "2"}, "candidates"),
                       ({"candidates": float("inf")}, "finite"),
                       ({"filter_layer": "3"}, "filter_layer"),
                       ({"filter_layer": 2.5}, "filter_layer"), ({"seed": 2**64}, "seed"),
                       ({"seed": -1}, "seed"), ({"seed": "x"}, "seed")):
        with pytest.raises(ConfigError, match=needle):
            blend(lm, segs, recompute=0.1, selector="random", **kw)
    vocab = lm.model.get_input_embeddings().num_embeddings
    for segments, needle in (
            ([Text(token_ids=[vocab])], rf"segment 0 \(text\): token id {vocab} is outside"),
            ([Text(token_ids=[-5])], r"\[0, 2\*\*32\)"), ([Text(token_ids=[1.5])], "integers"),
            ([Text(token_ids="abc")], "integers"), ([Cached(), "q"], "needs a source"),
            ("hello", "must be a list"), ({"a": 1}, "must be a list")):
        with pytest.raises(ShapeError, match=needle):
            blend(lm, segments)
    with pytest.raises(ShapeError, match=f"the anchor: token id {10**9} is outside"):
        blend(lm, segs, anchor=[10**9])
    dec = kvcodec.decode(f)  # a cache from raw tensors: its ids are checked nowhere else
    raw = kvcodec.KVCache(dec.keys, dec.values, token_ids=[vocab] * dec.num_tokens)
    with pytest.raises(ShapeError, match="outside the model's vocabulary"):
        blend(lm, [Text(rag["head"]), Cached(raw)])
    with pytest.raises(ShapeError, match="needs text"):
        kvcodec.capture_kv(lm, rag["docs"][0])  # ids given as the text
    with pytest.raises(ShapeError, match="outside the model's vocabulary"):
        kvcodec.capture_kv(lm, token_ids=[vocab])
    for kw in ({"max_tokens": 1.5}, {"max_tokens": -1}, {"prefill_chunk": 0},
               {"importance_window": "x"}):  # slicing's TypeError, range()'s ValueError
        with pytest.raises(ShapeError, match="must be an integer"):
            kvcodec.capture_kv(lm, "A short text.", **kw)


def test_a_damaged_segment_is_recomputed_from_its_tokens(lm, rag):
    bad = bytearray(rag["files"][1])
    bad[-200] ^= 0xFF  # in the payload: the header still names the tokens
    res = blend(lm, _segs(rag, [rag["files"][0], bytes(bad)]), recompute=0.15)
    seg = res.report.segments[2]
    assert not seg.reused and "damaged" in seg.fallback and res.report.reused_segments == 1
    assert "computed instead" in res.report.summary()
    ref = blend(lm, _segs(rag), selector="none").token_ids
    assert res.token_ids == ref
    torn = bytes(rag["files"][1][:40])  # the header is gone: only the text can save it
    with pytest.raises(BlendError, match="text"):
        blend(lm, _segs(rag, [rag["files"][0], torn]))
    res = blend(lm, [Text(rag["head"]), Cached(torn, token_ids=rag["docs"][1])])
    assert "unreadable" in res.report.segments[1].fallback


# -- command line -------------------------------------------------------------------------
def test_cli_encode_independent_then_generate_blend(tmp_path, texts):
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    docs = []
    for i, (name, cut) in enumerate((("gpl3", slice(3000, 4200)), ("python_license", slice(0, 900)))):
        docs.append(tmp_path / f"d{i}.txt")
        docs[-1].write_text(texts[name][cut])
    for d in docs:
        r = run("encode", d, "-o", d.with_suffix(".kvc"), "--independent")
        assert r.exit_code == 0, r.output
    with kvcodec.open(docs[0].with_suffix(".kvc")) as f:
        assert f.anchor is not None
    r = run("generate", "--blend", docs[0].with_suffix(".kvc"), docs[1].with_suffix(".kvc"),
            "--system", "Read the documents.\n", "--prompt", "\nQuestion: what is this about?\n",
            "--max-new-tokens", "4", "--compare")
    assert r.exit_code == 0, r.output
    assert "2 of 2 cached segments reused" in r.output and "top-1 agreement" in r.output
    store = tmp_path / "store"
    r = run("precompute", "--independent", "--store", store, *docs)
    assert r.exit_code == 0 and "new chunks" in r.output
    r = run("generate", "--blend", "--store", store, "--doc", docs[1], "--doc", docs[0],
            "--prompt", "\nSummary:", "--max-new-tokens", "3", "--selector", "query")
    assert r.exit_code == 0, r.output
    assert "2 of 2 cached segments reused" in r.output
    for bad in (["--recompute", "1.5"], ["--selector", "best"]):
        r = CliRunner().invoke(main, ["generate", "--blend", str(docs[0].with_suffix(".kvc")),
                                      "--prompt", "x", *bad])
        assert r.exit_code != 0 and "Traceback" not in r.output
        assert r.output.strip().count("\n") == 0, r.output
    r = CliRunner().invoke(main, ["generate", "--blend", "--prompt", "x"])
    assert r.exit_code != 0 and "--store" in r.output
