"""Content-addressed chunk store: prefix reuse, atomic concurrent writes."""
import threading

import pytest
import torch

import kvcodec
from kvcodec.integrations.hf import cache_from_store, prefill_with_store
from kvcodec.store import ChunkStore


@pytest.fixture(scope="module")
def doc_ids(kv_600):
    return kv_600.token_ids


def test_prefix_reuse_matches_full_prefill(tmp_path, lm, kv_600, doc_ids):
    store = ChunkStore(tmp_path, lm.fingerprint, config="lossless")
    assert store.put(kv_600) == 3 and store.put(kv_600) == 0
    question = lm.tokenizer(" Who wrote this?", add_special_tokens=False)["input_ids"]
    ids = doc_ids[:512] + question
    assert len(store.lookup(ids)) == 2
    cache, cached, logits = prefill_with_store(lm, store, ids)
    assert cached == 512 and cache.get_seq_length() == len(ids)
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert int(logits.argmax()) == int(ref.argmax())
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)


def test_a_prompt_sent_again_loads_all_but_its_last_token(tmp_path, lm, kv_600, doc_ids):
    """The whole prompt is stored (its partial last chunk too): prefill_with_store loads
    every token but the last from it, as vLLM does, and computes only that one (it used
    to look up all but the last token, which keys no stored chunk past the whole ones:
    88 tokens recomputed here)."""
    store = ChunkStore(tmp_path, lm.fingerprint, config="lossless")
    store.put(kv_600)
    cache, cached, logits = prefill_with_store(lm, store, doc_ids)
    assert cached == len(doc_ids) - 1 and cache.get_seq_length() == len(doc_ids)
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([doc_ids])).logits[0, -1]
    torch.testing.assert_close(logits, ref, atol=2e-3, rtol=1e-3)
    # Asked for fewer tokens than the entries hold, a lookup takes only those, and the
    # entry wholly past them is not read (damaged, it would be moved aside).
    last = store.lookup(doc_ids, partial=True)[-1]
    data = bytearray(last.read_bytes())
    data[-100] ^= 0xFF
    last.write_bytes(bytes(data))
    _, n = cache_from_store(lm.model, store, doc_ids, partial=True, upto=300)
    assert n == 300 and last.exists()


def test_different_prefix_or_model_misses(tmp_path, lm, kv_600, doc_ids):
    store = ChunkStore(tmp_path, lm.fingerprint)
    store.put(kv_600)
    changed = [doc_ids[0] + 1] + doc_ids[1:]
    assert store.lookup(changed) == []  # the chain breaks at chunk 0
    assert len(store.lookup(doc_ids[:300])) == 1
    other = ChunkStore(tmp_path, dict(lm.fingerprint, num_layers=12))
    assert other.lookup(doc_ids) == []


def test_lossy_chunks_keep_absolute_positions(tmp_path, lm, kv_600, doc_ids):
    store = ChunkStore(tmp_path, lm.fingerprint)
    store.put(kv_600)
    got = store.load_prefix(doc_ids)
    whole = kvcodec.decode(kvcodec.encode(kv_600))
    # Same quantizer on keys re-rotated at their own positions: close to the whole-file decode.
    for layer in (0, 15, 29):
        err = (got.keys[layer][:, :, 256:512] - kv_600.keys[layer][:, :, 256:512]).abs().mean()
        ref = (whole.keys[layer][:, :, 256:512] - kv_600.keys[layer][:, :, 256:512]).abs().mean()
        assert err < 2 * ref + 1e-3


def test_concurrent_writers_and_readers(tmp_path, lm, kv_600, doc_ids):
    store = ChunkStore(tmp_path, lm.fingerprint, config="cachegen")
    errors = []

    def work():
        try:
            ChunkStore(tmp_path, lm.fingerprint, config="cachegen").put(kv_600)
            store.load_prefix(doc_ids)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not list(tmp_path.rglob("*.tmp"))
    assert store.load_prefix(doc_ids).num_tokens == 512


