"""Content-addressed chunk store: prefix reuse, atomic concurrent writes."""
import threading

import pytest
import torch

import kvcodec
from kvcodec.store import Store, prefill_with_store


@pytest.fixture(scope="module")
def doc_ids(kv_600):
    return kv_600.token_ids


def test_prefix_reuse_matches_full_prefill(tmp_path, lm, kv_600, doc_ids):
    store = Store(tmp_path, lm.fingerprint, config="lossless")
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


def test_different_prefix_or_model_misses(tmp_path, lm, kv_600, doc_ids):
    store = Store(tmp_path, lm.fingerprint)
    store.put(kv_600)
    changed = [doc_ids[0] + 1] + doc_ids[1:]
    assert store.lookup(changed) == []  # the chain breaks at chunk 0
    assert len(store.lookup(doc_ids[:300])) == 1
    other = Store(tmp_path, dict(lm.fingerprint, num_layers=12))
    assert other.lookup(doc_ids) == []


def test_lossy_chunks_keep_absolute_positions(tmp_path, lm, kv_600, doc_ids):
    store = Store(tmp_path, lm.fingerprint)
    store.put(kv_600)
    got = store.load_prefix(doc_ids)
    whole = kvcodec.decode(kvcodec.encode(kv_600))
    # Same quantizer on keys re-rotated at their own positions: close to the whole-file decode.
    for layer in (0, 15, 29):
        err = (got.keys[layer][:, :, 256:512] - kv_600.keys[layer][:, :, 256:512]).abs().mean()
        ref = (whole.keys[layer][:, :, 256:512] - kv_600.keys[layer][:, :, 256:512]).abs().mean()
        assert err < 2 * ref + 1e-3


def test_concurrent_writers_and_readers(tmp_path, lm, kv_600, doc_ids):
    store = Store(tmp_path, lm.fingerprint, config="cachegen")
    errors = []

    def work():
        try:
            Store(tmp_path, lm.fingerprint, config="cachegen").put(kv_600)
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
    src.write_text(texts["gpl3"])
    r = CliRunner().invoke(main, ["precompute", str(src), "--store", str(tmp_path / "s"),
                                  "--max-tokens", "300"])
    assert r.exit_code == 0, r.output
    assert "2 new chunks" in r.output and len(list((tmp_path / "s").rglob("*.kvc"))) == 2
