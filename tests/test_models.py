"""Any decoder family: RoPE of every kind, sliding-window layers, weight fingerprints.

Driven by the registry of tiny random-initialised models in ``tiny_models.py`` (built
from transformers configs, nothing downloaded): exactness and plumbing here, quality on
the embedded model (test_rd, test_codec).
"""
import copy
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import TINY, token_ids
from transformers.cache_utils import DynamicSlidingWindowLayer

import kvcodec
from kvcodec.core.transforms import Rope, layer_ropes, rope, rope_tables
from kvcodec.errors import ConfigError, ModelMismatchError, ShapeError
from kvcodec.format import io as kvio
from kvcodec.format.stream import RateLimitedReader
from kvcodec.integrations import hf
from kvcodec.models import LoadedModel, fingerprint
from kvcodec.models.rope import rope_spec
from kvcodec.quality.evaluate import compare_logits
from kvcodec.store import ChunkStore

PROMPT, CONT = 300, 12


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, None, fingerprint(model.config, None, model))


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request):
    """(name, LoadedModel, captured KVCache of a 300-token prompt, continuation ids)."""
    lm = _loaded(TINY[request.param]())
    ids = token_ids(PROMPT, lm.model.config.vocab_size, seed=0)[0].tolist()
    kv = kvcodec.capture_kv(lm, token_ids=ids)
    return request.param, lm, kv, token_ids(CONT, lm.model.config.vocab_size, seed=1)


@torch.no_grad()
def _continue(model, cache, cont):
    return model(input_ids=cont, past_key_values=cache).logits[0]


@torch.no_grad()
def _greedy(model, cache, first, steps=6):
    out, tok = [], first
    for _ in range(steps):
        tok = model(input_ids=tok, past_key_values=cache).logits[:, -1:].argmax(-1)
        out.append(int(tok))
    return out


def test_lossless_round_trip_is_exact_in_the_model(family):
    name, lm, kv, cont = family
    data = kvcodec.encode(kv, config="lossless", chunk_tokens=64)
    ref = _continue(lm.model, kv.to_dynamic_cache(lm.model.config), cont)
    got = _continue(lm.model, hf.load_cache(lm.model, data, fingerprint=lm.fingerprint), cont)
    assert torch.equal(ref, got), name
    first = cont[:, :1]
    assert (_greedy(lm.model, hf.load_cache(lm.model, data), first)
            == _greedy(lm.model, kv.to_dynamic_cache(lm.model.config), first))


def _kl_and_bits(lm, kv, cont, config):
    data = kvcodec.encode(kv, config=config)
    with kvcodec.open(data) as f:
        assert f.layer_tokens == kv.layer_tokens
        bits = f.bits_per_element()
    ref = _continue(lm.model, kv.to_dynamic_cache(lm.model.config), cont)
    got = _continue(lm.model, hf.load_cache(lm.model, data, fingerprint=lm.fingerprint), cont)
    return compare_logits(ref, got)["kl"], bits


def test_lossy_configs_run_on_every_family(family):
    """The default and cachegen configs code every family. Random-init models have no
    structure to exploit, and their sharp attention makes them far more sensitive than
    trained ones: the quality bar is on the embedded model (test_rd). Here, keys coded
    before the model's own RoPE must do as well as keys coded after it: a wrong
    frequency, scaling or rotary dim would make un-rotation lossy on top of quantization."""
    name, lm, kv, cont = family
    kl, bits = _kl_and_bits(lm, kv, cont, "default")
    post = dict(kvcodec.load_config("default"), key_transform=None)
    kl_post, _ = _kl_and_bits(lm, kv, cont, post)
    kl_cg, bits_cg = _kl_and_bits(lm, kv, cont, "cachegen")
    print(f"{name}: default {bits:.2f} bits/element KL {kl:.3f} (post-RoPE keys: "
          f"{kl_post:.3f}); cachegen {bits_cg:.2f} bits KL {kl_cg:.3f}")
    assert bits < 4.5 and bits_cg < 6
    assert kl < 1.3 * kl_post + 0.05, (name, kl, kl_post)
    assert 0 <= kl < 1.0 and 0 <= kl_cg < 0.3, (name, kl, kl_cg)


