"""Selective recompute of blended documents with vLLM's own kernels, no patch of vLLM:
the quality path of a blended request (``recompute`` > 0 in :mod:`.blending`).

vLLM computes every token of the prompt, as a prefill does (the connector claims
none). Before the forward pass, the worker writes each stored document's K/V, re-rotated to its
offset, into the request's blocks for the layers after the check layer; layers up to it
are left to vLLM, which computes fresh K/V there for every token. After the check
layer's attention (the connector's ``save_kv_layer``, before the next layer writes
anything), :func:`choose` ranks the documents' tokens with the selector
(:mod:`kvcodec.blend.selectors`: ``hkvd`` compares the fresh K/V vLLM just wrote with
the cached ones, as :func:`kvcodec.blend.blend` does) and the slots of the cached tokens
it does not pick are set to -1 in ``forward_context.slot_mapping`` for the later layers:
vLLM's cache-writing op skips them, so their cached K/V stay, while every other token's
fresh K/V are written. Each query keeps its true position and sees every position up to
its own through vLLM's attention: the exact mask of :func:`kvcodec.blend.blend`, the same
selection. Computing every token (the documents' queries run too; only their K/V are
replaced) buys quality, not time; where the model runs eagerly and the step holds this
request alone, :mod:`.subset` then runs only the rows that matter through the later
layers (the recomputed, the never-cached and the last token), which buys the time too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...blend.api import SINK_TOKENS, deviation
from ...blend.selectors import Context, get_selector
from .paged_layout import slot_ids

log = logging.getLogger("kvcodec")


@dataclass
class Recompute:
    """A blended request's selective recompute: the budget (``ratio`` of the cached
    tokens), ``selector``, ``check_layer``, ``seed``, the prompt's length and its
    documents' ``[start, end)`` spans. The worker fills ``cached`` (per landed entry:
    its positions and the check layer's cached K/V rows) and ``failed_from`` (documents
    from that position on are computed like text), then ``selected`` (the cached
    positions recomputed after the check layer, as :class:`~kvcodec.blend.BlendResult`
    reports them)."""

    ratio: float
    selector: str
    check_layer: int
    seed: int
    n_tokens: int
    spans: list
    cached: list = field(default_factory=list)
    failed_from: int | None = None
    selected: torch.Tensor | None = None
    kept: torch.Tensor | None = None  # the cached positions whose cached K/V stay

    def landed(self):
        """Positions (increasing), keys and values ``[tokens, heads, head_dim]`` of the
        check layer, of the cached tokens that landed before any failure."""
        parts = sorted(self.cached, key=lambda c: int(c[0][0]))
        if self.failed_from is not None:
            parts = [c for c in parts if int(c[0][-1]) < self.failed_from]
        if not parts:
            return None
        return tuple(torch.cat([c[i] for c in parts]) for i in range(3))


def choose(rc: Recompute, fresh=None) -> torch.Tensor:
    """The cached positions whose cached K/V stay after the check layer (the rest are
    recomputed): ``fresh`` is the check layer's ``(keys, values)`` vLLM computed at the
    landed positions (``[tokens, heads, head_dim]``), needed by ``hkvd``. Fills
    ``rc.selected``. The budget is at least one token, and the prompt's first
    ``SINK_TOKENS`` tokens and last token are always recomputed (as :func:`blend` does)."""
    got = rc.landed()
    if got is None:
        rc.selected = torch.zeros(0, dtype=torch.long)
        return rc.selected
    pos, old_k, old_v = got
    sel = get_selector(rc.selector)
    ratio = rc.ratio if sel.fixed_ratio is None else sel.fixed_ratio
    k = min(len(pos), max(1, int(round(ratio * len(pos)))))
    spans = [(a, b) for a, b in rc.spans if bool(((pos >= a) & (pos < b)).any())]
    ctx = Context(pos, spans, seed=rc.seed)
    if "deviation" in sel.needs:  # rows [tokens, heads, head_dim] as [1, heads, tokens, ...]
        rows = [x.transpose(0, 1).unsqueeze(0) for x in (old_k, fresh[0], old_v, fresh[1])]
        ctx.deviation = torch.zeros(rc.n_tokens)
        ctx.deviation[pos] = deviation(*rows, tokens=rc.n_tokens)
    picked = torch.as_tensor(sel.select(ctx, k), dtype=torch.long).view(-1)
    recompute = torch.zeros(rc.n_tokens, dtype=torch.bool)
    recompute[picked] = True
    recompute[:SINK_TOKENS] = True
    recompute[rc.n_tokens - 1] = True
    rc.selected, rc.kept = pos[recompute[pos]], pos[~recompute[pos]]
    return rc.kept


def keep_slots(forward_context, names: dict, check_layer: int, slots: torch.Tensor) -> None:
    """Point ``slots`` at -1 in the slot mappings of the layers after ``check_layer``
    (``names``: vLLM layer name -> layer index) for the rest of this forward pass."""
    mapping = getattr(forward_context, "slot_mapping", None)
    if not isinstance(mapping, dict) or not len(slots):
        return
    masked = {}
    for name, layer in names.items():
        t = mapping.get(name)
        if layer <= check_layer or t is None:
            continue
        if id(t) not in masked:  # layers of one cache group share one tensor
            m = t.clone()
            m[torch.isin(m, slots.to(m.dtype))] = -1
            masked[id(t)] = m
        mapping[name] = masked[id(t)]


def check(load, cache, layout, names: dict, block: int, forward_context) -> torch.Tensor:
    """At ``load``'s check layer (its paged cache ``cache``, read through ``layout``):
    choose the cached tokens to recompute and keep the others' cached K/V in the later
    layers of this forward pass; returns the recomputed cached positions. Where the
    selector needs vLLM's fresh K/V and the cache cannot be read back, nothing is kept
    (the request is computed as a prefill)."""
    rc = load.recompute
    got = rc.landed()
    slots = slot_ids(load.block_ids, 0, rc.n_tokens, block)
    fresh = None
    if got is not None and "deviation" in get_selector(rc.selector).needs:
        if layout.can_read:
            fresh = layout.read(cache, slots[got[0]])
        else:
            log.warning("kvcodec vLLM: cannot read vLLM's paged cache back; %s is computed "
                        "as a prefill", load.req_id)
            rc.failed_from = 0
    keep = choose(rc, fresh)
    keep_slots(forward_context, names, rc.check_layer, slots[keep])
    return rc.selected
