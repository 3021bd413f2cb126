"""One rule for turning text into token ids (kvcodec.models.tokens), at every front door.

``bos_lm`` is the embedded model with a tokenizer that adds BOS (as Llama 3, Gemma,
Mistral and Phi-3 tokenizers do); the embedded tokenizer adds none.
"""
import json

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.errors import ConfigError
from kvcodec.models import (chat_suffix, chat_text, document_ids, prompt_ids, special_prefix,
                            text_ids)
from kvcodec_cli.main import main

DOC = "The quick brown fox jumps over the lazy dog. " * 40


def test_special_prefix_is_what_the_tokenizer_starts_with(lm, bos_lm):
    assert special_prefix(lm.tokenizer) == []
    bos = bos_lm.tokenizer.bos_token_id
    assert special_prefix(bos_lm.tokenizer) == [bos]
    plain = bos_lm.tokenizer(DOC, add_special_tokens=False)["input_ids"]
    # The start of a prompt is what the tokenizer itself makes of it (what vLLM sends).
    assert text_ids(bos_lm.tokenizer, DOC) == bos_lm.tokenizer(DOC)["input_ids"] == [bos] + plain
    assert text_ids(bos_lm.tokenizer, DOC, first=False) == plain
    assert text_ids(lm.tokenizer, DOC) == plain


def test_bos_is_never_added_twice(bos_lm):
    tok = bos_lm.tokenizer
    text = tok.bos_token + DOC  # e.g. a rendered chat template that writes its BOS
    ids = text_ids(tok, text)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_vllm_tokenizes_a_text_prompt_as_precompute_does(bos_model_dir, bos_lm):
    """vLLM turns a text prompt into ids with its own tokenizer wrapper (special tokens
    added): the same ids `kvcodec precompute` stores the document under."""
    from kvcodec.jobs import JobSpec
    from kvcodec.jobs.corpus import Document
    from kvcodec.jobs.engine import Engine
    from vllm.tokenizers.registry import get_tokenizer

    vtok = get_tokenizer(str(bos_model_dir))
    engine = Engine(bos_lm, JobSpec(configs=("lossless",)), "memory://kvcodec-tokens-test")
    (window,) = engine._plan(Document("d", DOC, "d.txt"), lambda r: None)
    assert window.ids == vtok.encode(DOC) == text_ids(bos_lm.tokenizer, DOC)
    assert window.ids[0] == bos_lm.tokenizer.bos_token_id


def test_capture_starts_a_prompt_and_anchored_documents_carry_no_bos(bos_lm):
    bos = bos_lm.tokenizer.bos_token_id
    kv = kvcodec.capture_kv(bos_lm, DOC, importance_window=0)
    assert kv.token_ids[0] == bos and kv.token_ids[1] != bos
    anchor = kvcodec.models.default_anchor(bos_lm.tokenizer)
    assert anchor == [bos]
    doc = kvcodec.capture_kv(bos_lm, DOC, anchor=anchor, importance_window=0)
    assert doc.token_ids == kv.token_ids[1:]  # the anchor stands where the BOS was
    # ... and its K/V are the prompt's, row for row (the BOS was the anchor).
    torch.testing.assert_close(doc.keys[3], kv.keys[3][:, :, 1:], rtol=1e-4, atol=1e-4)


def test_prefix_windows_each_start_with_bos():
    from kvcodec.jobs.plan import windows

    ids = [7] + list(range(100, 120))
    parts = windows(ids, 8, [7])
    assert [p[0] for p in parts] == [7, 7, 7]
    assert sum(len(p) - 1 for p in parts) == 20 and all(len(p) <= 8 for p in parts)
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_blend_starts_the_prompt_with_bos_and_documents_without(bos_lm):
    from kvcodec.blend import Cached, Text, blend

    tok = bos_lm.tokenizer
    bos = tok.bos_token_id
    anchor = kvcodec.models.default_anchor(tok)
    doc = kvcodec.capture_kv(bos_lm, DOC[:400], anchor=anchor, importance_window=0)
    full = blend(bos_lm, [Cached(doc), Text(" Question: what jumps?")], recompute=1.0)
    assert full.token_ids[0] == bos and full.token_ids.count(bos) == 1
    assert full.token_ids[1:1 + doc.num_tokens] == doc.token_ids
    # recompute=1 is a prefill of exactly those ids.
    with torch.no_grad():
        ref = bos_lm.model(input_ids=torch.tensor([full.token_ids])).logits[0, -1]
    torch.testing.assert_close(full.logits.float(), ref.float(), rtol=1e-3, atol=1e-3)
    text_first = blend(bos_lm, [Text("Context:"), Cached(doc)], recompute=0.0)
    assert text_first.token_ids[0] == bos and text_first.token_ids.count(bos) == 1


