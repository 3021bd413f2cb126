"""Eviction at capture: hooks on the model's attention collect what a policy scores from
while the prompt is prefilled (kvpress applies its presses the same way); the hooks
come off when the ``with`` block ends, whatever happens in it."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from ..core.kvcache import KVCache
from ..errors import BackendError, ShapeError
from ..models.attention import eager
from ..models.tokens import special_prefix, text_ids
from .base import Stats, stats_from_cache
from .ranking import evict

# Prompt queries whose attention rows are kept for window scores (policies use their
# last ``window`` of them; SnapKV's default is 64).
MAX_WINDOW = 128


class _LayerLog:
    """What one attention layer saw over the prefill: attention rows of the last
    queries and the running mean attention per token."""

    def __init__(self, sliding_window):
        self.sliding = sliding_window
        self.seen = 0
        self.rows = []       # (probabilities [Hq, q, kv], first key position)
        self.sum = None      # [Hq, P] attention summed over the queries that see a token
        self.count = None    # [P] how many queries see each token

    def add(self, probs: torch.Tensor, want_rows: bool, want_mean: bool) -> None:
        probs = probs[0].detach().float().cpu()
        q, kv = probs.shape[1], probs.shape[2]
        end = self.seen + q
        k0 = end - kv
        if k0 < 0:
            raise BackendError("the attention saw more keys than tokens were fed; evict "
                               "presses need one sequence prefilled from its start")
        if want_rows:
            self.rows.append((probs[:, -MAX_WINDOW:], k0))
            while sum(r.shape[1] for r, _ in self.rows[1:]) >= MAX_WINDOW:
                self.rows.pop(0)
        if want_mean:
            grow = end - (0 if self.sum is None else self.sum.shape[1])
            self.sum = _grow(self.sum, probs.shape[0], grow)
            self.count = _grow(self.count, None, grow)
            self.sum[:, k0:end] += probs.sum(1)
            qpos = torch.arange(self.seen, end)[:, None]
            kpos = torch.arange(k0, end)[None, :]
            sees = kpos <= qpos
            if self.sliding:
                sees &= qpos - kpos < self.sliding
            self.count[k0:end] += sees.sum(0)
        self.seen = end

    def window(self) -> torch.Tensor:
        """``[Hq, w, seen]`` attention of the last ``w`` queries (0 before their keys)."""
        n = sum(r.shape[1] for r, _ in self.rows)
        out = torch.zeros(self.rows[0][0].shape[0], n, self.seen)
        at = 0
        for r, k0 in self.rows:
            out[:, at:at + r.shape[1], k0:k0 + r.shape[2]] = r
            at += r.shape[1]
        return out[:, -MAX_WINDOW:]

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)


def _grow(t, heads, n):
    shape = (n,) if heads is None else (heads, n)
    z = torch.zeros(shape)
    return z if t is None else torch.cat([t, z], dim=-1)


@contextmanager
def _hooked(model, hook, why: str):
    """Eager attention plus ``hook`` on every attention module of ``model``, both undone
    on exit whatever happens; yields the modules."""
    mods = [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int)
            and type(m).__name__.endswith("Attention")]
    if not mods:
        raise BackendError(f"found no attention modules in {type(model).__name__} to hook; "
                           f"{why}")
    with eager(model):  # the kernels that return weights
        handles = []
        try:
            handles = [m.register_forward_hook(hook) for m in mods]
            yield mods
        finally:
            for h in handles:
                h.remove()


def _weights(module, output, why: str) -> torch.Tensor:
    probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if probs is None:
        raise BackendError(f"{type(module).__name__} returned no attention weights; {why} "
                           "(eager attention)")
    return probs


# What the model is asked before it replays a text (policy ``replay``).
REPLAY_PROMPT = "\n\nRepeat the previous text exactly:\n"
REPLAY_CHUNK = 256


class Press:
    """Context manager returned by :func:`press`: collects attention during the prefill
    run inside it, then :meth:`evict` turns the cache that prefill made into an
    evicted one (for ``replay``, after running the model over the text once more)."""

    def __init__(self, model, policy, ratio: float):
        self.tokenizer = getattr(model, "tokenizer", None)
        self.model = getattr(model, "model", model)  # a LoadedModel or a transformers model
        self.policy, self.ratio = policy, ratio
        self._logs, self._stack = {}, None
        self._why = f"policy {policy.name} needs attention weights"

    def __enter__(self):
        self._stack = ExitStack()
        if self.policy.needs & {"window", "observed"}:
            for m in self._stack.enter_context(_hooked(self.model, self._hook, self._why)):
                self._logs[m.layer_idx] = _LayerLog(getattr(m, "sliding_window", None))
        return self

    def __exit__(self, *exc):
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        return False

    def _hook(self, module, args, output):
        self._logs[module.layer_idx].add(_weights(module, output, self._why),
                                         "window" in self.policy.needs,
                                         "observed" in self.policy.needs)

    @torch.no_grad()
    def _replay(self, kv: KVCache) -> list:
        """``[Hq, T_l]`` per layer: the most attention each token gets from a replay of
        the text over a copy of its cache."""
        if kv.token_ids is None:
            raise ShapeError(f"policy {self.policy.name} replays the text, and this cache "
                             "carries no token ids")
        text = list(kv.token_ids)
        prompt = []
        if self.tokenizer is not None:
            prompt = text_ids(self.tokenizer, REPLAY_PROMPT, first=False)
            bos = special_prefix(self.tokenizer)  # the text is repeated, not its BOS
            if bos and text[:len(bos)] == bos:
                text = text[len(bos):]
        ids = prompt + text
        n = kv.num_tokens
        best, seen = {}, [n]

        def hook(module, args, output):
            probs = _weights(module, output, self._why)[0].detach().float()
            end = seen[0] + probs.shape[1]
            k0 = end - probs.shape[2]
            top = probs[:, :, :max(0, n - k0)].amax(1).cpu()  # over the replay's queries
            row = best.setdefault(module.layer_idx, torch.zeros(probs.shape[0], n))
            row[:, k0:k0 + top.shape[1]] = torch.maximum(row[:, k0:k0 + top.shape[1]], top)

        cache = kv.to_dynamic_cache(self.model.config)
        with _hooked(self.model, hook, self._why):
            for start in range(0, len(ids), REPLAY_CHUNK):
                piece = ids[start:start + REPLAY_CHUNK]
                self.model(input_ids=torch.tensor([piece]), past_key_values=cache,
                           use_cache=True)
                seen[0] += len(piece)
        return [best[l][:, n - t:] for l, t in enumerate(kv.layer_tokens)]

    def stats(self, kv: KVCache) -> Stats:
        """The :class:`Stats` of ``kv`` (the cache the prefill made) with the attention
        collected while it was made."""
        window = observed = replay = None
        groups = 1
        if self._logs:
            seen = {log.seen for log in self._logs.values()}
            if seen != {kv.num_tokens} or len(self._logs) != kv.num_layers:
                raise ShapeError(f"the press saw {sorted(seen)} tokens over "
                                 f"{len(self._logs)} layers but the cache holds "
                                 f"{kv.num_tokens} tokens over {kv.num_layers}: evict the "
                                 "cache the prefill inside this press made")
            n = kv.num_tokens
            keep = [slice(n - t, n) for t in kv.layer_tokens]
            logs = [self._logs[l] for l in range(kv.num_layers)]
            if "window" in self.policy.needs:
                window = [log.window()[:, :, s] for log, s in zip(logs, keep)]
            if "observed" in self.policy.needs:
                observed = [log.mean()[:, s] for log, s in zip(logs, keep)]
        if "replay" in self.policy.needs:
            replay = self._replay(kv)
        some = next((x for x in (window, observed, replay) if x is not None), None)
        if some is not None:
            groups = some[0].shape[0] // kv.num_kv_heads
        return stats_from_cache(kv, window, observed, groups, replay)

    def evict(self, kv) -> KVCache:
        """``kv`` (a :class:`KVCache` or transformers cache of the prefill run inside
        the press) evicted to the press's policy and ratio."""
        if not isinstance(kv, KVCache):
            kv = KVCache.from_dynamic_cache(kv)
        return evict(kv, self.policy, self.ratio, self.stats(kv))
