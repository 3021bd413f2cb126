"""Sliding-window models (Gemma 3's mix of sliding and full layers, Mistral's window on
every layer) served by a real vLLM CPU engine through the connector: tiny random models
with the embedded tokenizer (plumbing and exactness, not quality).

vLLM turns its hybrid KV cache manager off for a connector that does not declare
support for it, so every layer's blocks keep every token: the connector loads and saves
them as for any model, and the entries it saves are the ones transformers reads
(``cache_from_store``: each window's last tokens)."""
import gc
import os

import pytest
import torch
import transformers
from tiny_models import with_embedded_tokenizer

import kvcodec
from kvcodec.integrations import hf
from kvcodec.store import ChunkStore

pytest.importorskip("vllm")

WINDOW = 128
COMMON = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, sliding_window=WINDOW)


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "mistral":
        cfg = transformers.MistralConfig(
            **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return transformers.MistralForCausalLM(cfg)
    cfg = transformers.Gemma3TextConfig(
        **COMMON, head_dim=64,
        layer_types=["sliding_attention"] * 3 + ["full_attention"])
    return transformers.Gemma3ForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_a_sliding_window_model_is_served_and_its_entries_read_by_transformers(arch,
                                                                               tmp_path):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    path = with_embedded_tokenizer(_model(arch).float().eval(), tmp_path / arch)
    store = tmp_path / "kv"
    llm = LLM(model=path, dtype="float32", max_model_len=1024, enforce_eager=True,
              max_num_seqs=1, enable_prefix_caching=False, kv_transfer_config={
                  "kv_connector": "KVCodecConnector",
                  "kv_connector_module_path": "kvcodec.integrations.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                  "kv_connector_extra_config": {"store": str(store), "config": "lossless"}})
    ids = torch.randint(100, 40000, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=16, temperature=0)
    try:
        first = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        conn = get_kv_transfer_group()
        conn.flush()
        before = conn.tokens_loaded
        second = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        # Every prompt token but the last from the store, every layer's, windows far
        # behind: the answer of the prefill (lossless).
        assert conn.tokens_loaded - before == len(ids) - 1
        assert second[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    finally:
        del llm
        gc.collect()  # the engine's teardown now, not in the next one's start
    # What vLLM saved, read by transformers: the continuation's logits are the model's.
    lm = kvcodec.load_model(path)
    cache, n = hf.cache_from_store(lm.model, ChunkStore(store, lm.fingerprint, "lossless"),
                                   ids, partial=True, upto=len(ids) - 1)
    assert n == len(ids) - 1  # the windows end there
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([ids])).logits[0, n:]
        got = lm.model(input_ids=torch.tensor([ids[n:]]), past_key_values=cache,
                       use_cache=True).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
