"""GGUF files as models: load_model("x.gguf"), --model x.gguf, kvcodec model-path x.gguf."""
import pytest
from click.testing import CliRunner

import kvcodec
from kvcodec.errors import BackendError
from kvcodec.models.loading import _gguf_path, resolve_model_path
from kvcodec_cli.main import main


def _copy_gguf(src, dst, architecture=None, **fields):
    """``src`` rewritten to ``dst`` with some metadata fields changed."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src))
    arch = architecture or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    new = {k: MetadataDetails(gguf.GGUFValueType.BOOL, v) for k, v in fields.items()}
    copy_with_new_metadata(reader, writer, new, [])


def test_the_embedded_gguf_by_path_is_the_embedded_model(lm):
    path = _gguf_path()
    assert resolve_model_path(str(path)) == resolve_model_path(None)  # one conversion
    assert kvcodec.load_model(str(path)).fingerprint == lm.fingerprint
    r = CliRunner().invoke(main, ["model-path", str(path)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(resolve_model_path(None))


def test_the_tokenizer_starts_sequences_as_the_gguf_says(tmp_path, lm, monkeypatch):
    """transformers' GGUF conversion drops ``tokenizer.ggml.add_bos_token`` (a Gemma 3
    GGUF converted by it adds no BOS; its perplexity doubles without); kvcodec's keeps it."""
    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))  # converted here, not in ~
    src = tmp_path / "bos.gguf"
    _copy_gguf(_gguf_path(), src, **{"tokenizer.ggml.add_bos_token": True})
    bos = kvcodec.load_model(str(src))
    assert kvcodec.models.special_prefix(bos.tokenizer) == [bos.tokenizer.bos_token_id]
    assert kvcodec.models.special_prefix(lm.tokenizer) == []
    assert bos.fingerprint == lm.fingerprint  # same weights and vocabulary
    assert resolve_model_path(str(src)).name.startswith("bos-")  # its own conversion


def test_an_unsupported_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), arch="rwkv6")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(BackendError, match="architecture 'rwkv6'.*it loads: .*gemma3"):
        kvcodec.load_model(str(path))
    r = CliRunner().invoke(main, ["model-path", str(path)])
    assert r.exit_code == 1 and r.output.startswith("error: rwkv.gguf: transformers cannot")
    assert "Traceback" not in r.output


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(BackendError, match="not a GGUF file"):
        kvcodec.load_model(str(bad))
    r = CliRunner().invoke(main, ["eval", "--model", str(bad), "--text", str(bad)])
    assert r.exit_code == 1 and "not a GGUF file" in r.output and "Traceback" not in r.output
    with pytest.raises(BackendError, match="neither the embedded default"):
        kvcodec.load_model(str(tmp_path / "missing.gguf"))


def test_a_conversion_parses_the_header_once_and_writes_what_transformers_does(tmp_path,
                                                                                monkeypatch):
    """transformers parses a GGUF's header for the config, the weights and the tokenizer
    (~4 s each for the embedded model); convert_gguf has it parse once, and writes the
    very files transformers' own three parses give."""
    import filecmp

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcodec.models.loading import convert_gguf
    from test_gguf_hostile import _tiny_gguf

    path = _tiny_gguf(tmp_path / "tiny.gguf")
    real, parses = gguf.GGUFReader, []

    def counting(*args, **kwargs):
        parses.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    monkeypatch.setenv("KVCODEC_CACHE", str(tmp_path / "cache"))
    ours = convert_gguf(path)
    assert len(parses) == 1, parses
    assert gguf.GGUFReader is counting  # put back
    plain = tmp_path / "plain"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # as convert_gguf does: the weights are plain float32
    del model.config.quantization_config
    model.save_pretrained(plain)
    AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name).save_pretrained(plain)
    assert len(parses) == 4  # transformers alone: three
    names = sorted(p.name for p in plain.iterdir())
    assert names == sorted(p.name for p in ours.iterdir())
    assert filecmp.cmpfiles(ours, plain, names, shallow=False)[0] == names
