"""Tiny random-initialised decoder models, one per family, built from config classes.

Nothing is downloaded: each factory builds a transformers config in code, seeds torch
and instantiates the model with random weights. Used to check that the codec handles
every family's cache layout and RoPE flavour (scaled RoPE, partial rotary, q/k norms,
sliding-window layers, per-layer-type RoPE).

    from tiny_models import TINY, token_ids      # tests/ is on sys.path under pytest
    model = TINY["gemma2"]()
    ids = token_ids(300, model.config.vocab_size, seed=0)

All models: float32, eval(), attn_implementation="eager" (the one backend every family
implements fully on CPU, including Gemma's attention-logit soft-capping, and whose
numerics do not depend on which kernel is picked; it also returns attention weights
for importance capture). Sizes: 2-4 layers (Gemma3: 6, to keep its 5 sliding : 1 full
pattern), hidden 128 (GPT-NeoX 256), head_dim 32 or 64, 4 query heads, 2 KV heads (GPT-NeoX:
4, no GQA), vocab 512, max_position_embeddings 2048. All build in a few seconds on CPU.

`initializer_range` is raised from 0.02 to INIT_STD so that logits are far from constant
(std ~1.7) and attention is peaked (mean max prob ~0.3-0.6 over 300 keys) instead of
uniform; see `logit_std` / `attention_peak`. Families with q/k norms (Qwen3, OLMo2,
Gemma3) bound q.k whatever the init, so their norm weights get a gain instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers

VOCAB = 512
MAX_POS = 2048
INIT_STD = 0.15
QK_NORM_GAIN = 3.0  # q/k-norm models: scale q.k by this (see _sharpen_qk_norms)
ATTN = "eager"
SEED = 1234


def token_ids(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.LongTensor:
    """`[1, n]` deterministic random token ids in `[0, vocab)` (independent of torch's global RNG)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g, dtype=torch.long)


def _common(**over) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(over)
    return kw


def _build(config_cls, model_cls, **kw) -> torch.nn.Module:
    config = config_cls(**kw)
    config._attn_implementation = ATTN
    torch.manual_seed(SEED)
    model = model_cls(config)
    model.config._attn_implementation = ATTN
    _sharpen_qk_norms(model)
    return model.to(torch.float32).eval()


@torch.no_grad()
def _sharpen_qk_norms(model: torch.nn.Module, gain: float = QK_NORM_GAIN) -> None:
    """Multiply the effective weight of every q_norm/k_norm by sqrt(gain), so q.k grows by `gain`."""
    g = gain ** 0.5
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_norm", "k_norm") and hasattr(mod, "weight"):
            if "Gemma" in type(mod).__name__:  # Gemma RMSNorm scales by (1 + weight)
                mod.weight.copy_((1.0 + mod.weight) * g - 1.0)
            else:
                mod.weight.mul_(g)


def llama3() -> torch.nn.Module:
    """Llama with llama3-scaled RoPE (head_dim 32)."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}
    return _build(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  **_common(rope_parameters=rope))


def qwen2_yarn() -> torch.nn.Module:
    """Qwen2 with YaRN RoPE (factor 4 over 512 original positions) -> attention_scaling != 1."""
    rope = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
            "original_max_position_embeddings": MAX_POS // 4}
    return _build(transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                  **_common(rope_parameters=rope, use_sliding_window=False))


def qwen3() -> torch.nn.Module:
    """Qwen3: RMSNorm on q and k per head before RoPE; head_dim 64 != hidden/heads."""
    return _build(transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                  **_common(head_dim=64, num_hidden_layers=3,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                            use_sliding_window=False))


def mistral() -> torch.nn.Module:
    """Mistral with sliding_window=None: every layer is full attention."""
    return _build(transformers.MistralConfig, transformers.MistralForCausalLM,
                  **_common(sliding_window=None, head_dim=32))


def gemma2() -> torch.nn.Module:
    """Gemma2: sliding window 64 on even layers, full attention on odd layers, soft-capping."""
    return _build(transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                  **_common(head_dim=64, num_hidden_layers=4, sliding_window=64,
                            query_pre_attn_scalar=64,
                            layer_types=["sliding_attention", "full_attention"] * 2))


def gemma3() -> torch.nn.Module:
    """Gemma3 text: 5 sliding (window 64, local theta 10k) + 1 full (theta 1M) layer, q/k norms."""
    return _build(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                  **_common(head_dim=64, num_hidden_layers=6, sliding_window=64,
                            query_pre_attn_scalar=64,
                            rope_parameters={
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                            }))


def phi3() -> torch.nn.Module:
    """Phi3 with partial_rotary_factor 0.5: only the first 16 of 32 head channels are rotated."""
    return _build(transformers.Phi3Config, transformers.Phi3ForCausalLM,
                  **_common(original_max_position_embeddings=MAX_POS, sliding_window=None,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5}))


def olmo2() -> torch.nn.Module:
    """OLMo2: RMSNorm over the whole q and k projections (not per head), post-norm blocks."""
    return _build(transformers.Olmo2Config, transformers.Olmo2ForCausalLM,
                  **_common(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))


def gpt_neox() -> torch.nn.Module:
    """GPT-NeoX: partial rotary 0.25 of head_dim 64 (16 rotated channels), no GQA (MHA only)."""
    kw = _common(hidden_size=256, num_attention_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.25})
    kw.pop("num_key_value_heads")  # GPT-NeoX has no GQA
    kw["is_decoder"] = True
    return _build(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, **kw)


def stablelm() -> torch.nn.Module:
    """StableLM: partial rotary 0.25 of head_dim 32 with GQA."""
    return _build(transformers.StableLmConfig, transformers.StableLmForCausalLM,
                  **_common(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25}))


TINY: dict[str, Callable[[], torch.nn.Module]] = {
    "llama3": llama3,
    "qwen2-yarn": qwen2_yarn,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi3": phi3,
    "olmo2": olmo2,
    "gpt-neox": gpt_neox,
    "stablelm": stablelm,
}


@torch.no_grad()
def logit_std(model: torch.nn.Module, n: int = 64, seed: int = 0) -> float:
    """Std of the logits over a random prompt; a degenerate init gives ~0."""
    ids = token_ids(n, model.config.vocab_size, seed)
    return float(model(ids).logits.float().std())


@torch.no_grad()
def attention_peak(model: torch.nn.Module, n: int = 300, seed: int = 0) -> list[float]:
    """Per layer, mean over heads and the last 50 queries of the largest attention probability."""
    ids = token_ids(n, model.config.vocab_size, seed)
    atts = model(ids, output_attentions=True).attentions
    return [float(a[0, :, -50:].max(-1).values.mean()) for a in atts]


def with_embedded_tokenizer(model, path) -> str:
    """Save ``model`` to ``path`` with the embedded model's tokenizer files (its
    vocabulary of 49,152: give the model that ``vocab_size``), as a model directory a
    vLLM engine can serve. Returns the path as a string."""
    import os
    import shutil

    from kvcodec.models.loading import resolve_model_path

    model.save_pretrained(path)
    src = resolve_model_path(None)
    for name in os.listdir(src):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            shutil.copy(src / name, path / name)
    return str(path)
