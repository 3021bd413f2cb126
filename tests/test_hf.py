"""Decoded files as HF caches: eager and layer-wise loading give the same model outputs."""
import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec import evaluate, hf
from kvcodec_cli.main import main


@pytest.fixture(scope="module")
def doc(kv_600):
    return kvcodec.encode(kv_600, config="default")


def logits(lm, cache, ids):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits


def test_eager_and_layerwise_caches_match(lm, doc, kv_600):
    prompt = lm.tokenizer(" What is this about?", add_special_tokens=False)["input_ids"]
    eager = hf.load_cache(lm.model, doc, fingerprint=lm.fingerprint)
    assert eager.get_seq_length() == 600
    lw = hf.LayerwiseCache.open(lm.model, doc, fingerprint=lm.fingerprint)
    assert lw.get_seq_length() == 600  # known before any layer is decoded
    a, b = logits(lm, eager, prompt), logits(lm, lw, prompt)
    assert torch.equal(a, b)
    assert lw.get_seq_length() == 600 + len(prompt)
    ref = kvcodec.decode(doc)
    assert torch.equal(eager.layers[7].keys[:, :, :600], ref.keys[7])
    # Generation continues identically from both.
    assert (evaluate.greedy_generate(lm, hf.load_cache(lm.model, doc), prompt, 8)
            == evaluate.greedy_generate(lm, hf.LayerwiseCache.open(lm.model, doc), prompt, 8))


def test_layerwise_cache_overlaps_decode_with_compute(lm, doc):
    lw = hf.LayerwiseCache.open(lm.model, doc)
    logits(lm, lw, [42, 43])
    ev = {(e, l): t for e, l, t in lw.timeline}
    n = lm.config.num_hidden_layers
    # Layer 0's attention ran before the last layer had finished decoding: the model
    # did not wait for the whole file (the recorded events, not a timing threshold).
    assert ev[("attention", 0)] < ev[("decode_end", n - 1)]
    for layer in range(n):
        assert ev[("decode_end", layer)] <= ev[("attention", layer)]


def test_lossless_cache_reproduces_full_prefill_exactly(lm, kv_600):
    doc = kvcodec.encode(kv_600, config="lossless")
    prompt = lm.tokenizer(" In short,", add_special_tokens=False)["input_ids"]
    out = evaluate.greedy_generate(lm, hf.LayerwiseCache.open(lm.model, doc), prompt, 12)
    ref = evaluate.greedy_generate(lm, kv_600, prompt, 12)
    assert out == ref


def test_wrong_model_and_truncated_stream(lm, doc):
    other = dict(lm.fingerprint, num_layers=12)
    with pytest.raises(kvcodec.ModelMismatchError):
        hf.load_cache(lm.model, doc, fingerprint=other)
    with pytest.raises(kvcodec.TruncatedError):
        hf.LayerwiseCache.open(lm.model, doc[: len(doc) // 2])


def test_generate_cli(tmp_path, doc):
    path = tmp_path / "doc.kvc"
    path.write_bytes(doc)
    r = CliRunner().invoke(main, ["generate", "--context", str(path), "--prompt",
                                  " This license is", "--max-new-tokens", "6", "--compare"])
    assert r.exit_code == 0, r.output
    assert "agreement with full prefill" in r.output
