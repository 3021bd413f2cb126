"""Evicted caches in transformers (kvcodec.integrations.ragged): each head attends to
exactly its kept tokens at their true positions.

The reference runs the same continuation over the *full* dense cache with an independent
attention function ("kvtest_dropped_eager", below): transformers' own causal / sliding
mask in the full layout, plus each KV head's dropped positions masked from a boolean
``[kv_heads, T]`` table, through the model's own eager attention.
"""
import sys
from contextlib import contextmanager

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import kvcodec
from kvcodec import KVCache
from kvcodec.integrations import hf
from kvcodec.integrations.ragged import RaggedCache, attach, detach, ragged_cache
from tiny_models import TINY, token_ids

T, Q = 100, 8  # cached tokens (beyond Gemma2's window of 64), continuation

# layer -> bool [kv_heads, T], True where a head dropped the position (reference only)
DROPPED: dict = {}


def _dropped_eager(module, query, key, value, attention_mask, **kwargs):
    """Eager attention over a full dense cache (key column j is position j) with each
    KV head's dropped positions masked out."""
    dropped = DROPPED[module.layer_idx].to(key.device)
    groups = query.shape[1] // dropped.shape[0]
    cols = torch.zeros(query.shape[1], key.shape[2], dtype=torch.bool, device=key.device)
    cols[:, :dropped.shape[1]] = dropped.repeat_interleave(groups, 0)
    mask = torch.where(cols[None, :, None, :], torch.finfo(query.dtype).min, attention_mask)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, mask, **kwargs)


AttentionInterface.register("kvtest_dropped_eager", _dropped_eager)
AttentionMaskInterface.register("kvtest_dropped_eager", eager_mask)


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            built[name] = TINY[name]()
        return built[name]
    return get


@contextmanager
def implementation(model, name):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def dense_cache(model, ids) -> DynamicCache:
    """Every layer holding every position (sliding layers too: the mask windows them)."""
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache)
    return cache


def random_kept(kv_heads: int, n_layers: int, seed: int) -> list:
    """Per layer, each KV head's kept positions (sorted): on layer 0 one head keeps a
    single token and another keeps every token; elsewhere random sizes."""
    g = torch.Generator().manual_seed(seed)
    kept = []
    for layer in range(n_layers):
        sizes = torch.randint(1, T + 1, (kv_heads,), generator=g).tolist()
        if layer == 0:
            sizes[0], sizes[-1] = 1, T
        kept.append([torch.randperm(T, generator=g)[:n].sort().values for n in sizes])
    return kept


def evict(kv: KVCache, kept: list) -> KVCache:
    """The evicted cache keeping ``kept[l][h]`` of each head: gathered rows, zero pads."""
    keys, values, positions = [], [], []
    for l, heads in enumerate(kept):
        slots = max(len(p) for p in heads)
        k = kv.keys[l].new_zeros(1, kv.num_kv_heads, slots, kv.head_dim)
        v = k.clone()
        pos = torch.full((kv.num_kv_heads, slots), -1, dtype=torch.long)
        for h, p in enumerate(heads):
            k[0, h, :len(p)], v[0, h, :len(p)] = kv.keys[l][0, h, p], kv.values[l][0, h, p]
            pos[h, :len(p)] = p
        keys.append(k)
        values.append(v)
        positions.append(pos)
    return KVCache(keys, values, kv.token_ids, kv.model, length=kv.length, kept=positions)


def dropped_table(kept: list, n: int) -> dict:
    out = {}
    for l, heads in enumerate(kept):
        d = torch.ones(len(heads), n, dtype=torch.bool)
        for h, p in enumerate(heads):
            d[h, p] = False
        out[l] = d
    return out


@torch.no_grad()
def reference_logits(model, ids, kept) -> torch.Tensor:
    """Continuation logits over the full dense cache, dropped positions masked per head."""
    n = ids.shape[1] - Q
    DROPPED.clear()
    DROPPED.update(dropped_table(kept, n))
    cache = dense_cache(model, ids[:, :n])  # the prefill itself attends to everything
    with implementation(model, "kvtest_dropped_eager"):
        return model(input_ids=ids[:, n:], past_key_values=cache).logits


