"""``blend``: one cache for a prompt made of cached and text segments."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.checks import is_int
from ..core.kvcache import KVCache
from ..errors import ConfigError, FormatError, KVCodecError, ShapeError
from ..models.capture import default_anchor
from ..models.compare import compare_logits, greedy
from ..models.tokens import check_ids
from . import engine
from .segments import check_in_place, resolve
from .selectors import Context, get_selector

CHECK_LAYER = 1       # CacheBlend's: layer 1's deviation already ranks tokens well
RECOMPUTE = 0.15      # CacheBlend and LMCache recompute 15-20% of cached tokens
QUERY_WINDOW = 32     # query tokens when the prompt does not end with a text segment
SINK_TOKENS = 4       # the prompt's first tokens, recomputed whenever anything is
CANDIDATES = 2.0      # gradual filtering: candidates at the check layer, x the budget


@dataclass
class BlendReport:
    """What a blend did: per segment, whether its cache was reused (and why not), and
    how many tokens were computed. ``recomputed`` counts cached tokens recomputed after
    the check layer; ``computed`` the uncached ones (text segments and fallbacks)."""

    selector: str
    ratio: float
    check_layer: int
    segments: list
    num_tokens: int = 0
    cached: int = 0
    recomputed: int = 0
    computed: int = 0
    query: str = ""
    filter_layer: int | None = None
    candidates: int = 0
    seconds: dict = field(default_factory=dict)

    @property
    def reused_segments(self) -> int:
        return sum(1 for s in self.segments if s.kind == "cached" and s.reused)

    def summary(self) -> str:
        lines = [f"blend: {self.num_tokens} tokens, {self.reused_segments} of "
                 f"{sum(s.kind == 'cached' for s in self.segments)} cached segments reused; "
                 f"{self.recomputed} of {self.cached} cached tokens recomputed "
                 f"({self.selector}, ratio {self.ratio:g}, check layer {self.check_layer}"
                 + (f", {self.candidates} candidates to layer {self.filter_layer}"
                    if self.filter_layer is not None else "") + "), "
                 f"{self.computed} computed; {self.seconds.get('total', 0):.3f}s"]
        for s in self.segments:
            if s.fallback:
                lines.append(f"  {s.source}: computed instead ({s.fallback})")
        return "\n".join(lines)


@dataclass
class BlendResult:
    """``cache``: a transformers cache of the whole prompt, ready for generation;
    ``logits``: the next-token logits after the prompt; ``kv``: the fused tensors."""

    cache: object
    token_ids: list
    logits: torch.Tensor
    kv: KVCache
    report: BlendReport
    selected: torch.Tensor


def default_check_layer(n_layers: int) -> int:
    """``CHECK_LAYER``, or the last but one layer on shallower models."""
    return max(0, min(CHECK_LAYER, n_layers - 2))


def blend(lm, segments, *, recompute: float = RECOMPUTE, selector="hkvd",
          check_layer: int | None = None, filter_layer=False, candidates: float = CANDIDATES,
          anchor=None, seed: int = 0) -> BlendResult:
    """Fuse cached segments and computed text into one cache for a prompt.

    Parameters
    ----------
    lm : LoadedModel
    segments : list of Text, Cached or str
        The prompt in order; a ``str`` is a :class:`Text`.
    recompute : float in [0, 1]
        Fraction of the cached tokens whose K/V are recomputed after the check layer
        (0: plain concatenation; 1: a full prefill). Text segments are always computed.
    selector : str or Selector
        ``hkvd`` (default), ``query``, ``boundary``, ``random``, ``none`` or ``all``.
    check_layer : int, optional
        Default ``CHECK_LAYER`` (1, CacheBlend's), or the last but one on shallower models.
        Last layer run over every token to measure deviation / attention (the layers up
        to it are recomputed for every token when anything is recomputed).
    filter_layer : int, None or False
        CacheBlend's gradual filtering: ``candidates`` times the budget is picked at the
        check layer, runs on to this layer, and the budget is picked among them there
        (their K/V in between are recomputed too). None: a quarter of the depth; False
        (the default; or a layer not after the check layer): one stage. On SmolLM2 it
        did not beat one stage at 2x candidates (see the README).
    anchor : list of int, optional
        Anchor the cached segments were computed behind (default: the model's,
        :func:`kvcodec.models.default_anchor`); a segment made behind another is refused.

    Returns
    -------
    BlendResult
    """
    t_start = time.perf_counter()
    sel = get_selector(selector)
    if isinstance(recompute, bool) or not isinstance(recompute, (int, float)) or not (
            0.0 <= recompute <= 1.0):
        raise ConfigError(f"the recompute budget must be a fraction in [0, 1], got {recompute!r}")
    ratio = float(recompute if sel.fixed_ratio is None else sel.fixed_ratio)
    cfg = lm.config.get_text_config(decoder=True)
    n_layers = int(cfg.num_hidden_layers)
    if check_layer is None:
        check_layer = default_check_layer(n_layers)
    if not is_int(check_layer, 0, n_layers - 2):
        raise ConfigError(f"check_layer must be in [0, {n_layers - 2}], got {check_layer!r}")
    flt = _filter_layer(filter_layer, check_layer, n_layers)
    if isinstance(candidates, bool) or not isinstance(candidates, (int, float)) or not (
            1 <= candidates < float("inf")):
        raise ConfigError(f"candidates must be a finite number >= 1 (times the budget), "
                          f"got {candidates!r}")
    if not is_int(seed, 0, (1 << 64) - 1):  # torch's manual_seed overflowed
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r:.40}")
    if anchor is None:
        if lm.tokenizer is None:
            raise ConfigError("this model has no tokenizer to take the default anchor from; "
                              "pass anchor=[token ids]")
        anchor = default_anchor(lm.tokenizer)
    anchor = check_ids(lm.model, anchor, "the anchor")

    parts = resolve(lm, segments, anchor)
    try:
        return _blend(lm, parts, sel, ratio, check_layer, flt, candidates, seed,
                      n_layers, cfg, t_start)
    finally:
        for p in parts:
            for f in p.owned:
                f.close()


def _blend(lm, parts, sel, ratio, check_layer, flt, candidates, seed, n_layers, cfg,
           t_start) -> BlendResult:
    model = lm.model
    ids, offset = [], 0
    for p in parts:
        p.report.offset = offset
        ids += p.ids
        offset += len(p.ids)
    n = len(ids)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and n > limit:
        raise ShapeError(f"the blended prompt has {n} tokens, over the model's context of "
                         f"{limit}")
    for p in parts:
        if p.load is not None:
            check_in_place(p, p.report.offset)

    # The fused cache, cached rows decoded into place.
    h, d = lm.fingerprint["num_kv_heads"], lm.fingerprint["head_dim"]
    dtype = next(model.parameters()).dtype
    keys = [torch.zeros(1, h, n, d, dtype=dtype) for _ in range(n_layers)]
    values = [torch.zeros(1, h, n, d, dtype=dtype) for _ in range(n_layers)]
    cached = torch.zeros(n, dtype=torch.bool)
    for p in parts:
        if p.load is None:
            continue
        a, b = p.report.offset, p.report.offset + len(p.ids)
        dst = {l: (keys[l][:, :, a:b], values[l][:, :, a:b]) for l in range(n_layers)}
        try:
            p.load(dst, a)
        except (FormatError, OSError) as exc:  # damaged: its tokens are known, compute them
            p.report.fallback = f"damaged, recomputed from its tokens ({exc})"
            continue
        p.report.reused = True
        cached[a:b] = True
    t_loaded = time.perf_counter()

    cached_pos = cached.nonzero().view(-1)
    k = int(round(ratio * len(cached_pos)))
    fused = engine.FusedCache(keys, values)
    report = BlendReport(sel.name, ratio, check_layer, [p.report for p in parts], n,
                         len(cached_pos))
    spans = [(p.report.offset, p.report.offset + len(p.ids)) for p in parts if p.report.reused]
    forced = ~cached
    forced[n - 1] = True
    hidden, after, selected = None, -1, torch.zeros(0, dtype=torch.long)
    if k:
        # The prompt's first tokens are the attention sink every later query leans on
        # (StreamingLLM's 4). A cached segment at the start of the prompt was computed
        # behind an anchor, which was its sink there: whenever anything is recomputed,
        # they are.
        forced[:SINK_TOKENS] = True
        rows, report.query = _query_rows(parts, n)
        stages = [(check_layer, k)]
        if flt is not None and k < len(cached_pos):
            stages = [(check_layer, min(len(cached_pos), int(round(candidates * k)))),
                      (flt, k)]
            report.filter_layer = flt
        pool, qpos = cached_pos, torch.arange(n)
        for layer, size in stages:
            if layer != check_layer:  # the filter stage: candidates and forced tokens
                need = forced.clone()
                need[pool] = True
                if "attention" in sel.needs:
                    need[rows] = True
                idx = need.nonzero().view(-1)
                hidden = hidden[:, _index_in(qpos, idx)]
                qpos = idx
            saved = ((keys[layer].clone(), values[layer].clone())
                     if "deviation" in sel.needs else None)
            want = _index_in(qpos, rows) if "attention" in sel.needs else None
            hidden, attn = engine.run(model, ids, qpos, fused, hidden=hidden, after=after,
                                      stop=layer, attention_rows=want)
            after = layer
            ctx = Context(pool, spans, seed=seed)
            if saved is not None:
                ctx.deviation = deviation(saved[0], keys[layer], saved[1], values[layer])
            if attn is not None:
                ctx.attention = attn.mean(0).sum(0)
            pool = _checked(sel.select(ctx, size), pool, size, sel.name)
            report.candidates = max(report.candidates, len(pool))
        selected = pool
    t_selected = time.perf_counter()
    need = forced.clone()
    need[selected] = True
    query_pos = need.nonzero().view(-1)
    if hidden is not None:
        hidden = hidden[:, _index_in(qpos, query_pos)]
    logits = engine.run(model, ids, query_pos, fused, hidden=hidden, after=after)
    selected = (need & cached).nonzero().view(-1)
    t_done = time.perf_counter()
    report.recomputed = int(len(selected))
    report.computed = int((~cached).sum())
    report.seconds = {"load": t_loaded - t_start, "select": t_selected - t_loaded,
                      "recompute": t_done - t_selected, "total": t_done - t_start}
    kv = KVCache(keys, values, ids, lm.fingerprint)
    return BlendResult(kv.to_dynamic_cache(lm.config), ids, logits, kv, report, selected)


def _index_in(positions: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Indices into ``positions`` (increasing) of ``wanted`` (a subset of it)."""
    return torch.searchsorted(positions, wanted)


def _filter_layer(filter_layer, check_layer: int, n_layers: int):
    """The layer where candidates are ranked again (None: a single stage)."""
    if filter_layer is None:
        filter_layer = n_layers // 4
    if filter_layer is not False and not is_int(filter_layer):
        raise ConfigError(f"filter_layer must be a layer, None or False, got {filter_layer!r}")
    if filter_layer is False or filter_layer <= check_layer:
        return None
    if not check_layer < filter_layer < n_layers - 1:
        raise ConfigError(f"filter_layer must be in ({check_layer}, {n_layers - 1}), "
                          f"got {filter_layer}")
    return int(filter_layer)


def _query_rows(parts, n: int):
    """Positions whose attention ranks tokens for ``query``: the final text segment
    (the question) when the prompt ends with one, else its last tokens."""
    last = parts[-1]
    if last.load is None or not last.report.reused:
        a = last.report.offset
        return torch.arange(a, n), f"the final text segment ({n - a} tokens)"
    w = min(QUERY_WINDOW, n)
    return torch.arange(n - w, n), f"the last {w} tokens (the prompt ends with a cached segment)"


def deviation(old_k, new_k, old_v, new_v, tokens: int | None = None) -> torch.Tensor:
    """Per token of ``[1, heads, rows, head_dim]`` caches (``hkvd``'s measure): squared K
    and V change over heads and channels, each relative to the mean squared norm of the
    layer's cached keys / values over ``tokens`` tokens (default: the rows; more when
    the rows are only the cached ones of a longer prompt, whose others count as zeros,
    as the vLLM connector has them)."""
    def part(old, new):
        err = (new.float() - old.float()).pow(2).sum(dim=(0, 1, 3))
        norms = old.float().pow(2).sum(dim=(0, 1, 3))
        scale = norms.mean() if tokens is None else norms.sum() / tokens
        return err / scale.clamp_min(1e-12)
    return part(old_k, new_k) + part(old_v, new_v)


def _checked(picked, cached_pos: torch.Tensor, k: int, name: str) -> torch.Tensor:
    picked = torch.as_tensor(picked, dtype=torch.long).view(-1)
    ok = torch.zeros(int(cached_pos.max()) + 1 if len(cached_pos) else 0, dtype=torch.bool)
    ok[cached_pos] = True
    if (len(picked) != k or len(torch.unique(picked)) != k
            or (len(picked) and (picked.min() < 0 or picked.max() >= len(ok)
                                 or not bool(ok[picked].all())))):
        raise KVCodecError(f"selector {name} returned {len(picked)} positions; expected {k} "
                           "distinct cached positions")
    return torch.sort(picked).values


@torch.no_grad()
def generate(lm, segments, *, max_new_tokens: int = 48, **kwargs):
    """Blend ``segments`` and continue greedily; returns ``(token ids, BlendResult)``.
    ``kwargs`` go to :func:`blend`."""
    result = blend(lm, segments, **kwargs)
    out, _ = greedy(lm.model, result.cache, result.logits, max_new_tokens, _eos(lm))
    return out, result


@torch.no_grad()
def compare_with_prefill(lm, result: BlendResult, n: int = 32) -> dict:
    """How a blend's answer differs from full prefill's: prefill the same tokens, take
    its greedy ``n``-token answer, teacher-force it through the blended cache.

    Returns ``{"kl", "top1", "exact", "prefill_tokens", "prefill_s"}``: mean KL(prefill
    || blend) of the next-token distributions over the answer, top-1 agreement, and
    whether greedy decoding from the blend gives the same answer (every top-1 equal).
    """
    t = time.perf_counter()
    out = lm.model(input_ids=torch.tensor([result.token_ids]), use_cache=True,
                   logits_to_keep=1)
    prefill_s = time.perf_counter() - t
    answer, ref = greedy(lm.model, out.past_key_values, out.logits[0, -1], n, _eos(lm))
    ref = torch.stack(ref)
    test = [result.logits.view(1, -1).float()]
    if len(answer) > 1:
        cache = result.kv.to_dynamic_cache(lm.config)
        test.append(lm.model(input_ids=torch.tensor([answer[:-1]]), past_key_values=cache,
                             use_cache=True).logits[0].float())
    test = torch.cat(test)
    m = compare_logits(ref, test)  # prefill's greedy answer is its top-1 at every step
    return {"kl": m["kl"], "top1": m["top1_agreement"],
            "exact": bool((test.argmax(-1) == torch.tensor(answer)).all()),
            "prefill_tokens": answer, "prefill_s": prefill_s}


def _eos(lm):
    return lm.tokenizer.eos_token_id if lm.tokenizer is not None else None