def test_chat_text_is_the_shared_prefix_of_chat_prompts(lm):
    tok = lm.tokenizer
    prefix = chat_text(tok, DOC, system="Answer briefly.")
    full = tok.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": DOC + "\n\nWhat jumps?"}],
        tokenize=False, add_generation_prompt=True)
    assert full.startswith(prefix) and prefix.endswith(DOC)
    assert prefix + chat_suffix(tok, "\n\nWhat jumps?") == full
    ids = document_ids(tok, DOC, chat=True, system="Answer briefly.")
    whole = text_ids(tok, full)
    # Tokens can merge across the document's end (" " + "\n\n"); everything before it
    # is shared, which is what a store of whole chunks needs.
    assert whole[:len(ids) - 1] == ids[:-1]
    assert len(prompt_ids(tok, "\n\nWhat jumps?", chat=True)) >= len(whole) - len(ids)
    with pytest.raises(ConfigError, match="chat template"):
        document_ids(tok, DOC, chat=True, independent=True)


def test_a_tokenizer_without_a_chat_template_is_refused(lm):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        chat_text(NoTemplate(), DOC)


def test_precompute_chat_and_generate_chat_share_the_store(lm, tmp_path):
    """A document stored with --chat is found again by a chat prompt about it."""
    from kvcodec.store import ChunkStore

    doc = tmp_path / "doc.txt"
    doc.write_text(DOC * 3)
    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["precompute", "--store", str(store), "--chat",
                                  "--system", "Be brief.", "--config", "lossless", str(doc)])
    assert r.exit_code == 0, r.output
    ids = document_ids(lm.tokenizer, DOC * 3, chat=True, system="Be brief.")
    chunks = ChunkStore(store, lm.fingerprint, "lossless")
    assert chunks.cached_tokens(ids) == len(ids) // 256 * 256 > 0
    r = CliRunner().invoke(main, ["generate", "--store", str(store), "--text", str(doc),
                                  "--chat", "--system", "Be brief.", "--config", "lossless",
                                  "--prompt", "What jumps?", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    # every token, the document's partial last chunk included (it was prefilled)
    assert f"{len(ids)} of {len(ids)} document tokens cached" in r.output and len(ids) % 256
    r = CliRunner().invoke(main, ["generate", "--store", str(store), "--text", str(doc),
                                  "--system", "x", "--prompt", "q"])
    assert r.exit_code != 0 and "--system goes with --chat" in r.output


def test_eval_and_calibrate_score_the_text_as_a_prompt_starts(bos_model_dir, bos_lm, texts,
                                                               tmp_path, monkeypatch):
    """`kvcodec eval` and `calibrate` on a BOS model prefill BOS + text: the text as the
    model sees it in use."""
    from kvcodec.quality import calibrate, evaluate

    seen = []
    monkeypatch.setattr(evaluate, "evaluate", lambda lm, ids, *a, **k: seen.append(ids) or [])

    class Stop(Exception):
        pass

    def calibrator(lm, ids, *a, **k):
        seen.extend(ids)
        raise Stop

    monkeypatch.setattr(calibrate, "Calibrator", calibrator)
    text = tmp_path / "t.txt"
    text.write_text(texts["gpl3"][:3000])
    r = CliRunner().invoke(main, ["eval", "--model", str(bos_model_dir), "--text", str(text),
                                  "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["calibrate", "--model", str(bos_model_dir), "--text",
                                  str(text), "-o", str(tmp_path / "c.json")])
    assert isinstance(r.exception, Stop)
    expected = text_ids(bos_lm.tokenizer, texts["gpl3"][:3000])
    assert seen == [expected, expected] and expected[0] == bos_lm.tokenizer.bos_token_id


def test_eviction_replays_the_text_without_its_bos(bos_lm, monkeypatch):
    """`replay` asks the model to repeat the text: the BOS the prompt starts with is not
    part of the text, and it is not repeated in the middle of the replay."""
    import importlib

    from kvcodec import evict

    press_mod = importlib.import_module("kvcodec.evict.presses")

    fed = []
    forward = bos_lm.model.forward

    def spy(*args, input_ids=None, **kwargs):
        fed.append(input_ids[0].tolist())
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(bos_lm.model, "forward", spy)
    ev = evict.capture(bos_lm, DOC, "replay", 0.5, importance_window=0)
    bos = bos_lm.tokenizer.bos_token_id
    assert ev.token_ids[0] == bos
    replay = [t for ids in fed for t in ids][len(ev.token_ids):]  # after the prefill
    prompt = kvcodec.models.text_ids(bos_lm.tokenizer, press_mod.REPLAY_PROMPT, first=False)
    assert replay == prompt + ev.token_ids[1:]
