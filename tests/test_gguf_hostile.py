"""Crafted, truncated and incomplete GGUF files: a clear error before transformers builds a
model from them (it trusts the header: a file naming ``llama`` with no tensors became a
7B-parameter model of random weights, ~27 GB, and a missing weight a random one)."""
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import kvcodec
from kvcodec.errors import BackendError
from kvcodec.models.gguf_header import read_header
from kvcodec_cli.main import main

L, H, KV, D, F, V = 2, 64, 2, 16, 128, 260


def _byte_tokenizer(w):
    """A byte-level tokenizer of V tokens (256 bytes and 4 specials) into GGUF writer w."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([bytes([i]).decode("latin-1") for i in range(256)]
                     + ["<s>", "</s>", "<unk>", "<pad>"])
    w.add_token_types([1] * 256 + [3] * 4)
    w.add_token_scores([0.0] * V)
    w.add_token_merges([])


def _tiny_gguf(path, drop=(), hidden=H, ffn=F, heads=H // D):
    """A whole Llama of 2 blocks (hidden 64) with a byte-level tokenizer, minus ``drop``;
    ``hidden``, ``ffn`` and ``heads`` are what its metadata claims (its tensors stay)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    _byte_tokenizer(w)
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
    for i in range(L):
        for name, shape in (("attn_norm", (H,)), ("attn_q", (H, H)), ("attn_k", (KV * D, H)),
                            ("attn_v", (KV * D, H)), ("attn_output", (H, H)),
                            ("ffn_norm", (H,)), ("ffn_gate", (F, H)), ("ffn_up", (F, H)),
                            ("ffn_down", (H, F))):
            shapes[f"blk.{i}.{name}.weight"] = shape
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name not in drop:
            w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_str(key, value):
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key, value):
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def _header(kvs, tensors=b"", n_tensors=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + tensors


def _tensor(name, shape, kind=0, offset=0):
    dims = b"".join(struct.pack("<Q", d) for d in shape)
    return _s(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", kind, offset)


_LLAMA = [_kv_str("general.architecture", "llama"), _kv_u32("llama.block_count", 2)]

# name -> (bytes, what the error says)
CRAFTED = {
    "kv_count_past_the_file": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 60),
                               "metadata count"),
    "string_past_the_file": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("general.architecture")
                             + struct.pack("<IQ", 8, 1 << 62) + b"llama",
                             "general.architecture's length"),
    "array_past_the_file": (_header([_s("tokenizer.ggml.tokens")
                                     + struct.pack("<IIQ", 9, 8, 1 << 40) + b"x" * 64]),
                            "item count"),
    "arrays_nested_deep": (_header([_s("a") + struct.pack("<I", 9)
                                    + struct.pack("<IQ", 9, 1) * 3 + struct.pack("<IQ", 4, 0)]),
                           "nested deeper"),
    "unknown_value_type": (_header([_s("general.architecture") + struct.pack("<I", 99)
                                    + b"\0" * 16]), "unknown type 99"),
    "version_99": (_header(_LLAMA, version=99), "version 99"),
    "tensor_count_past_the_file": (_header(_LLAMA, n_tensors=1 << 50), "tensor count"),
    "five_dimensions": (_header(_LLAMA, _tensor("token_embd.weight", (1, 1, 1, 1, 1)), 1),
                        "5 dimensions"),
    "unknown_tensor_type": (_header(_LLAMA, _tensor("token_embd.weight", (32,), kind=999), 1),
                            "unknown type 999"),
    "tensor_data_past_the_file": (_header(_LLAMA, _tensor("token_embd.weight", (1 << 40,)), 1),
                                  "outside the file"),
    "bad_alignment": (_header(_LLAMA + [_kv_u32("general.alignment", 3)]), "general.alignment"),
    "no_tensors": (_header(_LLAMA), "lacks the tensors of token_embd.weight"),
    "block_number_of_5000_digits": (
        _header(_LLAMA, _tensor("token_embd.weight", (1,))
                + _tensor("blk." + "9" * 5000 + ".attn_q.weight", (1,), offset=32), 2)
        + bytes(4096), "lacks the tensors of blocks 0, 1"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_header_is_refused_before_transformers_reads_it(tmp_path, monkeypatch, name):
    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))
    data, says = CRAFTED[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    with pytest.raises(BackendError, match=says):
        kvcodec.load_model(str(path))
    assert not (tmp_path / "cache" / "models").exists() or \
        not any((tmp_path / "cache" / "models").iterdir())


def test_a_gguf_without_its_tensors_costs_no_model(tmp_path):
    """The case that allocated a default-size model: in a process capped at 6 GiB of address
    space beyond what it has, it is the header's error, not a failed allocation."""
    path = tmp_path / "empty_llama.gguf"
    path.write_bytes(CRAFTED["no_tensors"][0])
    code = textwrap.dedent(f"""
        import resource, kvcodec
        from kvcodec.errors import BackendError
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + (6 << 30), resource.RLIM_INFINITY))
        try:
            kvcodec.load_model({str(path)!r})
        except BackendError as exc:
            print("refused:", exc)
        """)
    env = dict(os.environ, KVCODEC_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert "refused: empty_llama.gguf lacks the tensors of token_embd.weight" in out.stdout, \
        out.stderr[-2000:]


def test_a_tiny_whole_gguf_loads_and_one_missing_weight_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))
    lm = kvcodec.load_model(str(_tiny_gguf(tmp_path / "tiny.gguf")))
    assert lm.fingerprint["num_layers"] == L and lm.fingerprint["num_kv_heads"] == KV
    # transformers fills a weight the file lacks with random values; kvcodec refuses
    path = _tiny_gguf(tmp_path / "holed.gguf", drop=("blk.1.attn_q.weight",))
    with pytest.raises(BackendError, match=r"holed.gguf lacks weights of its model: "
                                           r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        kvcodec.load_model(str(path))
    # a block gone whole is found in the header, before any conversion
    gone = [f"blk.1.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v",
                                          "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                                          "ffn_down")]
    path = _tiny_gguf(tmp_path / "short.gguf", drop=gone)
    assert read_header(path).metadata["llama.block_count"] == L  # a readable header
    with pytest.raises(BackendError, match=r"short.gguf lacks the tensors of block 1 \(of 2 "):
        kvcodec.load_model(str(path))


@pytest.mark.parametrize("claim,error", [
    # a header that reads well but claims sizes its tensors do not have: transformers
    # took the config from the claim and the weights from the tensors and wrote both to
    # its cached directory, which then failed to load (a 2^20 hidden size: a model of
    # ~2^40 weights if trusted)
    (dict(hidden=1 << 20), r"its tensors do not have the shapes its metadata gives: "
                           r"lm_head\.weight \(260, 64\) \(metadata: \(260, 1048576\)\)"),
    (dict(ffn=10 ** 8), r"its tensors do not have the shapes its metadata gives: model\."
                        r"layers\.0\.mlp\.down_proj\.weight \(64, 128\) \(metadata: "),
    # errors transformers raises of its own classes
    (dict(heads=0), r"transformers could not convert claim\.gguf: ZeroDivisionError"),
    (dict(heads=3), r"transformers could not convert claim\.gguf: .*not a multiple of the "
                    r"number of attention heads \(3\)"),
], ids=["hidden-2^20", "ffn-10^8", "heads-0", "heads-3"])
def test_metadata_that_its_tensors_contradict_is_refused(tmp_path, monkeypatch, claim, error):
    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "claim.gguf", **claim)
    with pytest.raises(BackendError, match=error):
        kvcodec.load_model(str(path))
    models = tmp_path / "cache" / "models"
    assert not models.is_dir() or not list(models.iterdir())  # nothing cached to fail later


def test_a_truncated_gguf_is_refused_and_the_cli_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:len(whole) - 1000])
    with pytest.raises(BackendError, match="cut.gguf is not a readable GGUF file .*outside the "
                                           "file"):
        kvcodec.load_model(str(cut))
    r = CliRunner().invoke(main, ["model-path", str(cut)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("error: cut.gguf is not a readable GGUF file")
    assert len(r.output.strip().splitlines()) == 1


def _refused_gguf(path, arch):
    """A GGUF of a model kvcodec cannot code, whole as far as its header goes (the blocks
    and the embedding have tensors), so only its config says it is refused."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_vocab_size(V)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "mamba":
        for key, value in (("conv_kernel", 4), ("state_size", 16), ("time_step_rank", 4),
                           ("inner_size", 2 * H)):
            w.add_uint32(f"mamba.ssm.{key}", value)
    else:  # gemma4: full-attention heads of key_length, sliding ones of the default 256
        w.add_feed_forward_length(F)
        w.add_head_count(H // D)
        w.add_head_count_kv(KV)
        w.add_key_length(2 * D)
        w.add_uint32("gemma4.attention.sliding_window", 64)
    _byte_tokenizer(w)
    w.add_tensor("token_embd.weight", np.zeros((V, H), np.float32))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,says", [
    ("mamba", "mamba has no attention heads"),
    ("gemma4", r"gemma4_text has layers of different head_dim \(32, 256\)"),
])
def test_a_gguf_of_a_refused_model_is_refused_before_transformers_builds_it(
        tmp_path, monkeypatch, arch, says):
    """The config is read first: a real Mamba or Gemma 4 GGUF was converted whole (minutes,
    and the float32 model in memory: ~124 GB for Gemma 4 31B) before the refusal."""
    from transformers import AutoModelForCausalLM

    from kvcodec.errors import ShapeError

    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))

    def built(*args, **kwargs):
        raise AssertionError("transformers built the model of a refused GGUF")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", built)
    path = _refused_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(ShapeError, match=says):
        kvcodec.load_model(str(path))
    models = tmp_path / "cache" / "models"
    assert not models.is_dir() or not list(models.iterdir())
    r = CliRunner().invoke(main, ["model-path", str(path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
