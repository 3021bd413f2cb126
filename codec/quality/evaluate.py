"""Model-side quality of a decoded cache: continuation KL, greedy agreement, generation.

Tensors alone say little about a lossy KV codec; what matters is how the model's
next-token distribution moves when it attends to the decoded cache instead of the
original one (CacheGen §6 reports the same quality signals).
"""
from __future__ import annotations

import torch

from ..core.kvcache import KVCache
from ..models.compare import compare_logits, greedy
from ..models.loading import LoadedModel


@torch.no_grad()
def continuation_logits(lm: LoadedModel, kv: KVCache, continuation) -> torch.Tensor:
    """Logits ``[M, vocab]`` for ``continuation`` token ids, attending to cache ``kv``."""
    cache = kv.to_dynamic_cache(lm.config, dtype=next(lm.model.parameters()).dtype)
    ids = torch.tensor([list(continuation)])
    return lm.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float()


@torch.no_grad()
def greedy_generate(lm: LoadedModel, kv, prompt_ids, max_new_tokens: int = 32) -> list:
    """Greedy continuation of the cached context followed by ``prompt_ids``.

    ``kv`` is a :class:`KVCache` (copied into a fresh DynamicCache) or a transformers
    cache, which is extended in place.
    """
    if isinstance(kv, KVCache):
        cache = kv.to_dynamic_cache(lm.config, dtype=next(lm.model.parameters()).dtype)
    else:
        cache = kv
    logits = lm.model(input_ids=torch.tensor([list(prompt_ids)]), past_key_values=cache,
                      use_cache=True).logits[0, -1]
    return greedy(lm.model, cache, logits, max_new_tokens, lm.tokenizer.eos_token_id)[0]


def answer_agreement(lm: LoadedModel, ref_kv: KVCache, test_kv: KVCache, prompt_ids,
                     ref_answer) -> dict:
    """Teacher-force the reference answer through both caches and compare step by step."""
    seq = list(prompt_ids) + list(ref_answer)
    ref = continuation_logits(lm, ref_kv, seq)[len(prompt_ids) - 1: len(seq) - 1]
    test = continuation_logits(lm, test_kv, seq)[len(prompt_ids) - 1: len(seq) - 1]
    return compare_logits(ref, test)


def evaluate(lm: LoadedModel, token_ids, configs=("default",), prefill: int = 1536,
             continuation: int = 256, baselines=True, threads: int = 0,
             extra: dict | None = None) -> list:
    """Bits against model quality for codec configs and reference schemes.

    Prefill the first ``prefill`` tokens, compress and decompress their KV, then score
    the next ``continuation`` tokens with the original and the decoded cache.
    ``extra``: more schemes, ``{name: fn(kv) -> (decoded KVCache, bits)}``.

    Returns
    -------
    list of dict
        ``{"name", "bits_per_element", "kl", "top1_agreement", "delta_ppl_pct",
        "delta_ppl_se_pct", "exact"}``
        per scheme; ``bits_per_element`` is all-in (whole .kvc file for configs); ``exact``:
        the continuation's logits are identical to the uncompressed cache's.
    """
    from .. import format as kvc
    from ..core.config import load_config
    from ..errors import ShapeError
    from ..models.capture import capture_kv
    from . import baselines as base

    token_ids = list(token_ids)
    if prefill < 1 or continuation < 2:
        raise ShapeError(f"eval needs a prefill of at least 1 token and a continuation of "
                         f"at least 2, got {prefill} and {continuation}")
    if len(token_ids) < prefill + 2:
        raise ShapeError(f"the text has {len(token_ids)} tokens; eval needs more than "
                         f"prefill ({prefill}) + 2")
    cont = token_ids[prefill:prefill + continuation]
    kv = capture_kv(lm, token_ids=token_ids[:prefill])
    ref = continuation_logits(lm, kv, cont)
    n = kv.numel()

    def score(name, decoded, bits):
        got = continuation_logits(lm, decoded, cont)
        row = compare_logits(ref, got, cont[1:])
        return {"name": name, "bits_per_element": bits / n, "kl": row["kl"],
                "top1_agreement": row["top1_agreement"], "delta_ppl_pct": row["delta_ppl_pct"],
                "delta_ppl_se_pct": row["delta_ppl_se_pct"],
                "exact": bool(torch.equal(ref, got))}

    rows = []
    schemes = base.SCHEMES if baselines is True else {k: base.SCHEMES[k] for k in (baselines or ())}
    for name, fn in {**schemes, **(extra or {})}.items():
        decoded, bits = fn(kv)
        rows.append(score(name, decoded, bits))
    for cfg in configs:
        cfg = load_config(cfg, model=lm.fingerprint)
        data = kvc.encode(kv, config=cfg, threads=threads)
        rows.append(score(cfg.get("name", "custom") if cfg.get("name") != "cachegen"
                          else "cachegen-kvc", kvc.decode(data, threads=threads), len(data) * 8))
    return rows


def sweep_configs(cfg: dict, factors=(0.5, 0.7, 1.0, 1.4, 2.0)) -> list:
    """Variants of a config for an R-D curve: steps scaled (uniform) or bins (absmax)."""
    from ..core.rate import scale_steps

    return [scale_steps(cfg, f, f"{cfg.get('name', 'custom')}x{f:g}") for f in factors]


def plot(rows: list, path) -> None:
    """Bits per element against KL, one point per scheme (log KL axis)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import BackendError
        raise BackendError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in rows:
        groups.setdefault(r["name"].split("x")[0] if "x" in r["name"] and
                          r["name"].split("x")[-1].replace(".", "").isdigit() else r["name"],
                          []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["bits_per_element"])
        ax.plot([r["bits_per_element"] for r in rs], [max(r["kl"], 1e-6) for r in rs],
                "o-" if len(rs) > 1 else "o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (all-in)")
    ax.set_ylabel("KL(original || decoded), nats/token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
