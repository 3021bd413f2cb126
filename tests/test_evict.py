"""kvcodec.evict: per-head top-k, budgets, policies at capture and after the fact."""
from __future__ import annotations

import pytest
import torch

import kvcodec
from kvcodec import evict
from kvcodec.core.kvcache import KVCache
from kvcodec.errors import ConfigError, ShapeError
from kvcodec.evict import POLICIES, WRAPPERS, Policy, get_policy
from kvcodec.evict.base import rank, top_positions
from kvcodec.models.fingerprint import fingerprint
from kvcodec.models.loading import LoadedModel

import tiny_models

RATIOS = (1.0, 0.5, 0.25, 0.1)


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, None, fingerprint(model.config, None, model))


def _random_kv(layers=2, heads=3, n=40, d=8, seed=0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(1, heads, n, d, generator=g) for _ in range(layers)]
    vs = [torch.randn(1, heads, n, d, generator=g) for _ in range(layers)]
    imp = torch.rand(layers, n, generator=g)
    return KVCache(ks, vs, list(range(n)), importance=imp)


def test_top_k_is_exact_per_head():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 50, generator=g).double()
    counts = torch.tensor([1, 7, 25, 50])
    positions = torch.arange(100, 150)
    kept = top_positions(scores, counts, positions)
    assert kept.shape == (4, 50)
    for h in range(4):
        n = int(counts[h])
        want = torch.sort(positions[torch.topk(scores[h], n).indices]).values
        assert torch.equal(kept[h, :n], want)
        assert bool((kept[h, n:] == -1).all())


def test_ties_break_to_the_later_token_deterministically():
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0]])
    assert rank(scores)[0].tolist() == [4, 2, 1, 3, 0]
    kept = top_positions(scores, torch.tensor([2]), torch.arange(5))
    assert kept.tolist() == [[2, 4]]


# Registry-driven: every policy, and every wrapper around each.
ALL_POLICIES = sorted(POLICIES) + [f"{p}+{w}" for p in sorted(POLICIES) for w in WRAPPERS]
# Those that score after the fact (not from a capture's own attention) with the same
# budget for every head (the base class's budgets, not a shared one like kvcompress).
UNIFORM = [p for p in sorted(POLICIES)
           if not POLICIES[p].needs & {"observed", "replay"}
           and type(get_policy(p)).budgets is Policy.budgets]


def test_ratio_one_is_the_identity():
    kv = _random_kv()
    for policy in ALL_POLICIES:
        assert evict.evict(kv, policy, 1.0) is kv


@pytest.mark.parametrize("policy", UNIFORM + [f"{p}+{w}" for p in UNIFORM for w in WRAPPERS])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_uniform_budgets_and_gathered_tensors(policy, ratio):
    kv = _random_kv()
    ev = evict.evict(kv, policy, ratio)
    assert ev.evicted and ev.num_tokens == kv.num_tokens and ev.token_ids == kv.token_ids
    assert bool((ev.kept_counts() == max(1, round(ratio * 40))).all())
    for l in range(kv.num_layers):
        for h in range(kv.num_kv_heads):
            pos = ev.kept[l][h]
            pos = pos[pos >= 0]
            n = len(pos)
            assert torch.equal(ev.keys[l][0, h, :n], kv.keys[l][0, h, pos])
            assert torch.equal(ev.values[l][0, h, :n], kv.values[l][0, h, pos])


def test_streaming_keeps_sinks_and_the_newest_tokens():
    ev = evict.evict(_random_kv(n=40), "streaming", 0.25)
    assert ev.kept[0][0].tolist() == [0, 1, 2, 3] + list(range(34, 40))


def test_knorm_keeps_the_smallest_key_norms():
    kv = _random_kv()
    ev = evict.evict(kv, "knorm", 0.25)
    norms = kv.keys[1][0, 2].norm(dim=-1)
    assert sorted(ev.kept[1][2].tolist()) == sorted(torch.topk(-norms, 10).indices.tolist())


