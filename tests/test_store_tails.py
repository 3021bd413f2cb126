"""A document stored alone ends with a partial chunk; a prompt of that document and a
question holds other tokens in that chunk, so the document's end was never reused.
Beside a partial entry the store keeps a marker, and a lookup that stops at whole
chunks finds the longest stored partial chunk the prompt continues
(:mod:`kvcodec.store.tails`): local and object stores, the HF path, bit for bit, and
a marker whose entry is gone or a listing that fails is a miss."""
import uuid

import pytest
import torch

from kvcodec.store import ChunkStore
from kvcodec.store.tails import FOLDER, RECENT_EXACT

QUESTION = [198, 198, 19842, 42, 1780, 314, 451, 3893, 563, 30]  # any tokens after it


@pytest.fixture
def doc(kv_1536):
    return kv_1536.slice(0, 700)  # two whole 256-token chunks and 188 tokens


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_documents_end_is_found_under_a_longer_prompt(tmp_path, lm, doc, where):
    root = tmp_path / "s" if where == "local" else f"memory://tails-{uuid.uuid4().hex[:8]}"
    store = ChunkStore(root, lm.fingerprint, "default")
    assert store.put(doc) == 3
    ids = doc.token_ids + QUESTION
    found = store.lookup(ids, partial=True)
    assert (len(found), found.tokens) == (3, 700)
    assert store.cached_tokens(ids, partial=True) == 700
    assert found[-1] == store.lookup(doc.token_ids, partial=True)[-1]  # the document's
    # Whole chunks only, as before, without `partial`; a prompt that leaves the
    # document inside its end finds only the whole chunks.
    assert store.lookup(ids).tokens == 512 and len(store.lookup(ids)) == 2
    other = doc.token_ids[:650] + QUESTION
    assert store.lookup(other, partial=True).tokens == 512
    # Decoded from the store, the prompt's first 700 tokens are the document's.
    fp = lm.fingerprint
    shape = (1, fp["num_kv_heads"], len(ids), fp["head_dim"])
    bufs = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(fp["num_layers"])]
    assert store.fill(bufs, ids, found) == 700
    with store.open_entry(found[-1], ids[512:700], 512) as f:
        tail = f.decode()
    for l in range(fp["num_layers"]):
        assert torch.equal(bufs[l][0][:, :, 512:700], tail.keys[l])
        assert torch.equal(bufs[l][1][:, :, 512:700], tail.values[l])
        assert not bufs[l][0][:, :, 700:].any()


def test_the_longest_end_the_prompt_continues_wins(tmp_path, lm, doc):
    """Two documents share their whole chunks and end at 600 and 700 tokens: a prompt
    continuing the longer finds its end, one continuing only the shorter finds that."""
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    assert store.put(doc.slice(0, 600)) == 3 and store.put(doc) == 1
    markers = sorted(p.name for p in (tmp_path / FOLDER).rglob("*") if p.is_file())
    assert markers == ["188", "88"]
    assert store.lookup(doc.token_ids + QUESTION, partial=True).tokens == 700
    assert store.lookup(doc.token_ids[:680] + QUESTION, partial=True).tokens == 600
    assert store.lookup(doc.token_ids[:600], partial=True).tokens == 600  # exactly it
    assert store.lookup(doc.token_ids[:590] + QUESTION, partial=True).tokens == 512


def test_a_put_from_a_token_marks_only_what_it_stores(tmp_path, lm, doc):
    """vLLM's saves store a prompt from its first chunk the store lacks: the partial
    last chunk is marked with it; a put that stores nothing partial marks nothing."""
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    assert store.put(doc.slice(0, 512)) == 2
    assert not (tmp_path / FOLDER).exists()
    assert store.put(doc, from_token=512) == 1
    assert store.lookup(doc.token_ids + QUESTION, partial=True).tokens == 700


def test_an_end_gone_or_a_listing_that_fails_is_a_miss(tmp_path, lm, doc, monkeypatch,
                                                       caplog):
    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    store.put(doc)
    ids = doc.token_ids + QUESTION
    end = store.lookup(ids, partial=True)[-1]
    end.unlink()  # evicted: its marker stays
    assert store.lookup(ids, partial=True).tokens == 512
    store.put(doc)  # stored again
    assert store.lookup(ids, partial=True).tokens == 700

    def fail(*a, **k):
        raise OSError(5, "Input/output error")
        yield  # a generator, as the backend's listing is

    monkeypatch.setattr(store._backend, "list", fail)
    with caplog.at_level("WARNING", logger="kvcodec"):
        assert store.lookup(ids, partial=True).tokens == 512
    assert "cannot list" in caplog.text and end.exists()  # a miss; nothing moved


def test_prefill_with_store_reuses_a_documents_end(tmp_path, lm, doc):
    from kvcodec.integrations.hf import prefill_with_store

    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    store.put(doc)
    ids = doc.token_ids + QUESTION
    _, cached, logits = prefill_with_store(lm, store, ids, recent=1)
    assert cached == 700 and logits.shape[-1] > 0  # the document's every token
    # By default a lossy store's last 64 prompt tokens are computed (RECENT_EXACT), so
    # the document's end (past whole chunks) is still loaded up to there.
    _, cached, _ = prefill_with_store(lm, store, ids)
    assert cached == len(ids) - RECENT_EXACT > 512


def test_reuse_end_computes_a_lossy_stores_last_tokens():
    """How much of a prompt a prefill takes from a store: all but the last token, and of
    a lossy config all but the last RECENT_EXACT; never more than the store holds."""
    from kvcodec import load_config
    from kvcodec.store.tails import is_lossless, reuse_end

    lossy, exact = load_config("default"), load_config("lossless")
    assert is_lossless(exact) and not is_lossless(lossy)
    assert reuse_end(exact, 1000, 1000) == 999
    assert reuse_end(lossy, 1000, 1000) == 1000 - RECENT_EXACT
    assert reuse_end(lossy, 500, 1000) == 500
    assert reuse_end(lossy, 1000, 1000, recent=1) == reuse_end(lossy, 1000, 1000, 0) == 999
    assert reuse_end(lossy, 40, 40) == 0