def test_rope_tables_match_the_models_rotary_module(family):
    """Our cos/sin (scaling included) are the model's own, for every layer type."""
    name, lm, kv, _ = family
    spec = lm.fingerprint["rope"]
    model = lm.model
    rot = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    pos = torch.arange(PROMPT)[None]
    x = torch.zeros(1, 1, dtype=torch.float32)
    types = getattr(rot, "layer_types", None)
    for layer in range(len(spec["layers"])):
        r = layer_ropes({"type": "rope_strip", **spec}, len(spec["layers"]), kv.head_dim)[layer]
        kwargs = {"layer_type": model.config.layer_types[layer]} if types else {}
        cos, sin = rot(x, pos, **kwargs)
        ours_cos, ours_sin = rope_tables(0, PROMPT, r)
        torch.testing.assert_close(ours_cos, cos[0].float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours_sin, sin[0].float(), atol=1e-4, rtol=1e-4)


def test_unrotate_then_rerotate_is_the_identity(family):
    name, lm, kv, _ = family
    ropes = layer_ropes(kvcodec.core.transforms.key_transform(
        kvcodec.load_config("default"), kv.model, kv.num_layers), kv.num_layers, kv.head_dim)
    for layer, r in enumerate(ropes):
        k = kv.keys[layer]
        s0 = kv.num_tokens - k.shape[2]
        back = rope(rope(k, r, s0, inverse=True), r, s0)
        torch.testing.assert_close(back, k.float(), atol=1e-4, rtol=1e-4)


