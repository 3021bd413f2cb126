"""Which models kvcodec codes (kvcodec.models.support): a model whose layers do not all
cache per-head keys and values of one geometry is refused from its config, before any
weight loads, with a ShapeError that says why; multi-query models cache one KV head."""
import pytest
import torch
import transformers
from click.testing import CliRunner

import kvcodec
from kvcodec.errors import KVCodecError, ShapeError
from kvcodec.integrations import hf
from kvcodec.models import LoadedModel, fingerprint
from kvcodec.models.support import check_kv_model, kv_geometry
from kvcodec_cli.main import main
from tiny_models import token_ids, with_embedded_tokenizer

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _config(model_type, **over):
    """A small config of ``model_type``: SMALL's fields the type has, then ``over``."""
    cls = transformers.CONFIG_MAPPING[model_type]
    fields = cls().to_dict()
    return cls(**{**{k: v for k, v in SMALL.items() if k in fields}, **over})


# (model type, config overrides, what the refusal names). Each raised a raw transformers
# or Python error before (capture's forward pass, fingerprint's config read).
REFUSED = [
    ("qwen3_5_text", {}, "linear_attention layers"),          # Qwen3.5: Gated DeltaNet
    ("granitemoehybrid", {}, "linear_attention layers"),      # Granite 4.0
    ("jamba", {}, "mamba layers"),
    ("lfm2", {"full_attn_idxs": [1, 3]}, "conv layers"),       # LFM2: short convolutions
    ("nemotron_h", {}, "linear_attention"),
    ("falcon_h1", {}, "hybrid layers"),
    ("recurrent_gemma", {}, "recurrent layers"),
    ("mamba", {}, "no attention heads"),
    ("rwkv", {}, "no attention heads"),
    ("bart", {}, "encoder-decoder"),
    ("bart", {"is_encoder_decoder": False}, "encoder-decoder"),  # as BartForCausalLM has it
    ("deepseek_v3", {}, "multi-head latent attention"),
    ("gemma4_text", {"head_dim": 16, "global_head_dim": 64}, r"different head_dim \(16, 64\)"),
    ("gemma3n_text", {"num_kv_shared_layers": 2}, "2 of its 4 layers reuse"),
]


@pytest.mark.parametrize("model_type,over,needle", REFUSED, ids=[r[0] for r in REFUSED])
def test_models_kvcodec_cannot_code_are_refused_from_their_config(model_type, over, needle):
    config = _config(model_type, **over)
    for call in (check_kv_model, lambda c: fingerprint(c, None)):
        with pytest.raises(ShapeError, match=needle):
            call(config)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "mistral", "phi3",
                                        "gpt_oss", "llama4_text", "cohere2", "gpt2"])
def test_attention_models_pass(model_type):
    check_kv_model(_config(model_type))


@torch.no_grad()
def test_capture_of_a_hybrid_model_is_a_clear_error():
    """Qwen3.5 (linear attention beside full attention): capture_kv ran the forward pass
    and raised transformers' ValueError ('get_seq_length can only be called on Attention
    layers') from inside it."""
    config = _config("qwen3_5_text")
    model = transformers.Qwen3_5ForCausalLM(config).eval()
    lm = LoadedModel(model, None, {"architecture": "x"})  # a fingerprint made elsewhere
    with pytest.raises(ShapeError, match="linear_attention"):
        kvcodec.capture_kv(lm, token_ids=list(range(10, 40)))


def test_a_model_that_keeps_no_cache_is_a_clear_error():
    """GPT-1 fills no cache: capture's importance pass raised AttributeError on None."""
    torch.manual_seed(0)
    model = transformers.OpenAIGPTLMHeadModel(_config("openai-gpt", n_embd=64, n_layer=2,
                                                      n_head=4)).eval()
    lm = LoadedModel(model, None, fingerprint(model.config, None, model))
    with pytest.raises(ShapeError, match="kept no keys and values"):
        kvcodec.capture_kv(lm, token_ids=list(range(10, 40)))