def test_kvcompress_moves_budget_between_heads_within_the_total():
    kv = _random_kv(n=400)
    # Head 0 of layer 0 gets all the attention: it should keep more than the others.
    imp = torch.rand(2, 3, 400, generator=torch.Generator().manual_seed(3)) * 0.01
    imp[0, 0, :] = 1.0
    kv.extra["head_importance"] = imp
    ev = evict.evict(kv, "kvcompress", 0.25)
    counts = ev.kept_counts()
    assert int(counts.sum()) == 0.25 * 400 * 6
    # Every head keeps its 68 protected tokens; the other 192 of the budget all go
    # to the head that the attention favours.
    assert int(counts[0, 0]) == 68 + 192
    assert bool((counts.reshape(-1)[1:] == 68).all())
    # The protected recent window and the sinks stay in every head.
    for l in range(2):
        for h in range(3):
            got = set(ev.kept[l][h].tolist())
            assert {0, 1, 2, 3} <= got and set(range(336, 400)) <= got


def test_bad_input_says_what_is_valid():
    kv = _random_kv()
    for ratio in (0, -0.5, 1.5, float("nan"), "half", True):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            evict.evict(kv, "knorm", ratio)
    with pytest.raises(ConfigError, match="choose from.*knorm.*snapkv"):
        evict.evict(kv, "h2o", 0.5)
    with pytest.raises(ConfigError, match="wrappers: window"):
        evict.evict(kv, "knorm+pyramid", 0.5)
    with pytest.raises(ConfigError, match="POLICY:RATIO"):
        evict.parse("snapkv")
    with pytest.raises(ConfigError, match="not a number"):
        evict.parse("snapkv:lots")
    assert evict.parse("knorm+window:0.25") == ("knorm+window", 0.25)
    with pytest.raises(ConfigError, match="whole prefill.*capture"):
        evict.evict(kv, "observed", 0.5)
    with pytest.raises(ConfigError, match="over the text again.*capture"):
        evict.evict(kv, "replay", 0.5)
    bare = KVCache(kv.keys, kv.values)
    with pytest.raises(ConfigError, match="needs attention scores.*streaming"):
        evict.evict(bare, "snapkv", 0.5)
    with pytest.raises(ShapeError, match="already evicted"):
        evict.evict(evict.evict(kv, "knorm", 0.5), "knorm", 0.5)


def test_press_removes_its_hooks_and_restores_attention():
    model = tiny_models.llama3()
    model.set_attn_implementation("sdpa")
    lm = _loaded(model)
    ids = tiny_models.token_ids(64, model.config.vocab_size)[0].tolist()
    with pytest.raises(RuntimeError, match="boom"):
        with evict.press(lm, "snapkv", 0.5):
            assert model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks for m in model.modules())
    with evict.press(lm, "snapkv", 0.5) as p:
        kv = kvcodec.capture_kv(lm, token_ids=ids)
    assert p.evict(kv).evicted
    other = kvcodec.capture_kv(lm, token_ids=ids[:32])
    with pytest.raises(ShapeError, match="the press saw"):
        p.evict(other)


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma2", "gemma3", "phi3"])
def test_press_on_model_families(family):
    model = tiny_models.TINY[family]()
    lm = _loaded(model)
    ids = tiny_models.token_ids(160, model.config.vocab_size)[0].tolist()
    for policy in ("snapkv", "observed", "kvcompress", "replay"):
        with evict.press(lm, policy, 0.25) as p:
            kv = kvcodec.capture_kv(lm, token_ids=ids, prefill_chunk=64)
        ev = p.evict(kv)
        counts = ev.kept_counts()
        spans = torch.tensor(kv.layer_tokens)[:, None]
        assert bool((counts >= 1).all()) and bool((counts <= spans).all())
        for l, pos in enumerate(ev.kept):  # a sliding layer keeps only tokens it holds
            valid = pos[pos >= 0]
            assert int(valid.min()) >= kv.num_tokens - kv.layer_tokens[l]


