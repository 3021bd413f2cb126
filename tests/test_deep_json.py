"""JSON nested deeper than Python's parser recurses (~1,000 levels: 2 KB of ``[``),
wherever kvcodec parses JSON it may not have written: a config, a codebook's or shared
tables' header, a file's config section, a KV safetensors file's metadata, a job's
records, a CLI option. Python raises RecursionError there; kvcodec gives the error it
gives any malformed JSON (or skips what is not its own), and the CLI one line."""
import json

import pytest
import zstandard
from click.testing import CliRunner

import kvcodec
from kvcodec.errors import ConfigError, CorruptError, FormatError
from test_hostile import rebuild

DEEP = b"[" * 20000 + b"]" * 20000


def test_the_parser_itself_recurses_past_its_limit():
    """What the cases below guard against (a RecursionError, not a ValueError)."""
    with pytest.raises(RecursionError):
        json.loads(DEEP)


def test_a_config_file_nested_too_deep_is_a_config_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_bytes(DEEP)
    with pytest.raises(ConfigError, match="cannot read config .*deep.json: JSON nested too "
                                          "deeply"):
        kvcodec.load_config(str(path))


def test_a_deep_file_among_the_users_configs_is_not_one_of_ours(tmp_path, monkeypatch, lm):
    """Every encode of "default" looks through the user's config folder: one file there
    nested too deep made each of them fail, for every model."""
    from kvcodec.core.config import calibrated_config_path

    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path))
    (tmp_path / "deep.json").write_bytes(DEEP)
    calibrated_config_path(lm.fingerprint, "default")  # no error: skipped
    assert kvcodec.load_config("default", model=lm.fingerprint)


def test_a_codebook_header_nested_too_deep_is_corrupt():
    import struct
    import zlib

    from kvcodec.core.codebook import MAGIC, Codebook

    body = MAGIC + struct.pack("<II", len(DEEP), zlib.crc32(DEEP)) + DEEP
    data = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(CorruptError, match="book: invalid header: JSON nested too deeply"):
        Codebook.from_bytes(data, "book")


def test_shared_tables_whose_layout_is_nested_too_deep_are_corrupt():
    import struct

    from kvcodec.format.container import crc32
    from kvcodec.format.shared import MAGIC, SharedTables

    body = MAGIC + struct.pack("<I", len(DEEP)) + DEEP + zstandard.ZstdCompressor().compress(b"")
    data = body + struct.pack("<I", crc32(body))
    with pytest.raises(CorruptError, match="tables: invalid layout \\(JSON nested too deeply"):
        SharedTables.from_bytes(data, 1 << 20, "tables")


def test_a_files_config_section_nested_too_deep_is_corrupt_by_its_own_check(default_kvc,
                                                                          monkeypatch):
    """Refused by the header's own check, not by the reader's last-resort guard (which
    names the stray Python error: what the fuzzers' strict mode counts as a finding)."""
    bad = rebuild(default_kvc, replace={"config": zstandard.ZstdCompressor().compress(DEEP)})
    with pytest.raises(CorruptError, match="the config section is not JSON: JSON nested") as e:
        with kvcodec.open(bad) as f:
            f.decode()
    assert "malformed file (" not in str(e.value)


def test_kv_safetensors_whose_metadata_is_nested_too_deep_are_refused(tmp_path, kv_600):
    from safetensors.torch import save_file

    from kvcodec.format.io import load_safetensors

    k, v = kv_600.keys[0], kv_600.values[0]
    path = tmp_path / "deep.safetensors"
    save_file({"layers.0.key": k.contiguous(), "layers.0.value": v.contiguous()}, str(path),
              metadata={"token_ids": DEEP.decode(), "model": "null"})
    with pytest.raises(FormatError, match="metadata is not valid JSON"):
        load_safetensors(path)
    for model in ("[1, 2]", '"x"'):  # valid JSON, not an object: an AttributeError later
        save_file({"layers.0.key": k.contiguous(), "layers.0.value": v.contiguous()},
                  str(path), metadata={"model": model})
        with pytest.raises(FormatError, match="metadata 'model' is not a JSON object"):
            load_safetensors(path)


def test_a_jobs_record_nested_too_deep_is_a_document_not_done(tmp_path, lm):
    from kvcodec.jobs.manifest import Manifest
    from kvcodec.store import ChunkStore
    from kvcodec.store.admin import StoreAdmin

    store = ChunkStore(tmp_path / "s", lm.fingerprint, "default")
    m = Manifest(store, "0" * 32)
    m.put("text", {"id": "a", "entries": []})
    assert m.get("text") == {"id": "a", "entries": []}
    for counts in ({"tokens": "x"}, {"windows": None}, {"chunks": -1}, {"tokens": True}):
        m.put("text", {"id": "a", "entries": [], **counts})  # the report added "x" up
        assert m.get("text") is None
    store.write_object(m._rel("text"), DEEP)
    assert m.get("text") is None  # done again, not a crash of the job
    report = StoreAdmin(tmp_path / "s").rm_documents(["a"])  # the record is skipped
    assert report["documents"] == 0 and report["not_found"] == ["a"], report


def test_a_cli_option_nested_too_deep_is_one_line(tmp_path):
    from kvcodec_cli.main import main

    r = CliRunner().invoke(main, ["store", "stats", str(tmp_path),
                                  "--storage-options", DEEP.decode()])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output[-2000:]
    assert r.output.startswith("error: --storage-options must be a JSON object")
    assert len(r.output.strip().splitlines()) == 1


def test_a_fifo_or_a_huge_file_among_the_users_configs_is_passed_over(tmp_path):
    """The same folder scan opened a FIFO named ``*.json`` (which blocks until a writer
    comes: every ``default`` encode of a model hung) and read a huge file whole on every
    encode. Both are passed over unread; the model's config after them is found."""
    import os
    import subprocess
    import sys

    from kvcodec.core.config import MAX_CONFIG_BYTES, model_key

    fingerprint = {"architecture": "x", "weights_hash": "ab" * 32}
    os.mkfifo(tmp_path / "a.json")
    with open(tmp_path / "b.json", "wb") as fh:  # sparse: its size without the disk
        fh.truncate(64 * MAX_CONFIG_BYTES)
    good = dict(kvcodec.load_config("default"), model_key=model_key(fingerprint))
    (tmp_path / "c.json").write_text(json.dumps(good))
    code = f"""
import resource
from kvcodec.core.config import calibrated_config_path
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(calibrated_config_path({fingerprint!r}, "default"))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, KVCODEC_CONFIG_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    path, grew_mib = out.stdout.split()
    assert path == str(tmp_path / "c.json") and int(grew_mib) < 64
    with pytest.raises(ConfigError, match="larger than any config"):
        kvcodec.load_config(str(tmp_path / "b.json"))