def test_encode_with_a_hybrid_model_directory_is_one_line_before_its_weights_load(tmp_path):
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(_config("qwen3_5_text", vocab_size=49152))
    path = with_embedded_tokenizer(model, tmp_path / "qwen3.5-tiny")
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document about nothing in particular.")
    r = CliRunner().invoke(main, ["encode", str(doc), "-o", str(tmp_path / "d.kvc"),
                                  "--model", path])
    assert r.exit_code == 1, r.output
    assert "qwen3_5_text has linear_attention layers" in r.output, r.output
    assert "Traceback" not in r.output and r.output.splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "d.kvc").exists()
    # The directory to serve: model-path printed it, and serve started vLLM, whose
    # connector refused the model only at its start.
    for args in (["model-path", path], ["serve", "--store", str(tmp_path / "s"), "--model",
                                        path, "--port", "8765"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and "Traceback" not in r.output, (args, r.output)
        assert r.output.splitlines()[-1].startswith("error: ") and \
            "qwen3_5_text has linear_attention layers" in r.output, r.output
        assert r.output.count("\n") == 1 and path not in r.output, r.output  # no path printed
    # A precompute job: refused before its store is made (it left an empty directory).
    r = CliRunner().invoke(main, ["precompute", str(doc), "--store", str(tmp_path / "kv"),
                                  "--model", path, "--no-progress"])
    assert r.exit_code == 1 and "qwen3_5_text has linear_attention layers" in r.output
    assert not (tmp_path / "kv").exists()


@pytest.mark.parametrize("model_type,over,heads", [
    ("falcon", {"multi_query": True}, 1),                       # Falcon-7B
    ("falcon", {"multi_query": False, "num_kv_heads": 4}, 4),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, 4),  # Falcon-40B
    ("gpt_bigcode", {"n_embd": 64, "n_layer": 2, "n_head": 4}, 1),  # StarCoder
    ("gpt_bigcode", {"n_embd": 64, "n_layer": 2, "n_head": 4, "multi_query": False}, 4),
])
@torch.no_grad()
def test_multi_query_models_round_trip(model_type, over, heads):
    """Falcon-7B caches one KV head, which the fingerprint took for its 71 attention
    heads: every encode of its cache was refused (the fingerprint contradicts the
    tensors). Lossless round trips are exact in the model, whatever its KV heads."""
    config = _config(model_type, **over)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    assert kv_geometry(model.config)[1] == heads
    lm = LoadedModel(model, None, fingerprint(model.config, None, model))
    kv = kvcodec.capture_kv(lm, token_ids=token_ids(80, 512, 0)[0].tolist())
    assert kv.keys[0].shape[1] == heads
    data = kvcodec.encode(kv, config="lossless")
    cont = token_ids(6, 512, 1)
    ref = model(input_ids=cont, past_key_values=kv.to_dynamic_cache(model.config)).logits
    got = model(input_ids=cont, past_key_values=hf.load_cache(model, data,
                                                              fingerprint=lm.fingerprint)).logits
    assert torch.equal(ref, got)


def test_every_causal_lm_config_transformers_knows_is_coded_or_refused_clearly():
    """The default config of every causal-LM architecture transformers has: its
    fingerprint is made or refused with a KVCodecError, never a raw error (Mamba's an
    AttributeError, Gemma 4's transformers' own guard, Cohere Compass's rotary module a
    KeyError on its own default config). A guard for transformers upgrades."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    made, refused = [], []
    for name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = transformers.CONFIG_MAPPING[name]()
        except Exception:  # noqa: BLE001 - transformers cannot make its own default
            continue
        try:
            fp = fingerprint(config, None)
        except KVCodecError:
            refused.append(name)
            continue
        assert all(isinstance(fp[k], int) and fp[k] > 0
                   for k in ("num_layers", "num_kv_heads", "head_dim")), (name, fp)
        made.append(name)
    assert {"llama", "qwen3", "gemma3_text", "falcon", "gpt2"} <= set(made)
    assert {"mamba", "qwen3_5_text", "gemma4_text", "jamba"} <= set(refused)
