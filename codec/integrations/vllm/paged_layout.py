"""vLLM's CPU paged cache as kvcodec writes and reads it: through vLLM's own
cache-writing op, and back through the inverse of that op, learned from the op itself;
and the buffers entries are decoded into on their way there."""
from __future__ import annotations

import logging
import threading

import numpy as np
import torch

log = logging.getLogger("kvcodec")


def slot_ids(block_ids: list, lo: int, hi: int, block: int) -> torch.Tensor:
    """Slot numbers (block id * block size + offset) of tokens ``lo .. hi - 1``, int64.
    In NumPy: a step asks for them per entry of every load (hundreds with eight
    requests), and on arrays this small each torch op costs several NumPy ones."""
    pos = np.arange(lo, hi, dtype=np.int64)
    return torch.from_numpy(np.asarray(block_ids, dtype=np.int64)[pos // block] * block
                            + pos % block)


def layer_groups(layers: list, beside: bool = True, layer_bytes: int = 0,
                 budget: int = 0) -> list:
    """Layers in decode order, in groups: one native call per group for all entries of
    the step, then the group's writes into vLLM's cache.

    ``beside`` the forward pass, which waits on each layer: groups doubling in size, the
    first layer alone (its attention can start soon), then 1, 2, 4, 8, ... layers.
    Doubling keeps the decode ahead of the forward pass with few calls (six for 30
    layers); on a 2-core VM it measured TTFT 0.235-0.252 s against 0.265-0.269 s for
    three groups (1, 3, the rest).

    Before the forward pass (nothing waits on a layer): as few groups as ``budget`` bytes
    of decode buffers hold at ``layer_bytes`` per layer, equal in size (one, unless the
    step is large). The writes run vLLM's op on the model's OpenMP team, whose workers
    spin for a while after each op (libgomp's wait policy); a group decoded after
    another's writes shared the cores with them. On a 2-core Zen 3 (float32 engine,
    1,920 tokens) the load took 98-124 ms in the six doubling groups, 59-73 ms in one,
    and the decode alone 45-60 ms against 29 ms."""
    if not beside:
        most = max(1, budget // layer_bytes) if budget and layer_bytes else len(layers)
        size = max(1, -(-len(layers) // -(-len(layers) // most)))  # equal, each <= most
        return [layers[i:i + size] for i in range(0, len(layers), size)]
    groups, at, size = [], 0, 1
    while at < len(layers):
        groups.append(layers[at:at + size])
        at += size
        size = size * 2 if at > 1 else 1
    return groups


class PagedLayout:
    """Writes K/V into vLLM's CPU paged cache through its own op, and reads them back
    through the inverse of that op, learned from the op itself: each element's position
    inside a block is found by writing coded indices through the op, then checked by a
    round trip of random values. A layout the check does not confirm disables saving
    (``can_read`` is False)."""

    def __init__(self, cache: torch.Tensor, block: int, want_read: bool):
        self.dtype = cache.dtype
        _, self.heads, _, two_d = cache.shape
        self.head_dim = two_d // 2
        self.block_elems = cache[0].numel()  # a block of every layer's cache, flat
        self.block = block
        self.isa = default_isa(self.dtype, block, self.head_dim)
        self.can_read = False
        self._perm = None
        self.spans = None  # per kind (head stride, channels, [block] row starts)
        if want_read:
            self._learn()

    def bind_isa(self, forward_context, names: dict) -> None:
        """The ISA the attention layers use (vLLM sets it on each layer); relearn the
        inverse if it differs from the one assumed at registration."""
        layers = getattr(forward_context, "no_compile_layers", {}) or {}
        isa = getattr(layers.get(next(iter(names), None)), "isa", None)  # one ISA for all
        if isa is not None and isa != self.isa:
            self.isa = isa
            if self._perm is not None:
                self._learn()

    def _split(self, cache: torch.Tensor):
        nb, h, bs, _ = cache.shape
        return cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)

    def write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots) -> None:
        """``k``, ``v``: ``[tokens, kv_heads, head_dim]`` (any float dtype)."""
        from vllm import _custom_ops as ops

        kc, vc = self._split(cache)
        fmt = torch.contiguous_format  # cast and lay out in one pass
        ops.cpu_attn_reshape_and_cache(k.to(self.dtype, memory_format=fmt),
                                       v.to(self.dtype, memory_format=fmt), kc, vc, slots,
                                       self.isa)

    def read(self, cache: torch.Tensor, slots: torch.Tensor):
        """K and V ``[tokens, kv_heads, head_dim]`` of ``slots`` (copies)."""
        return tuple(torch.take(cache, i) for i in self._positions(slots))

    def _positions(self, slots: torch.Tensor) -> tuple:
        """Per kind, each element's position in the cache seen flat, ``[tokens, kv_heads,
        head_dim]``: each token's elements straight from the flat cache (not a copy of
        its whole block per token: that is block-size times the data, ~200 MB per layer
        for 2,000 tokens)."""
        offs = slots % self.block
        base = ((slots // self.block) * self.block_elems).unsqueeze(1)
        return tuple((base + idx[offs]).view(len(slots), self.heads, self.head_dim)
                     for idx in self._perm)  # idx: [block, heads * head_dim] in a block

    def read_from(self, caches: list, slots: torch.Tensor, buf: torch.Tensor | None = None):
        """Per cache (layer), K and V ``[1, heads, len(slots), head_dim]`` of ``slots``
        (copies; views of ``buf`` where given, a flat tensor of this layout's dtype and
        at least :meth:`save_numel` elements: a save's buffers reused, not fresh pages).

        A save runs in the engine's step, so this is on every request's path. Where the
        layout is strided (:attr:`spans` with evenly spaced rows: vLLM's CPU layouts)
        each run of a save's tokens within one block is one strided copy per layer and
        kind; otherwise the gather's positions are computed once for every layer. On a
        2-core Zen 3 (30 layers, 305 tokens, float32) a save took 4.3 ms (pages
        reused), against 34 ms by :meth:`read` per layer."""
        h, d, count = self.heads, self.head_dim, len(slots)
        if buf is None:
            buf = torch.empty(self.save_numel(len(caches), count), dtype=self.dtype)
        views = buf[:self.save_numel(len(caches), count)].view(2, len(caches), 1, h, count, d)
        strided = self._strided() if all(c.is_contiguous() for c in caches) else None
        where = None  # the gather's positions, where not strided
        if strided is not None:
            s, bs = slots.numpy(), self.block
            runs, j = [], 0  # (block, first offset, last offset + 1, first token)
            while j < count:
                b, o = divmod(int(s[j]), bs)
                m = min(count - j, bs - o)
                if not np.array_equal(s[j:j + m], np.arange(s[j], s[j] + m)):
                    strided = None  # slots not consecutive within a block: gathered
                    break
                runs.append((b, o, o + m, j))
                j += m
        for l, cache in enumerate(caches):
            for kind in range(2):
                dst = views[kind, l, 0]  # [heads, tokens, head_dim]
                if strided is None:
                    where = self._positions(slots) if where is None else where
                    dst.copy_(torch.take(cache, where[kind]).transpose(0, 1))
                    continue
                size, stride, offset = strided[kind]
                blocks = cache.as_strided((cache.shape[0],) + size, stride,
                                          cache.storage_offset() + offset)
                for b, o0, o1, t in runs:
                    dst[:, t:t + o1 - o0] = blocks[b, :, o0:o1]
        return list(views[0]), list(views[1])

    def save_numel(self, layers: int, tokens: int) -> int:
        """Elements :meth:`read_from` writes for ``tokens`` tokens of ``layers`` layers."""
        return 2 * layers * self.heads * tokens * self.head_dim

    def _strided(self):
        """Per kind, ``(size, stride, offset)`` of a ``[heads, block, head_dim]`` view of
        a block at block 0 of a contiguous cache, where :attr:`spans` show each row
        evenly spaced (vLLM's CPU layouts); else None."""
        if self.spans is None:
            return None
        out = []
        for kind in ("key", "value"):
            hs, cs, starts = self.spans[kind]
            if not isinstance(cs, int):  # channels not evenly spaced (AMX): gathered
                return None
            step = int(starts[1] - starts[0]) if len(starts) > 1 else 1
            if not np.array_equal(starts, starts[0] + step * np.arange(len(starts))):
                return None
            out.append(((self.heads, self.block, self.head_dim),
                        (self.block_elems, hs, step, cs), int(starts[0])))
        return out

    def _learn(self) -> None:
        h, d, bs = self.heads, self.head_dim, self.block
        n = bs * h * d
        scratch = torch.zeros((1, h, bs, 2 * d), dtype=self.dtype)
        slots = torch.arange(bs)
        zeros = torch.zeros((bs, h, d), dtype=self.dtype)
        # Element e = (token, head, dim) is written as its base-64 digits, one pass each:
        # small integers are exact in every float dtype the backend supports.
        pos = {}
        for which in ("k", "v"):
            where = torch.zeros(n, dtype=torch.int64)
            order, scale = None, 1  # order: the block positions the op wrote, each pass
            while scale < n:
                code = ((torch.arange(n) // scale) % 64 + 1).to(self.dtype).view(bs, h, d)
                scratch.zero_()
                self.write(scratch, code if which == "k" else zeros,
                           zeros if which == "k" else code, slots)
                flat = scratch.reshape(-1)
                hit = flat.nonzero().flatten()
                if len(hit) != n or (order is not None and not torch.equal(hit, order)):
                    log.warning("kvcodec: vLLM's paged layout (%s) is not a permutation; "
                                "saving to the store is off", self.isa)
                    self._perm, self.can_read, self.spans = None, False, None
                    return
                vals = flat[hit].to(torch.int64) - 1
                order = hit
                where += vals * scale
                scale *= 64
            src = torch.empty(n, dtype=torch.int64)
            src[where] = order
            pos[which] = src.view(bs, h * d)
        self._perm = (pos["k"], pos["v"])
        self.spans = _spans(self._perm, h, d)
        # The check: random values written by the op read back exactly.
        k = torch.randn((bs, h, d)).to(self.dtype)
        v = torch.randn((bs, h, d)).to(self.dtype)
        scratch.zero_()
        self.write(scratch, k, v, slots)
        rk, rv = self.read(scratch, slots)
        self.can_read = bool(torch.equal(rk, k) and torch.equal(rv, v))
        if not self.can_read:
            self.spans = None
            log.warning("kvcodec: reading vLLM's paged cache (%s) back failed its self-test; "
                        "saving to the store is off", self.isa)

    def starts(self, slots: np.ndarray, kind: str) -> np.ndarray:
        """Where each slot's keys or values (``kind``) start in a contiguous cache of
        this layout seen flat (head 0, channel 0; int64), given :attr:`spans`."""
        return (slots // self.block) * self.block_elems + self.spans[kind][2][slots % self.block]


def _spans(perm: tuple, heads: int, head_dim: int) -> dict | None:
    """Per kind, ``(head stride, channels, row starts [block])`` where a block's element
    ``(token, head, channel)`` sits at ``start[token] + head * head stride + channel's
    place``, ``channels`` being the elements from one channel to the next (vLLM's CPU
    layouts keep values ``[heads, block, head_dim]`` and keys ``[heads, head_dim,
    block]``) or, where the places are not evenly spaced, an int64 array of each
    channel's place (its AMX layouts pair bfloat16 values: keys ``[head_dim / 2, block,
    2]``, values two tokens interleaved); None where the learned positions are not of
    that form (then nothing is decoded in place)."""
    out = {}
    for kind, idx in zip(("key", "value"), perm):
        start = idx[:, 0]
        hs = int(idx[0, head_dim] - idx[0, 0]) if heads > 1 else 0
        chans = idx[0, :head_dim] - idx[0, 0]
        form = (torch.arange(heads)[:, None] * hs + chans).reshape(-1)
        if hs < 0 or (chans < 0).any() or not torch.equal(start[:, None] + form, idx):
            return None
        cs = int(chans[1]) if head_dim > 1 else 1
        if not torch.equal(chans, torch.arange(head_dim) * cs) or cs < 1:
            cs = chans.numpy().astype(np.int64)
        out[kind] = (hs, cs, start.numpy().astype(np.int64))
    return out


class BufferPool:
    """``(keys, values)`` per layer, ``[1, heads, tokens, head_dim]`` views of ``[tokens,
    heads, head_dim]`` buffers (the order vLLM's cache-writing op reads, so a layer is
    written without a transposing copy), in ``dtype``: the cache's where the decoder
    writes it (float32, bfloat16: no cast after), else float32. Kept across steps (fresh
    pages cost a page fault each, more than the decode's writes to them) while they stay
    under ``max_bytes``; past it, new ones each time."""

    def __init__(self, heads: int, head_dim: int, max_bytes: int):
        self.heads, self.head_dim, self.max_bytes = heads, head_dim, max_bytes
        self.dtype = torch.float32
        self._kept: list = []

    def decode_to(self, cache_dtype) -> None:
        """Decode into ``cache_dtype`` where the decoder can write it."""
        dtype = cache_dtype if cache_dtype in (torch.float32, torch.bfloat16) else torch.float32
        if dtype != self.dtype:
            self.dtype, self._kept = dtype, []

    def layer_bytes(self, tokens: int) -> int:
        """A layer's keys and values of ``tokens`` tokens in the decode buffers."""
        return 2 * tokens * self.heads * self.head_dim * torch.empty(
            (), dtype=self.dtype).element_size()

    def views(self, layers: list, tokens: int) -> dict:
        """``{layer: (keys, values)}`` for ``layers`` with room for ``tokens``. Layer
        groups are decoded and written one after another, so they share the buffers."""
        h, d = self.heads, self.head_dim
        have = self._kept[0].shape[0] if self._kept else 0
        count, cap = max(len(layers) * 2, len(self._kept)), max(tokens, have)
        if count // 2 * self.layer_bytes(cap) > self.max_bytes:  # count: 2 per layer
            bufs = [torch.empty((tokens, h, d), dtype=self.dtype) for _ in range(2 * len(layers))]
        else:
            if count > len(self._kept) or cap > have:
                self._kept = [torch.empty((cap, h, d), dtype=self.dtype) for _ in range(count)]
            bufs = self._kept
        seen = [b[:tokens].permute(1, 0, 2).unsqueeze(0) for b in bufs[:2 * len(layers)]]
        return {l: (seen[2 * i], seen[2 * i + 1]) for i, l in enumerate(layers)}


class SaveBuffers:
    """The flat buffers saves copy vLLM's cache into (:meth:`PagedLayout.read_from`),
    given back once their save is encoded and kept for later saves while the free ones
    stay under ``max_bytes``. Fresh pages cost a page fault each, twice the copy itself:
    on a 2-core Zen 3 a save of 305 tokens (30 layers, float32) took 13 ms into new
    memory, 4.3 ms into pages used before. Sizes are rounded up to ``tokens`` tokens
    (the store's chunk) so that saves of similar lengths share buffers."""

    def __init__(self, max_bytes: int, tokens: int):
        self.max_bytes, self.tokens = max_bytes, tokens
        self._free: list = []
        self._lock = threading.Lock()

    def take(self, layout: PagedLayout, layers: int, tokens: int) -> torch.Tensor:
        """A buffer for a save of ``tokens`` tokens of ``layers`` layers."""
        numel = layout.save_numel(layers, -(-tokens // self.tokens) * self.tokens)
        with self._lock:
            fits = [i for i, b in enumerate(self._free)
                    if b.dtype == layout.dtype and b.numel() >= numel]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(numel, dtype=layout.dtype)

    def give(self, buf: torch.Tensor) -> None:
        """Keep ``buf`` for a later save (no view of it is used any more), room allowing."""
        size = buf.numel() * buf.element_size()
        with self._lock:
            if sum(b.numel() * b.element_size() for b in self._free) + size <= self.max_bytes:
                self._free.append(buf)


def default_isa(dtype, block: int, head_dim: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block, head_dim)