def test_observed_mean_counts_only_the_queries_that_see_a_token():
    model = tiny_models.llama3()
    lm = _loaded(model)
    ids = tiny_models.token_ids(96, model.config.vocab_size)[0].tolist()
    with evict.press(lm, "observed", 0.5) as p:
        kv = kvcodec.capture_kv(lm, token_ids=ids, prefill_chunk=32, importance_window=0)
    st = p.stats(kv)
    ref = model(torch.tensor([ids]), output_attentions=True,
                attn_implementation="eager").attentions  # one pass over every query
    for l in (0, len(ref) - 1):
        a = ref[l][0].float()  # [Hq, q, k]
        want = a.sum(1) / torch.arange(96, 0, -1)
        torch.testing.assert_close(st.observed[l], want, atol=1e-5, rtol=1e-4)


def _ragged_logits(lm, kv, cont):
    from kvcodec.integrations.ragged import ragged_cache

    cache = ragged_cache(kv, lm.model) if kv.evicted else kv.to_dynamic_cache(lm.config)
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([cont]), past_key_values=cache,
                        use_cache=True).logits[0].float()


@pytest.mark.parametrize("mode", ["capture", "post-hoc"])
def test_every_policy_and_ratio_on_the_real_model(lm, texts, mode):
    ids = lm.tokenizer(texts["argparse_doc"], add_special_tokens=False)["input_ids"]
    prefill, cont = ids[:400], ids[400:432]
    full = kvcodec.capture_kv(lm, token_ids=prefill)
    ref = _ragged_logits(lm, full, cont)
    from kvcodec.quality.evaluate import compare_logits

    for policy in evict.POLICIES:
        if mode == "post-hoc" and evict.get_policy(policy).needs & {"observed", "replay"}:
            with pytest.raises(ConfigError):
                evict.evict(full, policy, 0.5)
            continue
        kls = []
        for ratio in RATIOS:
            if mode == "capture":
                ev = evict.capture(lm, None, policy, ratio, token_ids=prefill)
            else:
                ev = evict.evict(full, policy, ratio)
            if ratio == 1.0:
                assert not ev.evicted
            else:
                frac = ev.stored_numel() / ev.numel()
                assert abs(frac - ratio) < 0.01, (policy, ratio, frac)
            kls.append(compare_logits(ref, _ragged_logits(lm, ev, cont))["kl"])
        assert kls[0] < 1e-3, (policy, kls)
        assert all(k == k and k < 10 for k in kls), (policy, kls)
        assert kls[-1] > kls[0], (policy, kls)  # keeping 10% costs something


def test_blend_refuses_an_evicted_segment(lm, texts):
    from kvcodec.blend import Cached, Text, blend
    from kvcodec.errors import BlendError

    ev = evict.capture(lm, texts["gpl3"], "knorm", 0.5, max_tokens=64)
    with pytest.raises(BlendError, match="evicted"):
        blend(lm, [Text("Hello"), Cached(ev, name="doc")])
    with pytest.raises(BlendError, match="evicted"):
        blend(lm, [Text("Hello"), Cached(kvcodec.encode(ev, config="lossless"), name="doc")])


def test_attention_policies_hand_the_encoder_each_kept_tokens_score():
    """An attention-based eviction records, per layer and head, the score that kept each
    token (aligned with ``kept``; a protected token gets its head's largest finite
    score; 0 in unused slots); other policies record none."""
    from kvcodec.core.kvcache import KEPT_IMPORTANCE
    from kvcodec.evict.base import stats_from_cache

    kv = _random_kv(n=200)
    st = stats_from_cache(kv)
    ev = evict.evict(kv, "snapkv", 0.25, st)
    scores = get_policy("snapkv").score(st)
    got = ev.extra[KEPT_IMPORTANCE]
    assert [tuple(g.shape) for g in got] == [tuple(k.shape) for k in ev.kept]
    for s, pos, imp in zip(scores, ev.kept, got):
        for h in range(pos.shape[0]):
            finite = s[h][torch.isfinite(s[h])]
            for slot, p in enumerate(pos[h].tolist()):
                want = 0.0 if p < 0 else float(s[h, p]) if torch.isfinite(s[h, p]) \
                    else float(finite.max())
                assert float(imp[h, slot]) == pytest.approx(want, rel=1e-6)
    assert torch.isinf(scores[0]).any()  # the sinks and window were protected
    assert KEPT_IMPORTANCE not in evict.evict(kv, "knorm", 0.25, st).extra
