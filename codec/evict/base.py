"""What an eviction policy sees, and the machinery every policy shares: per-head budgets,
exact top-k with deterministic ties, and the gather into an evicted :class:`KVCache`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.kvcache import KVCache
from ..errors import ConfigError, ShapeError


@dataclass
class Stats:
    """Everything a policy may score from, per layer ``l`` (``H`` KV heads, ``Hq = H *
    groups`` query heads, ``T_l`` held tokens).

    Attributes
    ----------
    keys, values : list of Tensor
        float32 ``[H, T_l, head_dim]``: the full-precision cache (post-RoPE keys).
    positions : list of LongTensor
        ``[T_l]``: the true position of each held token (a sliding-window layer holds
        the last ``T_l``).
    length : int
        The sequence length.
    groups : int
        Query heads per KV head (GQA).
    window : list of Tensor or None
        float32 ``[Hq, w, T_l]``: attention probabilities of the prompt's last ``w``
        queries over the held tokens (SnapKV's observation window), from :func:`press`.
    observed : list of Tensor or None
        float32 ``[Hq, T_l]``: each token's attention averaged over every prompt query
        that can see it (H2O's accumulated attention, made fair to late tokens).
    head_importance : list of Tensor or None
        float32 ``[H, T_l]``: what :func:`kvcodec.capture_kv` stores after a capture
        (window attention per KV head); the post-hoc stand-in for ``window``.
    replay : list of Tensor or None
        float32 ``[Hq, T_l]``: the most attention each token got from any query of a
        replay of the text behind the cache (the model asked to repeat it, KVzip's
        reconstruction signal), run by :func:`press` after the prefill.
    """

    keys: list
    values: list
    positions: list
    length: int
    groups: int = 1
    window: list | None = None
    observed: list | None = None
    head_importance: list | None = None
    replay: list | None = None

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_heads(self) -> int:
        return int(self.keys[0].shape[0])


class Policy:
    """Scores tokens per head; :func:`evict` owns budgets, top-k and write-back.

    ``needs`` names the :class:`Stats` fields beyond the tensors that :meth:`score`
    reads (``"window"``, ``"observed"``); ``score`` returns float64 ``[H, T_l]`` per
    layer, higher kept first, ``inf`` for tokens that must stay (sinks, protected
    windows: they count in the budget). ``budgets`` may move budget between heads
    and layers (KV-Compress); the default gives every head the same share.
    """

    name = ""
    needs: frozenset = frozenset()

    def score(self, st: Stats) -> list:
        raise NotImplementedError

    def budgets(self, st: Stats, scores: list, ratio: float) -> list:
        return [torch.full((st.num_heads,), head_budget(len(p), ratio), dtype=torch.long)
                for p in st.positions]

    def __repr__(self):
        return f"<policy {self.name}>"


def head_budget(tokens: int, ratio: float) -> int:
    """Tokens a head of ``tokens`` keeps at ``ratio`` (at least one)."""
    return max(1, min(tokens, round(ratio * tokens)))


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"the kept ratio must be a number in (0, 1], got {ratio!r:.40}")
    return float(ratio)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` (``[..., T]``) from most to least important along the last
    axis; equal scores go to the later token (deterministic, and recent tokens are the
    better guess when bf16 key norms or pooled scores tie)."""
    t = scores.shape[-1]
    order = torch.sort(scores.flip(-1).double(), dim=-1, descending=True, stable=True).indices
    return t - 1 - order


def top_positions(scores: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor):
    """Exact per-head top-k: ``[H, max(counts)]`` true positions, ascending per head,
    ``-1`` in unused slots."""
    slots = int(counts.max())
    order = rank(scores)[:, :slots]
    keep = positions[order]
    keep = torch.where(torch.arange(slots)[None, :] < counts[:, None], keep,
                       torch.full_like(keep, 1 << 62))
    keep = torch.sort(keep, dim=1).values
    keep[keep == 1 << 62] = -1
    return keep


def gather(kv: KVCache, kept: list) -> KVCache:
    """The evicted cache holding, per head, exactly the ``kept`` positions of ``kv``."""
    n = kv.num_tokens
    keys, values = [], []
    for l, pos in enumerate(kept):
        first = n - kv.layer_tokens[l]  # positions held by the layer start here
        slot = (pos - first).clamp(min=0)
        idx = slot[None, :, :, None].expand(1, -1, -1, kv.head_dim).to(kv.keys[l].device)
        valid = (pos >= 0)[None, :, :, None].to(kv.keys[l].device)
        keys.append(torch.where(valid, kv.keys[l].gather(2, idx), 0).contiguous())
        values.append(torch.where(valid, kv.values[l].gather(2, idx), 0).contiguous())
    return KVCache(keys, values, kv.token_ids, kv.model, kv.importance, dict(kv.extra),
                   length=n, kept=[p.clone() for p in kept])


def stats_from_cache(kv: KVCache, window=None, observed=None, groups: int = 1,
                     replay=None) -> Stats:
    """:class:`Stats` of a dense cache (full precision as given), with the attention
    statistics a press collected, or else what the capture stored
    (``kv.extra["head_importance"]``, else ``kv.importance`` for every head)."""
    if kv.evicted:
        raise ShapeError("this cache is already evicted; evict the full cache once")
    if kv.anchor is not None:
        raise ShapeError("an anchored (position-independent) chunk cannot be evicted: "
                         "blending needs every token of it")
    n = kv.num_tokens
    positions = [torch.arange(n - t, n) for t in kv.layer_tokens]
    head_imp = kv.extra.get("head_importance")
    if head_imp is not None:
        head_imp = [head_imp[l][:, n - t:].float() for l, t in enumerate(kv.layer_tokens)]
    elif kv.importance is not None:
        head_imp = [kv.importance[l, n - t:].float().expand(kv.num_kv_heads, -1)
                    for l, t in enumerate(kv.layer_tokens)]
    return Stats([k[0].detach().float().cpu() for k in kv.keys],
                 [v[0].detach().float().cpu() for v in kv.values],
                 positions, n, groups, window, observed, head_imp, replay)


def protect(scores: torch.Tensor, positions: torch.Tensor, length: int, sinks: int,
            recent: int) -> torch.Tensor:
    """``scores`` ``[H, T_l]`` with the first ``sinks`` and the last ``recent`` positions
    of the sequence set to ``inf``: they stay (and count in the budget)."""
    keep = (positions < sinks) | (positions >= length - recent)
    return torch.where(keep[None, :], torch.inf, scores)


def group_heads(x: torch.Tensor, heads: int, reduce: str = "mean") -> torch.Tensor:
    """``[Hq, ...]`` per query head -> ``[H, ...]`` per KV head over its query group."""
    g = x.reshape(heads, x.shape[0] // heads, *x.shape[1:])
    return g.amax(1) if reduce == "max" else g.mean(1)