def test_sliding_window_layers_keep_their_span_and_kind():
    lm = _loaded(TINY["gemma3"]())
    ids = token_ids(PROMPT, lm.model.config.vocab_size, seed=2)[0].tolist()
    kv = kvcodec.capture_kv(lm, token_ids=ids)
    window = lm.model.config.sliding_window
    assert kv.num_tokens == PROMPT and min(kv.layer_tokens) == window - 1
    # chunk_tokens 32: the windows start inside a chunk (300 - 63 = 237 = 7*32 + 13).
    data = kvcodec.encode(kv, config="default", chunk_tokens=32)
    cache = hf.load_cache(lm.model, data)
    for layer, n in zip(cache.layers, kv.layer_tokens):
        assert layer.keys.shape[2] == n
        if n < PROMPT:
            assert isinstance(layer, DynamicSlidingWindowLayer)
            assert layer.cumulative_length == PROMPT
    assert cache.get_seq_length() == PROMPT
    with kvcodec.open(data) as f:
        whole = f.decode()
        assert f.summary()["layer_tokens"] == kv.layer_tokens
        # Chunk by chunk (the streaming path) lands the same values.
        streamed = f.empty_cache()
        for _ in f.iter_chunks(out=streamed):
            pass
        # The rows the index bounds each item by are what its layer holds in its chunk:
        # none before a window's span, 19 where it starts (256 - 237), 12 in the last.
        rows = f.sections._item_rows()
        assert rows.tolist() == [[f.meta.layer_span(l, range(c, c + 1))[1]
                                  for l, _ in f.meta.streams] for c in range(f.num_chunks)]
        assert {0, 12, 19, 32} <= set(rows.ravel().tolist())
        # A range before the windows' span decodes to empty sliding layers.
        head = f.decode(chunks=0)
        assert head.layer_tokens == [0 if n < PROMPT else 32 for n in kv.layer_tokens]
    for a, b in zip(whole.keys + whole.values, streamed.keys + streamed.values):
        assert torch.equal(a, b)
    stream = kvcodec.open(RateLimitedReader(io.BytesIO(data), 1e12))
    for a, b in zip(hf.load_cache(lm.model, stream).layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # A slow stream (~0.2 s on the wire) decodes in several runs of chunks, some starting
    # inside the windows' span: the same values.
    with kvcodec.open(RateLimitedReader(io.BytesIO(data), len(data) * 8 / 0.2)) as slow:
        got = slow.empty_cache()
        spans = list(slow.iter_chunks(out=got))
        assert [c for c, _, _ in spans] == list(range(slow.num_chunks))
        for a, b in zip(whole.keys + whole.values, got.keys + got.values):
            assert torch.equal(a, b)


def test_full_attention_keys_of_a_mixed_model_get_finer_steps():
    """The model-free default's full_attention_key_scale: written out per layer in the
    file (readers need nothing new), only where a model mixes layer kinds."""
    from kvcodec.core.config import for_model, load_config, resolve_layers

    lm = _loaded(TINY["gemma2"]())  # sliding, full, sliding, full
    kv = kvcodec.capture_kv(lm, token_ids=token_ids(PROMPT, seed=5)[0].tolist())
    base = load_config("default")
    step = resolve_layers(base, 4)["key"][0]["step"]
    data = kvcodec.encode(kv, config="default", chunk_tokens=64)
    with kvcodec.open(data) as f:
        cfg = f.config
    assert "full_attention_key_scale" not in cfg
    keys = [q["step"] for q in resolve_layers(cfg, 4)["key"]]
    assert keys == [step, step * base["full_attention_key_scale"]] * 2
    assert resolve_layers(cfg, 4)["value"] == resolve_layers(base, 4)["value"]
    # What the file records is what the encoder codes with: the same bytes as the
    # explicit config given directly.
    assert data == kvcodec.encode(kv, config=for_model(base, lm.fingerprint, 4),
                                  chunk_tokens=64)
    # Layers that all attend alike keep the default's steps; only the field goes.
    for types in (None, ["full_attention"] * 4, ["sliding_attention"] * 4):
        plain = for_model(base, dict(lm.fingerprint, layer_types=types), 4)
        assert "full_attention_key_scale" not in plain
        assert resolve_layers(plain, 4) == resolve_layers(base, 4)
    with pytest.raises(ConfigError, match="full_attention_key_scale"):
        load_config(dict(base, full_attention_key_scale=0))


@pytest.mark.parametrize("name", ["llama3", "gemma2", "interleaved"])
def test_a_model_free_store_verifies_its_own_keys(tmp_path, name):
    """A store keys its entries by its encoder's config, and `store verify --unsalted`
    recomputes a first entry's key from the config the entry records: where the config
    was applied per file only (the default's full_attention_key_scale; its optional key
    transform dropped for a RoPE that cannot be undone), the two differed and verify
    called every first entry damaged (and --quarantine would have moved it aside)."""
    from kvcodec.core.config import load_config
    from kvcodec.store import keys as keying
    from kvcodec_cli.main import main

    lm = _loaded(TINY["llama3" if name == "interleaved" else name]())
    kv = kvcodec.capture_kv(lm, token_ids=token_ids(60, seed=6)[0].tolist())  # < window
    fp = lm.fingerprint
    if name == "interleaved":  # as a GPT-J-style model's fingerprint says (Cohere, GLM)
        fp = dict(fp, rope=dict(fp["rope"], style="interleaved"))
        kv = kvcodec.KVCache(kv.keys, kv.values, kv.token_ids, fp)
    store = ChunkStore(tmp_path, fp, "default")
    assert store.put(kv) == 1
    if name == "interleaved":
        assert store.config["key_transform"] is None
    r = CliRunner().invoke(main, ["store", "verify", str(tmp_path), "--json", "--unsalted"])
    report = json.loads(r.output)
    assert r.exit_code == 0 and report["ok"] == 1 and not report["damaged"], r.output
    if name == "llama3":  # its layers attend alike: keyed as before the rule existed
        old = {k: v for k, v in load_config("default").items()
               if k != "full_attention_key_scale"}
        assert store._base == keying.base_seed(lm.fingerprint, old)


def test_batch_capture_soft_caps_attention_logits_as_the_model_does():
    """Gemma 2 soft-caps its attention logits, which SDPA skips: the corpus job's batch
    capture ran every row through SDPA, so every layer after the first held other K/V
    than the model makes (0.04 off in layer 1's keys, 0.1 in the logits)."""
    from kvcodec.models.batch import capture_batch

    lm = _loaded(TINY["gemma2"]())
    assert lm.model.config.attn_logit_softcapping
    ids = token_ids(60, seed=7)[0].tolist()  # inside the window: every layer keeps all
    own = kvcodec.capture_kv(lm, token_ids=ids)
    got = capture_batch(lm, [ids, ids[:40]])[0]
    for a, b in zip(got.keys + got.values, own.keys + own.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_a_store_serves_sliding_window_models(tmp_path, name, monkeypatch):
    """A store's chunks hold every layer's tokens, sliding-window layers too
    (capture_kv(every_token=True), and the corpus job's batch capture); a load keeps
    each window's last tokens, as the model's own cache does, decodes a sliding layer
    only from the entry its window starts in, and the continuation's logits are the
    model's own, also where a damaged last entry moves the windows earlier. The
    windowed capture (what one file of the prompt needs) is refused with a message
    that says what to do."""
    from kvcodec.core.config import load_config
    from kvcodec.models.batch import capture_batch
    from kvcodec.store import batch as batch_mod

    decoded = []  # per document decoded: (first token, layers)
    real = batch_mod.decode_documents

    def spy(store, docs, threads=0):
        decoded.extend((d.spans[0][0], sorted(d.bufs) if isinstance(d.bufs, dict)
                        else list(range(len(d.bufs)))) for d in docs)  # a list: every layer
        return real(store, docs, threads)

    monkeypatch.setattr(batch_mod, "decode_documents", spy)

    lm = _loaded(TINY[name]())
    window = lm.model.config.sliding_window
    ids = token_ids(PROMPT + CONT, seed=3)[0].tolist()
    config = dict(load_config("lossless"), chunk_tokens=64, name="lossless-64")
    with pytest.raises(kvcodec.KVCodecError, match="every_token=True"):
        ChunkStore(tmp_path / "w", lm.fingerprint, config).put(
            kvcodec.capture_kv(lm, token_ids=ids[:PROMPT]))
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([ids])).logits[0]
    for how in ("capture_kv", "capture_batch"):
        kv = (kvcodec.capture_kv(lm, token_ids=ids[:PROMPT], every_token=True)
              if how == "capture_kv" else capture_batch(lm, [ids[:PROMPT]])[0])
        assert kv.uniform and kv.num_tokens == PROMPT
        store = ChunkStore(tmp_path / how, lm.fingerprint, config)
        assert store.put(kv) == -(-PROMPT // 64)
        cache, n = hf.cache_from_store(lm.model, store, ids[:PROMPT])
        assert n == PROMPT // 64 * 64
        for layer in cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                assert layer.keys.shape[2] == window - 1 and layer.cumulative_length == n
                # its own copy of the window, not a view that keeps all n tokens alive
                assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
            else:
                assert layer.keys.shape[2] >= n
        with torch.no_grad():
            got = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache,
                           use_cache=True).logits[0]
        torch.testing.assert_close(got, ref[n:], atol=2e-4, rtol=1e-4)
        full = [l for l, t in enumerate(lm.model.config.layer_types) if t == "full_attention"]
        # windows of 63 tokens end at 256: they start in the entry of tokens 192-255
        assert decoded[-2:] == [(0, full), (192, list(range(len(cache.layers))))]
    # Fewer tokens than the entries hold (upto): the windows end there, not at the last
    # entry's end (they would lack tokens 130-191 and hold later ones).
    cache, n = hf.cache_from_store(lm.model, store, ids[:PROMPT], partial=True, upto=193)
    assert n == 193 and decoded[-1] == (128, list(range(len(cache.layers))))
    with torch.no_grad():
        got = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache,
                       use_cache=True).logits[0]
    torch.testing.assert_close(got, ref[n:], atol=2e-4, rtol=1e-4)
    entry = store.lookup(ids[:PROMPT])[-1]  # damaged: the prefix ends at 192, and so do
    data = bytearray(entry.read_bytes())   # the windows (decoded again from there)
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    cache, n = hf.cache_from_store(lm.model, store, ids[:PROMPT])
    assert n == 192 and decoded[-1] == (128, list(range(len(cache.layers))))
    with torch.no_grad():
        got = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache,
                       use_cache=True).logits[0]
    torch.testing.assert_close(got, ref[n:], atol=2e-4, rtol=1e-4)


