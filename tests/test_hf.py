"""Decoded files as HF caches: eager and layer-wise loading give the same model outputs."""
import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.integrations import hf
from kvcodec.quality import evaluate
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


def test_layerwise_cache_overlaps_decode_with_compute(lm, doc, monkeypatch):
    """The model computes layer 0 while later layers are still decoding. The decoder can
    outrun a 600-token forward pass, so the last layer's decode is held until layer 0's
    attention has run: a cache that made the model wait for the whole file would never
    release it (the recorded events, not a timing threshold)."""
    import threading

    from kvcodec.format.reader import KVCFile

    n = lm.config.num_hidden_layers
    computing = threading.Event()
    decode_into = KVCFile.decode_into

    def held(self, dst, *args, **kwargs):
        if n - 1 in dst:
            assert computing.wait(timeout=120), "the model waited for every layer"
        return decode_into(self, dst, *args, **kwargs)

    monkeypatch.setattr(KVCFile, "decode_into", held)
    lw = hf.LayerwiseCache.open(lm.model, doc)
    update = lw.update

    def update_and_tell(key_states, value_states, layer_idx, *args, **kwargs):
        out = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0:
            computing.set()
        return out

    lw.update = update_and_tell
    logits(lm, lw, [42, 43])
    ev = {(e, l): t for e, l, t in lw.timeline}
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


def test_reserved_cache_appends_in_place_and_matches_a_plain_cache(lm, doc):
    """The loaded cache writes the prompt and generated tokens into its spare room, grows
    past it, and the model's outputs are those of a plain DynamicCache of the same data."""
    prompt = lm.tokenizer(" Who may copy it?", add_special_tokens=False)["input_ids"]
    cache = hf.load_cache(lm.model, doc, reserve=len(prompt) + 2)
    layer = cache.layers[3]
    assert isinstance(layer, hf.ReservedLayer) and layer.capacity == 600 + len(prompt) + 2
    buf = layer._kbuf
    plain = kvcodec.decode(doc).to_dynamic_cache(lm.config)
    assert torch.equal(logits(lm, cache, prompt), logits(lm, plain, prompt))
    assert layer._kbuf is buf and layer.keys.data_ptr() == buf.data_ptr()  # no copy
    assert cache.get_seq_length() == 600 + len(prompt)
    # Five more tokens: the reserve runs out after two and the layer grows once.
    assert (evaluate.greedy_generate(lm, cache, [42], 5)
            == evaluate.greedy_generate(lm, plain, [42], 5))
    assert layer._kbuf is not buf and layer.capacity >= cache.get_seq_length()
    assert torch.equal(cache.layers[3].keys, plain.layers[3].keys)
    cache.crop(600 - cache.get_seq_length())
    assert cache.get_seq_length() == 600
    assert torch.equal(cache.layers[29].values, kvcodec.decode(doc).values[29])
    grown = layer._kbuf
    logits(lm, cache, [7])  # appended in place after the crop too
    assert layer._kbuf is grown and cache.get_seq_length() == 601


def test_cache_from_kv_and_geometry_checks(lm, doc, kv_600):
    cache = hf.cache_from_kv(lm.model, kvcodec.KVCache([k.half() for k in kv_600.keys],
                                                       [v.half() for v in kv_600.values]))
    assert cache.get_seq_length() == 600 and cache.layers[0].keys.dtype == torch.float32
    assert torch.equal(cache.layers[5].keys, kv_600.keys[5].half().float())
    short = kvcodec.KVCache(kv_600.keys[:12], kv_600.values[:12])
    with pytest.raises(kvcodec.ModelMismatchError, match="12 layers"):
        hf.cache_from_kv(lm.model, short)
    with pytest.raises(kvcodec.ModelMismatchError, match="12 layers"):
        hf.load_cache(lm.model, kvcodec.encode(short, config="default"))


def test_bad_reserve_threads_and_dtypes_are_clear_errors(lm, kv_600):
    """A string reserve or thread count was a TypeError (pybind11's for threads), -1 a
    buffer one token short, a reserve past memory torch's RuntimeError, a dtype given as
    a string torch.empty's TypeError."""
    data = kvcodec.encode(kv_600.slice(0, 40), config="lossless")
    for reserve in ("5", -1, 1.5, True):
        with pytest.raises(kvcodec.ShapeError, match="reserve must be an integer"):
            hf.load_cache(lm.model, data, reserve=reserve)
        with pytest.raises(kvcodec.ShapeError, match="reserve must be an integer"):
            hf.cache_from_kv(lm.model, kv_600, reserve=reserve)
    with pytest.raises(kvcodec.BackendError, match="cannot allocate the cache's"):
        hf.load_cache(lm.model, data, reserve=10 ** 12)
    for threads in ("2", 1.0, 2 ** 40 * 1.0, None):
        with pytest.raises(kvcodec.ConfigError, match="threads must be an integer"):
            hf.load_cache(lm.model, data, threads=threads)
        with pytest.raises(kvcodec.ConfigError, match="threads must be an integer"):
            kvcodec.encode(kv_600.slice(0, 40), threads=threads)
    for dtype in ("float16", torch.int8, float):
        with pytest.raises(kvcodec.ShapeError, match="dtype must be torch.float16"):
            kvcodec.decode(data, dtype=dtype)
    big = hf.load_cache(lm.model, data, threads=2 ** 40)  # a huge count: as many as there is work
    assert big.get_seq_length() == 40


def test_streamed_load_equals_file_load(lm, doc):
    from kvcodec.format.stream import RateLimitedReader
    import io

    a = hf.load_cache(lm.model, doc)
    b = hf.load_cache(lm.model, RateLimitedReader(io.BytesIO(doc), 2e9))
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
