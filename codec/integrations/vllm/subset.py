"""Selective recompute that computes only what it recomputes: the speed path of
:mod:`.recompute`.

:mod:`.recompute` keeps the cached K/V of the tokens its selector does not pick in the
layers after the check layer, but vLLM still runs every token through those layers (only
their K/V writes are dropped), so a blend costs a prefill. Here, in the layers after the
check layer, only the rows that matter run: the recomputed cached tokens, the tokens that
were never cached (text, the question) and the last token. Each of those layers gets the
rows' hidden states, positions and residuals (its projections and MLP run on them alone);
its attention writes the rows' fresh K/V into the paged cache and attends over the
request's whole paged K/V with the exact causal mask of each row's true position (PyTorch
SDPA), as :func:`kvcodec.blend.blend` computes it; after the last layer the rows go back
into the step's hidden states, where vLLM takes the last token's logits. The kept tokens'
rows after the check layer are never computed: nothing reads them.

It is an explicit option, the connector's ``blend_rows_only`` (default off), for the
decoder layer classes it is tested on (:data:`TESTED`), and it is checked against the
path that computes every row (``tests/test_vllm_blend.py``: the same selection, first-token
log-probabilities within 1e-4). It takes over vLLM's model loop without patching vLLM's
code: the first forward after a
selective blend is scheduled finds the model's decoder layers (through a forward
pre-hook, removed once it has seen the first module that holds exactly one of the
connector's attention layers: layer 0) and wraps the ``forward`` of their class and of
vLLM's attention layer class. The wrappers pass everything through unless the instance
is this worker's and a step is active, and a step is active only where it is exact: one
request in the step (the blend's), an eager model (``enforce_eager``: a compiled graph
would not see the wrappers), plain causal attention (no sliding window, soft cap, ALiBi
or sinks) and a paged cache the connector can read back. Otherwise the blend runs as
:mod:`.recompute` runs it, every token computed.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch

from .paged_layout import slot_ids

log = logging.getLogger("kvcodec")

ATTENTION_BYTES = 64 << 20  # attention weights of one block of rows, at most
ROW_BLOCK = 32  # rows per attention block (fewer keys for the earlier blocks)
#: Decoder layer classes the rows-only path is checked on, against every row computed in a
#: real engine (tests/test_vllm_blend.py: the embedded Llama-family model, also against
#: transformers; tests/test_vllm_rows_only.py: tiny Qwen2, Qwen3 and Mistral models);
#: others compute every row.
TESTED = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}


@dataclass
class Step:
    """The active step: rows of the step's tokens to compute after ``check`` (indices
    into its hidden states), their positions (increasing) and slots, every position's
    slot, and the hidden states and residuals of the step kept at the first subset
    layer (the rows go back there)."""

    check: int
    last: int
    rows: torch.Tensor
    positions: torch.Tensor
    row_slots: torch.Tensor
    all_slots: torch.Tensor
    full: tuple | None = None


class SubsetForward:
    """The overrides of one worker's model (``worker``: its caches, layer names, paged
    layout and layer loads)."""

    def __init__(self, worker):
        self.worker = worker
        self.names: dict = {}  # layer index -> vLLM layer name
        self.layers: dict | None = None  # layer index -> its attention module, once found
        self.step: Step | None = None
        self.unusable: str | None = None  # why the model's loop cannot be taken over
        self._hook = None
        self._attn: dict = {}  # id(attention layer) -> (index, module)
        self._owner: dict = {}  # id(decoder layer) -> index
        self.steps = 0  # steps that ran only their rows (tests, benchmarks)

    def prepare(self, forward_context) -> None:
        """Before a forward with a selective blend: find the decoder layers once."""
        global CURRENT
        CURRENT = self
        if self.layers is not None or self.unusable or self._hook is not None:
            return
        self.names = {i: name for name, i in self.worker.layer_names.items()}
        found = getattr(forward_context, "no_compile_layers", None) or {}
        self._attn = {id(found[n]): (i, found[n]) for i, n in self.names.items() if n in found}
        if len(self._attn) != len(self.names):
            self.unusable = "the attention layers are not in vLLM's forward context"
            return

        def look(module, args):
            held = [m for m in module.modules() if id(m) in self._attn] \
                if not isinstance(module, type(next(iter(self._attn.values()))[1])) else []
            if len(held) == 1:  # the first decoder layer called (the next ones: wrapped)
                self._hook.remove()
                self._hook = None
                self._install(type(module), type(held[0]))

        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(look)

    def _install(self, layer_cls, attn_cls) -> None:
        if layer_cls.__name__ not in TESTED:
            self.unusable = (f"{layer_cls.__name__} is not an architecture the rows-only "
                             f"path is tested on ({', '.join(sorted(TESTED))})")
            return
        params = inspect.signature(layer_cls.forward).parameters
        if list(params)[1:4] != ["positions", "hidden_states", "residual"]:
            self.unusable = (f"{layer_cls.__name__}.forward does not take (positions, "
                             "hidden_states, residual)")
            return
        for i, attn in self._attn.values():
            impl = getattr(attn, "impl", None)
            if (getattr(attn, "sliding_window", None) is not None
                    or getattr(impl, "logits_soft_cap", None) not in (None, 0, 0.0)
                    or getattr(impl, "alibi_slopes", None) is not None
                    or getattr(impl, "sinks", None) is not None
                    or getattr(attn, "head_size_v", attn.head_size) != attn.head_size):
                self.unusable = f"layer {i}'s attention is not plain causal attention"
                return
        for cls, route in ((layer_cls, "_layer"), (attn_cls, "_attention")):
            if not getattr(cls.forward, "kvcodec_rows_only", False):
                cls.forward = _wrapped(cls.forward, route)
        self.layers = {i: attn for i, attn in self._attn.values()}

    def activate(self, load, forward_context) -> bool:
        """After ``load``'s check layer chose (its ``recompute.kept``): run only the rows
        of the later layers, where that is exact (see the module's doc)."""
        self.end()
        rc = load.recompute
        if self._hook is not None:  # looked through a whole forward without finding it
            self._hook.remove()
            self._hook = None
            self.unusable = "the model's decoder layers were not found"
        if self.layers is None or rc.kept is None or not len(rc.kept):
            return False
        meta = getattr(forward_context, "attn_metadata", None)
        meta = next(iter(meta.values()), None) if isinstance(meta, dict) else None
        n_step = rc.n_tokens - load.start
        if (meta is None or len(meta.query_start_loc) != 2
                or int(meta.num_actual_tokens) != n_step or not self.worker.layout.can_read):
            return False
        block = self.worker.block
        positions = torch.arange(load.start, rc.n_tokens)
        keep = torch.zeros(rc.n_tokens, dtype=torch.bool)
        keep[rc.kept] = True
        positions = positions[~keep[load.start:]]
        all_slots = slot_ids(load.block_ids, 0, rc.n_tokens, block)
        self.step = Step(rc.check_layer, max(self.layers), positions - load.start, positions,
                         all_slots[positions], all_slots)
        self.steps += 1
        return True

    def end(self) -> None:
        """The step's forward is over (or another starts)."""
        self.step = None

    def layer_index(self, module) -> int | None:
        """The index of decoder layer ``module`` (or attention layer), None if not ours."""
        got = self._attn.get(id(module))
        if got is not None:
            return got[0]
        if id(module) not in self._owner:
            held = [self._attn[id(m)][0] for m in module.modules() if id(m) in self._attn]
            self._owner[id(module)] = held[0] if len(held) == 1 else None
        return self._owner[id(module)]

    def _layer(self, i: int, forward, positions, hidden_states, residual=None, **kw):
        s = self.step
        if s is None or i <= s.check:
            return forward(positions, hidden_states, residual, **kw)
        if i == s.check + 1:  # the first of the rows' layers: keep the step's tensors
            if positions.dim() != 1 or residual is None or len(positions) <= int(s.rows[-1]):
                self.step = None  # not the layout planned for: every token, as before
                return forward(positions, hidden_states, residual, **kw)
            s.full = (hidden_states, residual)
            hidden_states, residual = hidden_states[s.rows], residual[s.rows]
        hidden_states, residual = forward(positions[s.rows], hidden_states, residual, **kw)
        if i == s.last:  # the rows back into the step's hidden states (the last token's)
            full_h, full_r = s.full
            hidden_states = full_h.index_copy(0, s.rows, hidden_states)
            residual = full_r.index_copy(0, s.rows, residual)
        return hidden_states, residual

    def _attention(self, i: int, forward, query, key, value, output_shape=None,
                   output_dtype=None):
        s = self.step
        if s is None or i <= s.check:
            return forward(query, key, value, output_shape=output_shape,
                           output_dtype=output_dtype)
        w, attn = self.worker, self.layers[i]
        w.wait_for_layer_load(self.names[i])  # this layer's preloaded documents landed
        heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.head_size
        cache = w.caches[i]
        w.layout.write(cache, key.view(-1, kv_heads, d), value.view(-1, kv_heads, d),
                       s.row_slots)
        k, v = w.layout.read(cache, s.all_slots)  # [tokens, kv_heads, head_dim]
        q = query.view(-1, heads, d).transpose(0, 1)[None]
        k, v = (x.to(q.dtype).transpose(0, 1)[None] for x in (k, v))
        # Rows (in position order) in blocks, each over the keys up to its last row's
        # position (the rest are masked for all of them), its attention weights within
        # ATTENTION_BYTES.
        rows = max(1, min(ROW_BLOCK, ATTENTION_BYTES // (heads * k.shape[2] * 4)))
        outs = []
        for r in range(0, q.shape[2], rows):
            at = s.positions[r:r + rows]
            end = int(at[-1]) + 1
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, r:r + rows], k[:, :, :end], v[:, :, :end],
                attn_mask=torch.arange(end)[None, :] <= at[:, None], scale=attn.impl.scale,
                enable_gqa=heads != kv_heads))
        out = torch.cat(outs, dim=2)
        return out[0].transpose(0, 1).reshape(-1, heads * d).to(output_dtype or query.dtype)


CURRENT: SubsetForward | None = None  # the worker whose steps the wrapped classes serve


def _wrapped(forward, route: str):
    """``forward`` of a decoder or attention layer class, routed through the current
    worker's :class:`SubsetForward` for its own instances."""

    @functools.wraps(forward)
    def run(module, *args, **kw):
        sub = CURRENT
        if sub is None or sub.step is None:  # every step but a rows-only one
            return forward(module, *args, **kw)
        i = sub.layer_index(module)
        if i is None:
            return forward(module, *args, **kw)
        return getattr(sub, route)(i, functools.partial(forward, module), *args, **kw)

    run.kvcodec_rows_only = True
    return run