def setup(model, seed=0):
    """Prompt ids, the full dense KV of the first T tokens and random kept sets."""
    ids = token_ids(T + Q, model.config.vocab_size, seed)
    kv = KVCache.from_dynamic_cache(dense_cache(model, ids[:, :T]), ids[0, :T].tolist())
    return ids, kv, random_kept(kv.num_kv_heads, kv.num_layers, seed)


@pytest.mark.parametrize("name,attn", [("llama3", "eager"), ("qwen3", "eager"),
                                       ("mistral", "eager"), ("gemma2", "eager"),
                                       ("gemma3", "eager"), ("phi3", "eager"),
                                       ("llama3", "sdpa"),
                                       ("qwen3", "sdpa")])
def test_matches_dense_reference_with_dropped_positions_masked(models, name, attn):
    model = models(name)
    ids, kv, kept = setup(model)
    ref = reference_logits(model, ids, kept)
    with implementation(model, attn):
        cache = ragged_cache(evict(kv, kept), model)
        assert isinstance(cache, RaggedCache) and cache.get_seq_length() == T
        with torch.no_grad():  # two calls: the first call's tokens stay visible to the second
            a = model(input_ids=ids[:, T:T + 5], past_key_values=cache).logits
            b = model(input_ids=ids[:, T + 5:], past_key_values=cache).logits
        assert model.config._attn_implementation == f"kvcodec_{attn}"
        detach(model)
    assert cache.get_seq_length() == T + Q
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=2e-4, rtol=1e-4)
    with torch.no_grad():  # eviction matters: the full cache predicts something else
        full = model(input_ids=ids[:, T:], past_key_values=dense_cache(model, ids[:, :T])).logits
    assert (full - ref).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama3", "qwen3", "phi3"])
def test_same_positions_everywhere_equals_dynamic_cache_at_true_positions(models, name):
    model = models(name)
    ids, kv, _ = setup(model, seed=1)
    p = torch.randperm(T, generator=torch.Generator().manual_seed(1))[:37].sort().values
    ev = evict(kv, [[p] * kv.num_kv_heads] * kv.num_layers)
    with torch.no_grad():
        out = model(input_ids=ids[:, T:], past_key_values=ragged_cache(ev, model)).logits
        plain = DynamicCache()
        for l in range(kv.num_layers):
            plain.update(kv.keys[l][:, :, p], kv.values[l][:, :, p], l)
        ref = model(input_ids=ids[:, T:], past_key_values=plain,
                    position_ids=(T + torch.arange(Q))[None]).logits
    detach(model)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_keeping_every_position_equals_the_dense_cache(models, name):
    model = models(name)
    ids, kv, _ = setup(model, seed=2)
    ev = evict(kv, [[torch.arange(T)] * kv.num_kv_heads] * kv.num_layers)
    with torch.no_grad():
        ref = model(input_ids=ids[:, T:], past_key_values=dense_cache(model, ids[:, :T])).logits
        out = model(input_ids=ids[:, T:], past_key_values=ragged_cache(ev, model)).logits
    detach(model)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_generate_matches_a_greedy_loop(models, name):
    model = models(name)
    ids, kv, kept = setup(model, seed=3)
    ev = evict(kv, kept)
    ids[0, T + 1] = model.config.pad_token_id  # generate reads it as padding...
    full = ids[:, :T + 3]
    with torch.no_grad():
        with pytest.raises(kvcodec.ShapeError, match="padding"):
            model.generate(full, past_key_values=ragged_cache(ev, model), max_new_tokens=2,
                           do_sample=False)
        # ... unless told there is none.
        gen = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=6,
                             past_key_values=ragged_cache(ev, model), do_sample=False)
        cache, step, loop = ragged_cache(ev, model), ids[:, T:T + 3], []
        for _ in range(6):
            step = model(input_ids=step, past_key_values=cache).logits[:, -1:].argmax(-1)
            loop.append(int(step))
    detach(model)
    assert gen[0, T + 3:].tolist() == loop


