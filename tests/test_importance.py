"""Attention importance from capture_kv, and the encoder's per-token steps built on it."""
import copy

import pytest
import torch

import kvcodec
from kvcodec.errors import ShapeError
from kvcodec.quality.evaluate import compare_logits, continuation_logits


def test_capture_reports_attention_importance(lm, texts, kv_600):
    imp = kv_600.importance
    assert imp.shape == (30, 600) and imp.dtype == torch.float32
    # Each query's attention sums to 1 over the cache, so does their mean.
    torch.testing.assert_close(imp.sum(dim=1), torch.ones(30), rtol=1e-4, atol=1e-4)
    # The attention sink, token 0, draws far more than an average token in most layers.
    assert int((imp[:, 0] > 10 * imp[:, 1:].mean(dim=1)).sum()) >= 20
    # The eager observation step leaves the cache what a plain prefill gives.
    plain = kvcodec.capture_kv(lm, texts["python_license"], max_tokens=600, importance_window=0)
    assert plain.importance is None
    for a, b in zip(plain.values, kv_600.values):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_short_prompt_observes_every_token(lm):
    kv = kvcodec.capture_kv(lm, "Hello there, general Kenobi.", importance_window=128)
    assert kv.importance.shape == (30, kv.num_tokens)
    torch.testing.assert_close(kv.importance.sum(dim=1), torch.ones(30), rtol=1e-4, atol=1e-4)


def test_importance_moves_bits_to_attended_tokens(lm, texts):
    """At equal size the model loses less when attended tokens get finer steps: the
    importance point lies below the rate-distortion curve of equal per-token steps."""
    import math

    from kvcodec.quality.evaluate import sweep_configs

    ids = lm.tokenizer(texts["gpl3"], add_special_tokens=False)["input_ids"]
    kv = kvcodec.capture_kv(lm, token_ids=ids[:1024])
    cont = ids[1024:1024 + 192]
    ref = continuation_logits(lm, kv, cont)
    cfg = kvcodec.load_config("default", model=lm.fingerprint)
    assert cfg["token_importance"]
    plain = copy.deepcopy(cfg)
    del plain["token_importance"]

    def point(c):
        data = kvcodec.encode(kv, config=c)
        kl = compare_logits(ref, continuation_logits(lm, kvcodec.decode(data), cont))["kl"]
        return len(data) * 8 / kv.numel(), kl

    b, k = point(cfg)
    (b1, k1), (b2, k2) = [point(c) for c in sweep_configs(plain, (0.8, 1.25))]
    assert b2 < b < b1, (b2, b, b1)  # the point lies within the plain curve's span
    k_plain = math.exp(math.log(k1) + (math.log(k2) - math.log(k1)) * (b - b1) / (b2 - b1))
    assert k < 0.9 * k_plain, (b, k, k_plain)


def test_encode_without_importance_and_bad_importance(kv_600):
    bare = kvcodec.KVCache(kv_600.keys, kv_600.values, kv_600.token_ids, kv_600.model)
    a = kvcodec.encode(bare)
    b = kvcodec.encode(kv_600)
    assert a != b and len(kvcodec.decode(a).keys) == len(kvcodec.decode(b).keys) == 30
    # The explicit argument overrides the cache's own.
    assert kvcodec.encode(bare, importance=kv_600.importance) == b
    with pytest.raises(ShapeError, match="importance"):
        kvcodec.encode(bare, importance=torch.ones(30, 599))
    with pytest.raises(ShapeError, match="importance"):
        kvcodec.KVCache(kv_600.keys, kv_600.values, importance=torch.ones(29, 600))
    with pytest.raises(ShapeError, match="non-negative"):
        kvcodec.KVCache(kv_600.keys, kv_600.values, importance=-torch.ones(30, 600))


def test_slice_keeps_importance(kv_600):
    part = kv_600.slice(256, 512)
    assert part.num_tokens == 256 and part.token_ids == kv_600.token_ids[256:512]
    assert torch.equal(part.importance, kv_600.importance[:, 256:512])