def test_precompute_cli(tmp_path, texts):
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    src = tmp_path / "a.txt"
    src.write_text(texts["gpl3"][:2400])  # ~520 tokens: windows of 256 under --max-tokens 300
    r = CliRunner().invoke(main, ["precompute", str(src), "--store", str(tmp_path / "s"),
                                  "--max-tokens", "300", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "chunks: 3 new" in r.output and len(list((tmp_path / "s").rglob("*.kvc"))) == 3


def test_load_cache_fills_the_model_cache_in_place(tmp_path, lm, kv_600, doc_ids):
    store = ChunkStore(tmp_path, lm.fingerprint, config="lossless")
    store.put(kv_600)
    cache, n = cache_from_store(lm.model, store, doc_ids[:550])
    assert n == 512 and cache.get_seq_length() == 512
    for layer in (0, 29):
        torch.testing.assert_close(cache.layers[layer].keys, kv_600.keys[layer][:, :, :512])
        torch.testing.assert_close(cache.layers[layer].values, kv_600.values[layer][:, :, :512])
    # The uncached rest is appended into the same buffers, not concatenated.
    ptr = cache.layers[5].keys.data_ptr()
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([doc_ids[512:550]]), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 550 and cache.layers[5].keys.data_ptr() == ptr
    empty, n0 = cache_from_store(lm.model, store, [doc_ids[0] + 1] + doc_ids[1:300])
    assert n0 == 0 and empty.get_seq_length() == 0
    with pytest.raises(kvcodec.ModelMismatchError):
        cache_from_store(lm.model, ChunkStore(tmp_path, dict(lm.fingerprint, num_layers=12)), doc_ids)


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_chunk"])
def test_damaged_entry_ends_the_prefix_and_is_rewritten(tmp_path, lm, kv_600, doc_ids,
                                                        caplog, damage):
    store = ChunkStore(tmp_path, lm.fingerprint, config="default")
    store.put(kv_600)
    first, second = store.lookup(doc_ids)
    data = bytearray(second.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        second.write_bytes(bytes(data))
    elif damage == "truncate":
        second.write_bytes(bytes(data[: len(data) - 100]))
    else:  # a valid file in the wrong place: its tokens are not the key's
        second.write_bytes(first.read_bytes())
    with caplog.at_level("WARNING", logger="kvcodec"):
        cache, n = cache_from_store(lm.model, store, doc_ids)
    assert n == 256 and cache.get_seq_length() == 256
    assert "moved it to" in caplog.text and not second.exists()
    assert second.with_name(second.name + ".bad").exists()
    # The damaged entry no longer counts as cached, so the next put writes it again.
    assert len(store.lookup(doc_ids)) == 1 and store.put(kv_600) == 1
    assert cache_from_store(lm.model, store, doc_ids)[1] == 512
    # prefill_with_store recomputes past the damage and still answers like a full prefill.
    second.write_bytes(bytes(data[:10]))
    _, cached, logits = prefill_with_store(lm, store, doc_ids[:520])
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([doc_ids[:520]])).logits[0, -1]
    assert cached == 256 and int(logits.argmax()) == int(ref.argmax())


def test_generate_from_store_cli(tmp_path, texts):
    from click.testing import CliRunner

    from kvcodec_cli.main import main

    src = tmp_path / "a.txt"
    src.write_text(texts["gpl3"][:2500])
    store = str(tmp_path / "s")
    r = CliRunner().invoke(main, ["precompute", str(src), "--store", store,
                                  "--config", "lossless", "--config", "default"])
    assert r.exit_code == 0, r.output
    n_chunks = len(list((tmp_path / "s").rglob("*.kvc")))
    assert n_chunks >= 4 and n_chunks % 2 == 0  # every chunk at both levels
    common = ["generate", "--store", store, "--text", str(src), "--prompt",
              "\n\nQuestion: What is this text?\nAnswer:", "--max-new-tokens", "5", "--compare"]
    r = CliRunner().invoke(main, common + ["--config", "lossless"])
    assert r.exit_code == 0, r.output
    assert "document tokens cached" in r.output and "identical for the first 5" in r.output
    r = CliRunner().invoke(main, common + ["--config", "lossless", "--config", "default",
                                           "--bandwidth", "1gbps", "--budget", "10"])
    assert r.exit_code == 0, r.output
    assert "chunks lossless" in r.output and "agreement with full prefill" in r.output
    for bad, needle in [(["--config", "lossless", "--config", "default"], "need --bandwidth"),
                        (["--bandwidth", "fast", "--budget", "1"], "bandwidth 'fast'"),
                        (["--bandwidth", "1gbps"], "go together")]:
        r = CliRunner().invoke(main, common + bad)
        assert r.exit_code != 0 and needle in r.output, r.output
    r = CliRunner().invoke(main, ["generate", "--prompt", "x"])
    assert r.exit_code != 0 and "exactly one of" in r.output


def test_chunk_keys_follow_the_documented_chain():
    """Keys are the module docstring's chain, byte for byte (a store written by an
    earlier kvcodec stays readable): ``h_i = sha256(h_{i-1} || len || ids as u32)``,
    the last chunk partial, and ids out of u32 range refused."""
    import hashlib

    from kvcodec.store.keys import chain

    seed, ids = hashlib.sha256(b"seed").digest(), [0, 1, 2 ** 32 - 1, 70000, 5]
    h, want = seed, []
    for part in ([0, 1], [2 ** 32 - 1, 70000], [5]):
        h = hashlib.sha256(h + len(part).to_bytes(4, "little") + b"".join(
            t.to_bytes(4, "little") for t in part)).digest()
        want.append(h.hex())
    assert chain(seed, ids, 2) == want
    assert chain(seed, torch.tensor(ids[:2]), 2) == want[:1]
    # Ids that are not u32 integers: int.to_bytes' OverflowError, int()'s ValueError, a
    # TypeError for None, and 1.5 hashed as 1; now each a ShapeError.
    for bad in ([1, -1], [2 ** 32], ["a"], [1.5], None):
        with pytest.raises(kvcodec.ShapeError, match="token ids must be"):
            chain(seed, bad, 2)
        if bad is not None:  # no anchor
            with pytest.raises(kvcodec.ShapeError, match="token ids must be"):
                chain(seed, [1], 2, anchor=bad)


def test_lookups_refuse_token_ids_that_are_not_u32_integers(tmp_path, lm, kv_600, doc_ids):
    store = ChunkStore(tmp_path, lm.fingerprint, config="lossless")
    store.put(kv_600.slice(0, 256))
    for bad in ([-1] * 256, "abc", [1.5] * 256, None):
        for call in (store.lookup, store.load_prefix,
                     lambda ids: cache_from_store(lm.model, store, ids)):
            with pytest.raises(kvcodec.ShapeError, match="token ids must be"):
                call(bad)
    assert len(store.lookup(torch.tensor(doc_ids[:300]))) == 1


@pytest.mark.parametrize("root,prefix", [("s", ""), ("s", "chunks"), ("./s/", "chunks/0a/"),
                                         ("s/../s", "chunks/0a"), (".", "s")])
def test_a_local_listing_names_keys_the_same_whatever_form_the_root_takes(
        tmp_path, monkeypatch, root, prefix):
    """list() and scan() cut each key from the walked path's string (not pathlib, ~20 us
    a file): relative roots, ``./``, ``..`` and trailing slashes give the same keys."""
    from kvcodec.store.backends import LocalBackend

    monkeypatch.chdir(tmp_path)
    files = {"chunks/0a/x.kvc": 3, "chunks/0a/1b/y.kvc": 5, "chunks/z.kvc": 7, "tables/t": 1,
             "chunks/0a/.w.tmp": 2}
    for rel, size in files.items():
        (tmp_path / "s" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "s" / rel).write_bytes(b"x" * size)
    b = LocalBackend(root)
    base = "s/" if root == "." else ""
    want = {rel: size for rel, size in files.items() if not rel.endswith(".tmp")
            and (base + rel).startswith(prefix.rstrip("/"))}
    assert sorted(b.list(prefix)) == sorted(base + rel for rel in want)
    assert {rel: size for rel, size, _ in b.scan(prefix)} == {base + r: s for r, s in want.items()}
    assert want
