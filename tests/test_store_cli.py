"""``kvcodec store``: stats, ls, verify, gc and rm on a local store and on S3 (moto)."""
import json
import os
import time
import uuid

import pytest
from click.testing import CliRunner

from kvcodec.core.kvcache import KVCache
from kvcodec.store import ChunkStore
from kvcodec_cli.main import main


def _run(*args):
    r = CliRunner().invoke(main, ["store", *map(str, args)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r


def _doc(kv, i):
    ids = [100 + i] + [int(t) for t in kv.token_ids[1:]]
    return KVCache(kv.keys, kv.values, ids, kv.model)


@pytest.fixture
def store_dir(tmp_path, lm, kv_600):
    """A store of one prefix (3 entries) and one document behind an anchor (1 entry)."""
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    assert store.put(kv_600) == 3
    doc = kv_600.slice(0, 40)
    anchored = KVCache(doc.keys, doc.values, doc.token_ids, doc.model, anchor=[1, 2])
    assert store.put_document(anchored) == 1
    return tmp_path, store


def test_stats_and_ls(store_dir):
    root, store = store_dir
    r = _run("stats", root, "--json")
    assert r.exit_code == 0
    s = json.loads(r.output)
    assert s["kvcodec_store_entries"] == 4 and s["bad"] == 0
    assert s["entry_bytes"] == sum(p.stat().st_size for p in store.entries())
    assert s["kvcodec_store_bytes"] > s["entry_bytes"]  # the shared tables
    [g] = s["by_model_config"]
    assert g["config"] == "default" and g["entries"] == 4 and g["tokens"] == 640
    assert g["model"].startswith("LlamaForCausalLM:")
    assert s["by_kind"]["prefix"]["entries"] == 3 and s["by_kind"]["document"]["entries"] == 1
    text = _run("stats", root, "--quiet").output
    assert "4 entries" in text and "default" in text
    listed = json.loads(_run("ls", root, "--json", "--kind", "document").output)
    assert len(listed) == 1 and listed[0]["tokens"] == 40
    assert len(json.loads(_run("ls", root, "--json", "--config", "nope").output)) == 0
    assert len(_run("ls", root).output.strip().splitlines()) == 4


def test_verify_finds_and_quarantines_damage(store_dir):
    root, store = store_dir
    r = _run("verify", root, "--json")
    report = json.loads(r.output)
    assert r.exit_code == 0 and report["ok"] == 4 and not report["damaged"]
    victim = sorted(store.entries())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit in the payload
    victim.write_bytes(bytes(data))
    r = _run("verify", root, "--json")
    report = json.loads(r.output)
    assert r.exit_code == 1 and len(report["damaged"]) == 1
    assert "checksum" in report["damaged"][0]["error"] and victim.exists()
    r = _run("verify", root, "--quarantine")
    assert r.exit_code == 1 and "damaged:" in r.output
    assert not victim.exists() and victim.with_name(victim.name + ".bad").exists()
    assert _run("verify", root).exit_code == 0
    s = json.loads(_run("stats", root, "--json").output)
    assert s["bad"] == 1 and s["kvcodec_store_entries"] == 3


def test_verify_checks_a_first_chunks_key(store_dir, kv_600):
    """A prefix's first entry copied under another first chunk's key holds other tokens
    than its name says: verify proves it from the name alone."""
    root, store = store_dir
    src = store.path(store.keys(kv_600.token_ids)[0])
    wrong = store.path(store.keys([7] * 256)[0])
    wrong.parent.mkdir(exist_ok=True)
    wrong.write_bytes(src.read_bytes())
    report = json.loads(_run("verify", root, "--json").output)
    assert report["entries"] == 5 and not report["damaged"]  # a salt may explain it
    assert report["keys_unverified"] == 1
    report = json.loads(_run("verify", root, "--json", "--unsalted").output)
    assert [d["name"] for d in report["damaged"]] == [store._backend.rel(wrong)]
    salted = ChunkStore(root, store.fingerprint, "default", salt="t1")
    salted.put(kv_600.slice(0, 256))
    report = json.loads(_run("verify", root, "--json", "--unsalted", "--salt", "t1").output)
    assert [d["name"] for d in report["damaged"]] == [store._backend.rel(wrong)]


def test_verify_knows_a_stores_lossless_view(store_dir, kv_600):
    """Entries of the store's exact view (a vLLM blend's system line: the lossless
    config's keys beside the store's own) verify intact, keys included, and are listed
    under their config; nothing is moved."""
    root, store = store_dir
    head = kv_600.slice(0, 20)
    assert store.exact().put(head) == 1
    report = json.loads(_run("verify", root, "--json", "--unsalted").output)
    assert report["entries"] == 5 and report["ok"] == 5 and not report["damaged"]
    assert report["keys_unverified"] == 0
    assert "lossless" in _run("stats", root).output
    assert store.exact().cached_tokens(head.token_ids, partial=True) == 20


def test_gc_and_rm(store_dir):
    root, store = store_dir
    bad = root / "ab" / ("c" * 62 + ".kvc.bad")
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"x" * 100)
    old = time.time() - 30 * 86400
    os.utime(bad, (old, old))
    tmp = root / "ab" / ".x.kvc.123.tmp"
    tmp.write_bytes(b"y")
    os.utime(tmp, (old, old))
    r = json.loads(_run("gc", root, "--json", "--dry-run").output)
    assert r["bad_removed"] == 1 and bad.exists() and tmp.exists()
    r = json.loads(_run("gc", root, "--json").output)
    assert r["bad_removed"] == 1 and r["temp_files"] == 1 and not bad.exists()
    assert not tmp.exists()
    total = sum(p.stat().st_size for p in store.entries())
    r = json.loads(_run("gc", root, "--json", "--max-bytes", total // 2).output)
    assert r["eviction"]["removed"] >= 1
    assert json.loads(_run("stats", root, "--json").output)["kvcodec_store_bytes"] <= total // 2
    assert _run("rm", root).exit_code == 2  # no filter: refused
    r = json.loads(_run("rm", root, "--kind", "prefix", "--json").output)
    left = json.loads(_run("ls", root, "--json").output)
    assert all(i["kind"] != "prefix" for i in left) and r["removed"] >= 0
    r = json.loads(_run("rm", root, "--all", "--json").output)
    assert json.loads(_run("stats", root, "--json").output)["kvcodec_store_entries"] == 0


def test_one_line_errors(tmp_path):
    for args in (["stats", "nope://x"], ["gc", tmp_path / "missing", "--max-bytes", "1K"], ["gc", tmp_path, "--max-bytes", "lots"],
                 ["ls", tmp_path, "--older-than", "soon"],
                 ["stats", tmp_path, "--storage-options", "[1]"]):
        r = _run(*args)
        assert r.exit_code != 0
        assert "Traceback" not in r.output
        assert len([ln for ln in r.output.splitlines() if ln.startswith(("error", "Error"))]) == 1
    assert not (tmp_path / "missing").exists()


def test_store_commands_on_s3(s3_endpoint, lm, kv_600):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    url = f"s3://kvtest/{uuid.uuid4().hex[:8]}"
    store = ChunkStore(url, lm.fingerprint, "default", storage_options=options)
    assert store.put(kv_600) == 3
    opts = json.dumps(options)
    s = json.loads(_run("stats", url, "--json", "--storage-options", opts).output)
    assert s["kvcodec_store_entries"] == 3 and s["by_model_config"][0]["config"] == "default"
    v = json.loads(_run("verify", url, "--json", "--storage-options", opts).output)
    assert v["ok"] == 3
    r = json.loads(_run("gc", url, "--json", "--storage-options", opts, "--max-bytes",
                        s["kvcodec_store_bytes"] - 1).output)
    assert r["eviction"]["removed"] >= 1
    r = json.loads(_run("rm", url, "--all", "--json", "--storage-options", opts).output)
    assert json.loads(_run("stats", url, "--json", "--storage-options",
                           opts).output)["kvcodec_store_entries"] == 0


def _rebuild(data: bytes, replace=None, **header) -> bytes:
    """``data`` (a .kvc file) with sections replaced and header fields changed, every
    checksum recomputed: a crafted file that only deeper checks can refuse."""
    from kvcodec.format import container as c
    from kvcodec.store.verify import head

    version, h, start = head(data, "x")
    sections = [(s["name"], data[start + s["offset"]:start + s["offset"] + s["length"]],
                 s["crc32"] is not None) for s in h["sections"]]
    sections = [(n, (replace or {}).get(n, d), ck) for n, d, ck in sections]
    h = {k: v for k, v in h.items() if k not in ("sections", "data_length")}
    h.update(header)
    return c.build(h, sections, version)


def test_verify_refuses_crafted_files(store_dir):
    """Garbage, empty, truncated and crafted entries (a zstd bomb where the token ids go,
    an impossible token count) are reported as damaged, one line each; the intact
    entries stay intact and nothing crashes."""
    import zstandard

    root, store = store_dir
    good = sorted(store.entries())
    src = good[0].read_bytes()
    names = iter(f"{i:02x}/" + "e" * 62 + ".kvc" for i in range(16))
    crafted = {
        "garbage": os.urandom(5000),
        "empty": b"",
        "truncated": src[:len(src) // 2],
        "bomb": _rebuild(src, {"tokens": zstandard.ZstdCompressor().compress(
            b"\0" * (64 << 20))}),
        "tokens": _rebuild(src, num_tokens=1 << 40),
        "tables": _rebuild(src, shared_tables="0" * 40),
    }
    where = {}
    for what, data in crafted.items():
        rel = next(names)
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
        where[rel] = what
    r = _run("verify", root, "--json")
    report = json.loads(r.output)
    assert r.exit_code == 1 and report["ok"] == len(good)
    assert {d["name"] for d in report["damaged"]} == set(where)
    assert all(d["error"].split(":")[0].endswith("Error") for d in report["damaged"])


def test_verify_leaves_newer_format_entries(store_dir):
    """An entry of a format newer than this kvcodec reads is not damage (the store's
    rule): reported, never moved aside, even with --quarantine."""
    import struct

    root, store = store_dir
    newer = sorted(store.entries())[0]
    data = bytearray(newer.read_bytes())
    struct.pack_into("<I", data, 8, 99)  # the version field, after the 8-byte magic
    newer.write_bytes(bytes(data))
    r = _run("verify", root, "--json", "--quarantine")
    report = json.loads(r.output)
    assert r.exit_code == 0 and report["newer_version"] == 1 and not report["damaged"]
    assert report["ok"] == 3 and newer.exists()


def test_verify_maps_large_entries(store_dir, monkeypatch):
    """Entries over the read-whole size are checked through a mapping: same verdicts."""
    from kvcodec.store import verify

    root, store = store_dir
    monkeypatch.setattr(verify, "LOCAL_READ_BYTES", 0)
    assert json.loads(_run("verify", root, "--json").output)["ok"] == 4
    victim = sorted(store.entries())[1]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 1
    victim.write_bytes(bytes(data))
    report = json.loads(_run("verify", root, "--json").output)
    assert [d["name"] for d in report["damaged"]] == [store._backend.rel(victim)]