def test_crop_forgets_appended_tokens(models):
    model = models("llama3")
    ids, kv, kept = setup(model, seed=4)
    cache = ragged_cache(evict(kv, kept), model)
    with torch.no_grad():
        first = model(input_ids=ids[:, T:], past_key_values=cache).logits
        cache.crop(-3)
        assert cache.get_seq_length() == T + Q - 3
        again = model(input_ids=ids[:, T + Q - 3:], past_key_values=cache).logits
    detach(model)
    torch.testing.assert_close(again, first[:, -3:], atol=2e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(models):
    model = models("llama3")
    ids, kv, kept = setup(model, seed=5)
    with pytest.raises(kvcodec.ShapeError, match="evicted"):
        ragged_cache(kv, model)
    ev = evict(kv, kept)
    fewer = KVCache(ev.keys[:1], ev.values[:1], length=T, kept=ev.kept[:1])
    with pytest.raises(kvcodec.ModelMismatchError, match="layers"):
        ragged_cache(fewer, model)
    one_head = KVCache([k[:, :1] for k in ev.keys], [v[:, :1] for v in ev.values],
                       length=T, kept=[p[:1] for p in ev.kept])
    with pytest.raises(kvcodec.ModelMismatchError, match="KV heads"):
        ragged_cache(one_head, model)
    cache = ragged_cache(ev, model)
    with pytest.raises(kvcodec.ShapeError, match="one sequence"):
        cache.reorder_cache(torch.tensor([0, 0]))
    with pytest.raises(kvcodec.ShapeError, match="one sequence"):
        cache.batch_repeat_interleave(2)
    detach(model)
    flex = models("mistral")
    flex.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(kvcodec.BackendError, match="'sdpa' or 'eager'"):
            attach(flex)
    finally:
        flex.config._attn_implementation = "eager"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attached_model_leaves_ordinary_caches_unchanged(models, attn):
    model = models("gemma2")
    ids = token_ids(40, model.config.vocab_size, 6)
    with implementation(model, attn), torch.no_grad():
        before = model(input_ids=ids[:, 30:], past_key_values=dense_cache(model, ids[:, :30]))
        attach(model)
        attach(model)  # idempotent
        assert model.config._attn_implementation == f"kvcodec_{attn}"
        after = model(input_ids=ids[:, 30:], past_key_values=dense_cache(model, ids[:, :30]))
        detach(model)
        assert model.config._attn_implementation == attn
    assert torch.equal(before.logits, after.logits)


def test_load_cache_routes_evicted_caches_and_files(models):
    model = models("llama3")
    ids, kv, kept = setup(model, seed=7)
    ev = evict(kv, kept)
    assert type(hf.load_cache(model, kv)) is DynamicCache
    from_kv = hf.load_cache(model, ev)
    from_file = hf.load_cache(model, kvcodec.encode(ev, config="lossless"))
    assert isinstance(from_kv, RaggedCache) and isinstance(from_file, RaggedCache)
    with torch.no_grad():
        a = model(input_ids=ids[:, T:], past_key_values=from_kv).logits
        b = model(input_ids=ids[:, T:], past_key_values=from_file).logits
    detach(model)
    assert torch.equal(a, b)


def test_real_model_matches_dense_reference(lm, texts):
    model = lm.model
    kv = kvcodec.capture_kv(lm, texts["gpl3"], max_tokens=300, importance_window=0)
    n = kv.num_tokens
    g = torch.Generator().manual_seed(8)
    kept = [[torch.randperm(n, generator=g)[:int(torch.randint(1, n + 1, (), generator=g))]
             .sort().values for _ in range(kv.num_kv_heads)] for _ in range(kv.num_layers)]
    prompt = lm.tokenizer(" In short, this license lets you share and change the program.",
                          add_special_tokens=False)["input_ids"]
    ids = torch.tensor([kv.token_ids + prompt[:Q]])
    assert ids.shape[1] == n + Q
    ref = reference_logits(model, ids, kept)
    try:
        with torch.no_grad():
            out = model(input_ids=ids[:, n:], past_key_values=ragged_cache(evict(kv, kept),
                                                                           model)).logits
    finally:
        detach(model)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # eviction matters: the full cache predicts something else
        full = model(input_ids=ids[:, n:], past_key_values=dense_cache(model, ids[:, :n])).logits
    assert (full - ref).abs().max() > 1.0
