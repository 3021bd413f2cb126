"""What a changed cache does to a model's outputs: the measures every quality figure,
tool and benchmark reports, in one place (``quality``, ``blend`` and the CLI build on it).

:func:`compare_logits` gives KL(reference || test) of the next-token distributions, top-1
agreement and the perplexity change; :func:`greedy` continues greedily from a cache.
"""
from __future__ import annotations

import math

import torch


def compare_logits(ref: torch.Tensor, test: torch.Tensor, targets=None) -> dict:
    """KL(ref || test) per position (mean, nats), greedy agreement, perplexity change.

    ``ref``, ``test``: logits ``[positions, vocab]``. ``targets[i]`` is the token that
    follows position i (for perplexity); when omitted, the perplexity fields are left out.
    ``delta_ppl_se_pct`` is the standard error of ``delta_ppl_pct`` over the scored tokens
    (from the spread of the per-token change of log-likelihood; None for one token): a
    few hundred tokens leave it near half a percent at the codec's usual KL, so a
    perplexity change is only read against it.
    """
    lp_ref, lp = ref.float().log_softmax(-1), test.float().log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    out = {"kl": float(kl.mean()),
           "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).float().mean())}
    if targets is not None:
        t = torch.tensor(list(targets))[:, None]
        nll_ref = -lp_ref[: len(t)].gather(1, t)[:, 0].double()
        nll = -lp[: len(t)].gather(1, t)[:, 0].double()
        out["ppl_ref"] = math.exp(float(nll_ref.mean()))
        out["ppl"] = math.exp(float(nll.mean()))
        ratio = out["ppl"] / out["ppl_ref"]
        out["delta_ppl_pct"] = 100.0 * (ratio - 1.0)
        # exp(mean d) with d the per-token change: its standard error by the delta method.
        d = nll - nll_ref
        out["delta_ppl_se_pct"] = (100.0 * ratio * float(d.std()) / math.sqrt(len(d))
                                   if len(d) > 1 else None)
    return out


def ppl_change_text(pct: float, se) -> str:
    """``delta_ppl_pct`` and its standard error as the tools print them: ``+0.52% +-0.23``
    (``+-?`` where one scored token leaves no error to read)."""
    return f"{pct:+.2f}% +-" + ("?" if se is None else f"{se:.2f}")


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, n: int, eos=None) -> tuple:
    """Greedy continuation from ``cache`` (extended in place), whose next-token logits are
    ``logits``: up to ``n`` tokens, stopping after ``eos``. Returns ``(tokens, the logits
    each token was chosen from)``."""
    out, seen = [], []
    for _ in range(n):
        seen.append(logits.float())
        out.append(int(logits.argmax()))
        if out[-1] == eos or len(out) == n:
            break
        logits = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache,
                       use_cache=True).logits[0, -1]
    return out, seen
