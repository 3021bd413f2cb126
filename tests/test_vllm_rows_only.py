"""vLLM's rows-only selective blends (``blend_rows_only``, :mod:`kvcodec.integrations.vllm.subset`)
on each architecture it is enabled for, beyond the embedded Llama-family model that
``test_vllm_blend.py`` checks against transformers: tiny random-initialised Qwen2, Qwen3
and Mistral models (plumbing and exactness, not quality), served by a real CPU engine.
Rows only must pick the same tokens as the path that computes every row after the check
layer and give the same first-token log-probabilities within 1e-4."""
import gc
import os

import pytest
import torch
import transformers
from tiny_models import with_embedded_tokenizer

import kvcodec
from kvcodec.blend import Cached, Text
from kvcodec.store import ChunkStore

pytest.importorskip("vllm")

ARCHS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"use_sliding_window": False}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              {"use_sliding_window": False, "head_dim": 64}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": None}),
}


def _tiny_model_dir(arch: str, root) -> str:
    """A 4-layer random model of ``arch`` saved with the embedded model's tokenizer (its
    vocabulary, so that prompts and anchors tokenize as they do for the real model)."""
    config_cls, model_cls, extra = ARCHS[arch]
    cfg = config_cls(vocab_size=49152, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=4096, initializer_range=0.15,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **extra)
    torch.manual_seed(0)
    return with_embedded_tokenizer(model_cls(cfg).float().eval(), root / arch)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rows_only_gives_every_rows_logits(arch, tmp_path, texts):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from kvcodec.integrations.vllm import blending
    from kvcodec.models import default_anchor, text_ids

    path = _tiny_model_dir(arch, tmp_path)
    lm = kvcodec.load_model(path)
    tok = lm.tokenizer
    store = ChunkStore(tmp_path / "kv", lm.fingerprint, "default")
    ids = text_ids(tok, texts["gpl3"], first=False)
    docs = [ids[i * 300:(i + 1) * 300] for i in range(3)]
    head = text_ids(tok, "You are a helpful assistant.\n\n", first=False)
    with torch.no_grad():
        for d in docs:
            store.put_document(kvcodec.capture_kv(lm, token_ids=d, anchor=default_anchor(tok)))
        store.exact().put(kvcodec.capture_kv(lm, token_ids=head))
    segs = [Text(token_ids=head)] + [Cached(store=store, token_ids=d) for d in docs] + [
        Text(token_ids=text_ids(tok, "\n\nQuestion: Which license?\nAnswer:", first=False))]
    prompt, params = blending.request_for(tok, segs, recompute=0.15, selector="hkvd")
    llm = LLM(model=path, dtype="float32", max_model_len=2048, enforce_eager=True,
              max_num_seqs=1, max_logprobs=-1, kv_transfer_config={
                  "kv_connector": "KVCodecConnector",
                  "kv_connector_module_path": "kvcodec.integrations.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                  "kv_connector_extra_config": {"store": str(tmp_path / "kv"),
                                                "config": "default", "blend_rows_only": True}})
    try:
        worker = get_kv_transfer_group().worker
        got = {}
        for name in ("rows", "every"):
            sub = worker.subset
            worker.subset = sub if name == "rows" else None
            sp = SamplingParams(max_tokens=1, temperature=0, logprobs=-1,
                                extra_args={"kv_transfer_params": params})
            try:
                out = llm.generate([dict(prompt, cache_salt=prompt["cache_salt"] + name)], sp,
                                   use_tqdm=False)[0]
            finally:
                worker.subset = sub
            v = torch.full((49152,), -float("inf"))
            for token, lp in out.outputs[0].logprobs[0].items():
                v[token] = lp.logprob
            got[name] = (v, list(worker.selections.values())[-1])
        assert worker.subset.steps == 1, worker.subset.unusable  # the rows-only step ran
        assert torch.equal(got["rows"][1], got["every"][1]) and len(got["rows"][1])
        a, b = got["rows"][0], got["every"][0]
        assert torch.equal(a.isfinite(), b.isfinite())
        assert float((a - b)[a.isfinite()].abs().max()) < 1e-4
    finally:
        del llm
        gc.collect()  # the engine's teardown now, not in the next one's start