def test_a_fingerprint_without_rope_checks_the_same(family):
    """``rope=False`` (what the store's loader checks a model with) builds no rotary
    module: every field but ``rope`` is the full fingerprint's, and it accepts and
    refuses the caches the full one does."""
    _, lm, kv, _ = family
    full, light = fingerprint(lm.model.config), fingerprint(lm.model.config, rope=False)
    assert full["rope"] is not None and light["rope"] is None
    assert {k: v for k, v in full.items() if k != "rope"} == {
        k: v for k, v in light.items() if k != "rope"}
    from kvcodec.models.fingerprint import check_fingerprint

    check_fingerprint(kv.model, light)
    with pytest.raises(ModelMismatchError, match="num_layers"):
        check_fingerprint(dict(kv.model, num_layers=kv.num_layers + 1), light)


def test_a_fine_tune_is_refused():
    base = TINY["llama3"]()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    fp_base = fingerprint(base.config, None, base)
    fp_tuned = fingerprint(tuned.config, None, tuned)
    assert fp_base["weights_hash"] != fp_tuned["weights_hash"]
    kv = kvcodec.capture_kv(_loaded(base), token_ids=token_ids(64, seed=4)[0].tolist())
    data = kvcodec.encode(kv, config="lossless")
    with pytest.raises(ModelMismatchError, match="weights_hash"):
        hf.load_cache(tuned, data, fingerprint=fp_tuned)
    hf.load_cache(base, data, fingerprint=fp_base)  # its own base is fine
    # A bf16 checkpoint loaded in bf16 or in fp32 is the same model.
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    assert fingerprint(bf16.config, None, bf16)["weights_hash"] == fingerprint(
        bf16.config, None, copy.deepcopy(bf16).float())["weights_hash"] == fp_base["weights_hash"]


