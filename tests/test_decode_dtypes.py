"""Decoding straight into bfloat16 caches and into vLLM's [tokens, heads, head_dim]
order: the native decoder writes them (no float32 scratch, no cast, no transposing copy
after), with the bits a float32 decode cast by PyTorch has, on every CPU path, for files,
klt streams and store entries decoded as one stacked plan."""
import pytest
import torch

import kvcodec
from kvcodec.core.tables import native
from kvcodec.format import plan as plan_mod
from kvcodec.format.plan import in_place
from kvcodec.store import ChunkStore

KLT = "configs/calibrated/smollm2-135m-instruct-klt.json"


def _paths():
    nat = native()
    got = [p for p in ("scalar", "avx2", "avx512") if nat.set_simd_path(p)]
    nat.set_simd_path("auto")
    return got


def _buffers(layers, heads, tokens, head_dim, dtype, rows_first):
    """Per layer (keys, values) [1, heads, tokens, head_dim]: plain, or views of
    [tokens, heads, head_dim] buffers (vLLM's order)."""
    def one():
        if rows_first:
            return torch.empty(tokens, heads, head_dim, dtype=dtype).permute(1, 0, 2)[None]
        return torch.empty(1, heads, tokens, head_dim, dtype=dtype)
    return [(one(), one()) for _ in range(layers)]


@pytest.mark.parametrize("config", ["default", KLT])
def test_files_decode_into_bfloat16_and_rows_first_buffers(kv_600, config, monkeypatch):
    data = kvcodec.encode(kv_600, config=config)
    scratch = []
    orig = plan_mod.finish
    monkeypatch.setattr(plan_mod, "finish", lambda targets: (
        scratch.extend(d.scratch for t in targets for d, _ in t.fused), orig(targets))[1])
    nat = native()
    try:
        for path in _paths():
            nat.set_simd_path(path)
            f = kvcodec.open(data)
            ref = f.decode()
            shape = (f.num_layers, f.num_kv_heads, f.num_tokens, f.head_dim)
            for dtype in (torch.bfloat16, torch.float32):
                for rows_first in (False, True):
                    bufs = _buffers(*shape, dtype, rows_first)
                    f.decode_into(dict(enumerate(bufs)))
                    for (k, v), rk, rv in zip(bufs, ref.keys, ref.values):
                        assert torch.equal(k, rk.to(dtype)) and torch.equal(v, rv.to(dtype)), \
                            (path, dtype, rows_first)
    finally:
        nat.set_simd_path("auto")
    assert scratch and not any(scratch)  # every fused stream written in place


@pytest.mark.parametrize("config", ["default", KLT])
def test_store_entries_decode_into_bfloat16_rows_first_as_one_plan(tmp_path, lm, kv_600,
                                                                   config):
    """The stacked plan of a store prefix (sink rows of every entry, centered means per
    entry, a klt store's bases) lands in bfloat16 [tokens, heads, head_dim] buffers (the
    vLLM worker's) as a float32 fill cast."""
    store = ChunkStore(tmp_path / "s", lm.fingerprint, config=config)
    store.put(kv_600)
    ids = kv_600.token_ids
    locs = store.lookup(ids)
    assert len(locs) == 2
    fp = lm.fingerprint
    shape = (fp["num_layers"], fp["num_kv_heads"], 512, fp["head_dim"])
    ref = _buffers(*shape, torch.float32, False)
    got = _buffers(*shape, torch.bfloat16, True)
    assert store.fill(ref, ids, locs) == 512 and store.fill(got, ids, locs) == 512
    for (k, v), (rk, rv) in zip(got, ref):
        assert torch.equal(k, rk.to(torch.bfloat16)) and torch.equal(v, rv.to(torch.bfloat16))


def test_only_outputs_the_decoder_can_write_are_written_in_place():
    assert in_place(torch.empty(1, 2, 8, 16, dtype=torch.bfloat16)).dtype.name == "uint16"
    assert in_place(torch.empty(8, 2, 16).permute(1, 0, 2)[None]).dtype.name == "float32"
    for dst in (torch.empty(1, 2, 8, 16, dtype=torch.float16),  # cast after
                torch.empty(1, 2, 16, 8).transpose(2, 3),  # channels not contiguous
                torch.empty(1, 2, 8, 16, requires_grad=True)):
        assert in_place(dst) is None
