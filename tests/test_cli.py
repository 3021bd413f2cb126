"""The CLI: encode/decode/inspect end to end; errors are one line, exit 1, no traceback."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.format import io as kvio
from kvcodec_cli.main import main


@pytest.fixture(scope="module")
def kv_file(tmp_path_factory, kv_600):
    path = tmp_path_factory.mktemp("cli") / "kv.safetensors"
    kvio.save_safetensors(kv_600, path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_encode_decode_inspect_from_tensors(tmp_path, kv_file, kv_600):
    out = tmp_path / "doc.kvc"
    r = run("encode", kv_file, "-o", out, "--config", "cachegen")
    assert r.exit_code == 0, r.output
    assert "bits/element" in r.output and out.is_file()

    r = run("inspect", out, "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)
    assert info["num_tokens"] == 600 and info["num_layers"] == 30 and info["config"] == "cachegen"
    assert info["model"]["architecture"] == "LlamaForCausalLM"
    assert 1.5 < info["bits_per_element"] < 4

    r = run("inspect", out)
    assert r.exit_code == 0 and "bits/element" in r.output and "payload" in r.output

    dec = tmp_path / "dec.safetensors"
    r = run("decode", out, "-o", dec, "--chunks", "1:3", "--dtype", "float16")
    assert r.exit_code == 0, r.output
    kv = kvio.load_safetensors(dec)
    assert kv.num_tokens == 600 - 256 and kv.dtype == torch.float16
    assert kv.token_ids == kv_600.token_ids[256:]
    full = kvcodec.decode(out)
    assert torch.equal(kv.keys[4], full.keys[4][:, :, 256:].half())
    for spec, needle in (("3:1", "A < B"), ("7:9", "are not a range within 0..2"),
                         ("x", "must be N or A:B")):  # 3:1 said "range(3, 3) is outside"
        r = run("decode", out, "-o", dec, "--chunks", spec)
        assert r.exit_code == 1 and needle in r.output and len(r.output.splitlines()) == 1


def test_encode_from_text(tmp_path, texts):
    src = tmp_path / "doc.txt"
    src.write_text(texts["gpl3"])
    out = tmp_path / "doc.kvc"
    r = run("encode", src, "-o", out, "--max-tokens", "300")
    assert r.exit_code == 0, r.output
    with kvcodec.open(out) as f:
        assert f.num_tokens == 300 and f.config["name"] == "default"
        assert f.token_ids[:3] == kvcodec.load_model().tokenizer(texts["gpl3"])["input_ids"][:3]


def test_encode_with_eviction_inspect_and_generate(tmp_path, texts):
    src = tmp_path / "doc.txt"
    src.write_text(texts["gpl3"])
    out = tmp_path / "doc.kvc"
    r = run("encode", src, "-o", out, "--max-tokens", "300", "--evict", "replay:0.25")
    assert r.exit_code == 0, r.output
    assert "25% of tokens kept" in r.output
    info = json.loads(run("inspect", out, "--json").output)
    assert info["evicted"] is True and abs(info["kept_fraction"] - 0.25) < 0.01
    dense = tmp_path / "dense.kvc"
    assert run("encode", src, "-o", dense, "--max-tokens", "300").exit_code == 0
    assert out.stat().st_size < 0.4 * dense.stat().st_size
    r = CliRunner().invoke(main, ["generate", "--context", str(out), "--prompt",
                                  " This License", "--max-new-tokens", "4",
                                  "--compare"])
    assert r.exit_code == 0, r.output
    assert "agreement with full prefill" in r.stderr
    for spec, needle in (("snapkv", "POLICY:RATIO"), ("h2o:0.5", "choose from"),
                         ("knorm:2", "(0, 1]")):
        r = CliRunner().invoke(main, ["encode", str(src), "-o", str(tmp_path / "x.kvc"),
                                      "--max-tokens", "50", "--evict", spec])
        assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("content,needle", [
    (b"", "truncated"), (b"hello world, not a kvc file at all", "not a .kvc"),
])
def test_bad_files_give_one_clear_line(tmp_path, content, needle):
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(content)
    for args in (("inspect", bad), ("decode", bad, "-o", tmp_path / "x.safetensors")):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1
        assert needle in r.output and "Traceback" not in r.output
        assert r.output.startswith("error: ") and r.output.count("\n") == 1


def test_encode_of_a_text_checks_config_and_output_before_the_prefill(tmp_path, monkeypatch):
    import kvcodec_cli.files as files

    def prefill(*args, **kwargs):
        raise AssertionError("prefilled before the config and the output were checked")

    monkeypatch.setattr(files, "capture", prefill)
    src = tmp_path / "doc.txt"
    src.write_text("A short document.")
    for args, needle in (
            (["-o", tmp_path / "a.kvc", "--config", "nonexistent"], "no config 'nonexistent'"),
            (["-o", tmp_path / "a.kvc", "--config", tmp_path / "doc.txt"], "cannot read config"),
            (["-o", tmp_path / "no" / "a.kvc"], "No such file or directory"),
            (["-o", tmp_path / "a.kvc", "--config", "cachegen", "--target-kl", "0.01"],
             "rate")):
        r = CliRunner().invoke(main, ["encode", str(src)] + [str(a) for a in args])
        assert r.exit_code == 1, (args, r.output)
        assert needle in r.output and "Traceback" not in r.output, (args, r.output)
        assert r.output.splitlines()[-1].startswith("error: ")  # after transformers' bar
    assert not list(tmp_path.glob("*.kvc"))


def test_bad_config_and_tensors(tmp_path, kv_file):
    r = CliRunner().invoke(main, ["encode", str(kv_file), "-o", str(tmp_path / "a.kvc"),
                                  "--config", "nonexistent"])
    assert r.exit_code == 1 and "no config" in r.output
    not_kv = tmp_path / "w.safetensors"
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(not_kv))
    r = CliRunner().invoke(main, ["encode", str(not_kv), "-o", str(tmp_path / "b.kvc")])
    assert r.exit_code == 1 and "layers.0.key" in r.output
    assert not (tmp_path / "b.kvc").exists()


def test_info_reports_backends():
    r = run("info", "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)
    import shutil

    # Every build where nvcc exists compiles the CUDA coder (CMake KVCODEC_CUDA=AUTO).
    assert info["cpu"] is True
    assert info["cuda_compiled"] is (shutil.which("nvcc") is not None)
    assert info["lanes"] == 16 and "default" in info["configs"]
    # The decode path the CPU runs: the best of AVX-512, AVX2 and the scalar reference.
    from kvcodec import _native

    best = next(p for p in ("avx512", "avx2", "scalar") if _native.set_simd_path(p))
    _native.set_simd_path("auto")
    assert info["cpu_decode"] == best
    assert info["cpu_gather"] == _native.simd_gather()
    probe = info["cpu_gather_probe_ms"]
    if best != "scalar":  # the faster way, as timed
        assert info["cpu_gather"] == ("loads" if probe["loads"] < probe["hardware"]
                                      else "hardware")


def test_info_reports_the_forced_scalar_decoder():
    import subprocess
    import sys

    env = dict(os.environ, KVCODEC_SIMD="scalar")
    out = subprocess.run([sys.executable, "-m", "kvcodec_cli.main", "info", "--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1])["cpu_decode"] == "scalar"
    # KVCODEC_SIMD=avx2 caps an AVX-512 CPU at the AVX2 path.
    env["KVCODEC_SIMD"] = "avx2"
    out = subprocess.run([sys.executable, "-m", "kvcodec_cli.main", "info", "--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    from kvcodec import _native

    has_avx2 = _native.set_simd_path("avx2")
    _native.set_simd_path("auto")
    assert json.loads(out.strip().splitlines()[-1])["cpu_decode"] == (
        "avx2" if has_avx2 else "scalar")
    # KVCODEC_GATHER picks how the SIMD paths read their tables.
    for gather in ("loads", "hardware"):
        env["KVCODEC_GATHER"] = gather
        out = subprocess.run([sys.executable, "-m", "kvcodec_cli.main", "info", "--json"],
                             env=env, capture_output=True, text=True, check=True).stdout
        assert json.loads(out.strip().splitlines()[-1])["cpu_gather"] == gather


def test_model_path_prints_the_embedded_model_directory(lm):
    r = CliRunner().invoke(main, ["model-path"])
    assert r.exit_code == 0, r.output
    path = Path(r.output.strip().splitlines()[-1])
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))


def test_error_lines_escape_control_characters(tmp_path, default_kvc):
    """An error message that carries a name with terminal escapes or a newline is still
    one escaped line (the OSError and the KVCodecError paths)."""
    src = tmp_path / "ok.kvc"
    src.write_bytes(default_kvc)
    for args in (["decode", src, "-o", tmp_path / "no\x1b[2Jdir" / "x.safetensors"],
                 ["precompute", "foo://x\x1b[2J\nfake", "--store", tmp_path / "s"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "\x1b" not in r.stderr and "\\x1b[2J" in r.stderr


def test_a_model_folder_transformers_cannot_load_is_one_line(tmp_path):
    """--model naming a folder that is not a model (it raised transformers' ValueError)."""
    src = tmp_path / "doc.txt"
    src.write_text("A short document.")
    empty = tmp_path / "empty"
    empty.mkdir()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    for folder in (empty, odd):
        r = CliRunner().invoke(main, ["encode", str(src), "-o", str(tmp_path / "x.kvc"),
                                      "--model", str(folder)])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
        assert r.stderr.startswith(f"error: cannot load a model from {folder}: ")
        assert r.stderr.count("\n") == 1
    r = CliRunner().invoke(main, ["model-path", str(empty)])  # printed the folder, rc 0
    assert r.exit_code == 1 and "holds no config.json" in r.stderr, r.output


def test_an_output_in_a_missing_folder_is_named_as_given(tmp_path, default_kvc):
    """The error names the output path, not the temp file the atomic write uses."""
    src = tmp_path / "ok.kvc"
    src.write_bytes(default_kvc)
    out = tmp_path / "missing" / "x.safetensors"
    r = CliRunner().invoke(main, ["decode", str(src), "-o", str(out)])
    assert r.exit_code == 1 and r.stderr == f"error: No such file or directory: {out}\n"


def test_tensors_saved_from_any_cache_encode_and_a_contradicting_fingerprint_is_one_line(
        tmp_path, kv_600):
    """save_safetensors took what a KVCache accepts: token ids as a tensor or an array (a
    TypeError in json), layers sharing memory (safetensors' RuntimeError). A fingerprint
    contradicting the tensors was written into the file, and every load refused it."""
    k, v = kv_600.keys[0][:, :, :40], kv_600.values[0][:, :, :40]
    kv = kvcodec.KVCache([k, k], [v, v], token_ids=torch.arange(40), model=kv_600.model)
    src = tmp_path / "shared.safetensors"
    kvio.save_safetensors(kv, src)
    back = kvio.load_safetensors(src)
    assert back.token_ids == list(range(40)) and torch.equal(back.keys[1], k)
    kvio.save_safetensors(kvcodec.KVCache([k], [v], token_ids=np.arange(40, dtype=np.uint32),
                                          model={**kv_600.model, "num_layers": 1}), src)
    out = tmp_path / "a.kvc"
    r = run("encode", src, "-o", out, "--config", "lossless")
    assert r.exit_code == 0, r.output
    assert torch.equal(kvcodec.decode(out).keys[0], k)
    kvio.save_safetensors(kv, src)  # 2 layers of tensors, a fingerprint of 30
    r = run("encode", src, "-o", out, "--config", "lossless")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "num_layers: the tensors have 2, the fingerprint says 30" in r.output


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_text_with_no_end_is_refused_after_64_mib(tmp_path):
    """`kvcodec encode /dev/zero` read until memory ran out (a MemoryError traceback under
    a memory limit); every text a command reads now stops at 64 MiB."""
    from kvcodec.core.paths import MAX_TEXT_BYTES, read_text

    (tmp_path / "s").mkdir()
    for args in (["encode", "/dev/zero", "-o", tmp_path / "z.kvc"],
                 ["generate", "--store", tmp_path / "s", "--text", "/dev/zero", "--prompt", "x"],
                 ["blend-request", "--doc", "/dev/zero", "--prompt", "x"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert r.stderr.splitlines()[-1] == ("error: /dev/zero is over 64 MiB of text, more "
                                             "than a cache can hold (2**24 tokens); split it")
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"x" * MAX_TEXT_BYTES)
    assert len(read_text(doc)) == MAX_TEXT_BYTES
    doc.write_bytes("caf\u00e9 ".encode() + b"\xff")  # undecodable bytes replaced, as before
    assert read_text(doc) == "caf\u00e9 \ufffd"