def test_format_v2_files_still_decode_and_warn_without_weights():
    data_dir = Path(__file__).parent / "data"
    with kvcodec.open(data_dir / "format-v2.kvc") as f:
        assert f.summary()["format_version"] == 2
        got = f.decode()
        stored = f.model
    want = kvio.load_safetensors(data_dir / "format-v2.decoded.safetensors")
    for a, b in zip(got.keys + got.values, want.keys + want.values):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match="weights hash"):
        kvcodec.check_fingerprint(stored, dict(stored, weights_hash="0123456789abcdef"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kvcodec.check_fingerprint(stored, stored)


def test_length_dependent_rope_is_refused_past_its_range():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    lm = _loaded(transformers.LlamaForCausalLM(cfg).eval())
    kv = kvcodec.capture_kv(lm, token_ids=token_ids(100, 256, seed=5)[0].tolist())
    strict = dict(kvcodec.load_config("default"), key_transform={"type": "rope_strip"})
    kvcodec.encode(kv, config=strict)  # within the original context: exact
    with pytest.raises(ConfigError, match="dynamic"):
        kvcodec.encode(kv, config=strict, position_offset=100)
    # The model-free default codes post-RoPE keys there instead of failing.
    with kvcodec.open(kvcodec.encode(kv, config="default", position_offset=100)) as f:
        assert f.key_transform is None


def test_interleaved_rope_and_non_kv_caches_are_refused():
    with pytest.raises(ConfigError, match="rotate_half"):
        kvcodec.core.transforms.key_transform(
            {"key_transform": {"type": "rope_strip"}},
            {"model_type": "cohere", "rope": {"style": "interleaved", "kinds": [], "layers": []}})
    from transformers.cache_utils import LinearAttentionLayer

    class _Cache:
        layers = [LinearAttentionLayer()]

    with pytest.raises(ShapeError, match="linear attention"):
        kvcodec.KVCache.from_dynamic_cache(_Cache())


def test_rope_spec_records_per_layer_kinds():
    gemma3 = TINY["gemma3"]()
    spec = rope_spec(gemma3.config)
    assert len(spec["kinds"]) == 2 and spec["style"] == "half"
    kinds = [spec["kinds"][i]["inv_freq"][1] for i in spec["layers"]]
    assert len(set(kinds)) == 2  # local and global theta differ
    phi = rope_spec(TINY["phi3"]().config)
    assert 2 * len(phi["kinds"][0]["inv_freq"]) < phi_head_dim()
    yarn = rope_spec(TINY["qwen2-yarn"]().config)
    assert yarn["kinds"][0]["scaling"] > 1.0


def phi_head_dim():
    cfg = TINY["phi3"]().config
    return cfg.hidden_size // cfg.num_attention_heads


def test_rope_from_theta_matches_legacy_tables():
    r = Rope.from_theta(10000.0, 64)
    cos, sin = rope_tables(5, 10, r)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ang = torch.outer(torch.arange(5, 15, dtype=torch.float64), inv)
    assert torch.equal(cos, torch.cat([ang, ang], -1).cos().float())
    assert torch.equal(sin, torch.cat([ang, ang], -1).sin().float())


@pytest.mark.parametrize("offset,length", [(0, 2000), (250, 20), (255, 1), (256, 256),
                                           (7, 1000), (3000, 600), (0, 0)])
def test_rope_tables_of_any_span_equal_the_direct_computation(offset, length):
    """Tables are built from per-block pieces shared by every span (the spans a stream
    decodes in vary): the same float32 values as computing the span itself, contiguous,
    with a scaled (YaRN-style) rope too."""
    for r in (Rope.from_theta(10000.0, 64), Rope(Rope.from_theta(5e5, 128).inv_freq, 1.2)):
        cos, sin = rope_tables(offset, length, r)
        inv = torch.tensor(r.inv_freq, dtype=torch.float64)
        ang = torch.outer(torch.arange(offset, offset + length, dtype=torch.float64), inv)
        emb = torch.cat([ang, ang], -1)
        assert cos.shape == (length, r.rotary_dim) and cos.is_contiguous() and sin.is_contiguous()
        assert torch.equal(cos, (emb.cos() * r.scaling).float())
        assert torch.equal(sin, (emb.sin() * r.scaling).float())


def test_calibrate_any_model_directory_then_encode_picks_it_up(tmp_path, monkeypatch, lm):
    """`kvcodec calibrate --model DIR` writes a config keyed to that model, which
    `encode(config="default")` then uses for it (and only for it)."""
    import transformers

    from kvcodec_cli.main import main

    cfg = transformers.Qwen2Config(
        vocab_size=lm.model.config.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.1)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-qwen2"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "configs"))
    r = CliRunner().invoke(main, ["calibrate", "--model", str(model_dir), "--target-kl", "0.05",
                                  "--prefill", "160", "--continuation", "24"])
    assert r.exit_code == 0, r.output
    assert "about" in r.output and "min" in r.output  # the time estimate
    written = list((tmp_path / "configs").glob("tiny-qwen2-*.json"))
    assert len(written) == 1
    tiny = kvcodec.load_model(str(model_dir))
    kv = kvcodec.capture_kv(tiny, "The quick brown fox jumps over the lazy dog. " * 20)
    with kvcodec.open(kvcodec.encode(kv, config="default")) as f:
        assert f.config.get("model_key") == kvcodec.core.config.model_key(tiny.fingerprint)
    # Another model (the embedded one) does not pick up this calibration.
    assert kvcodec.load_config("default", model=lm.fingerprint).get("model_key") != \
        f.config["model_key"]
