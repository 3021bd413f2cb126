"""Reading K/V back out of vLLM's CPU paged cache for a save (:meth:`PagedLayout.
read_from`): by strided copies per block where the layout is strided (vLLM's CPU
layouts), else by one gather whose positions serve every layer; both the same values as
the op wrote, on caches vLLM's real cache-writing op fills (float32 and bfloat16)."""
import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_save_reads_back_what_vllms_op_wrote(dtype):
    from kvcodec.integrations.vllm.paged_layout import PagedLayout, slot_ids

    layers, blocks, heads, block, d = 3, 12, 2, 16, 64
    caches = [torch.zeros(blocks, heads, block, 2 * d, dtype=dtype) for _ in range(layers)]
    layout = PagedLayout(caches[0], block, True)
    assert layout.can_read and layout._strided() is not None  # vLLM's layouts: strided
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(blocks, generator=g)[:5].tolist()  # a request's blocks
    n, t0 = 75, 21  # a save from inside a block to inside its last one
    count = n - t0
    k = [torch.randn(n, heads, d, generator=g).to(dtype) for _ in range(layers)]
    v = [torch.randn(n, heads, d, generator=g).to(dtype) for _ in range(layers)]
    slots = slot_ids(table, 0, n, block)
    for cache, kl, vl in zip(caches, k, v):
        layout.write(cache, kl, vl, slots)
    for path in ("strided", "gather"):
        if path == "gather":
            layout.spans = None  # a layout of no strided form: the gather
            assert layout._strided() is None
        buf = torch.full((layout.save_numel(layers, count) + 7,), float("nan"), dtype=dtype)
        for into in (None, buf):  # its own memory, or a save's buffer reused
            keys, values = layout.read_from(caches, slots[t0:], into)
            assert len(keys) == len(values) == layers
            for l in range(layers):
                assert keys[l].shape == values[l].shape == (1, heads, count, d)
                assert keys[l].dtype == dtype
                assert into is None or keys[l].data_ptr() >= buf.data_ptr()
                assert torch.equal(keys[l][0], k[l][t0:].transpose(0, 1)), (path, l)
                assert torch.equal(values[l][0], v[l][t0:].transpose(0, 1)), (path, l)


def test_slots_out_of_order_within_a_block_are_gathered():
    """Slots that are not consecutive within a block (no save asks for them today) are
    read one by one, not as a run."""
    from kvcodec.integrations.vllm.paged_layout import PagedLayout

    heads, block, d = 2, 16, 64
    cache = torch.randn(4, heads, block, 2 * d)
    layout = PagedLayout(cache, block, True)
    slots = torch.tensor([17, 16, 40, 3], dtype=torch.int64)
    keys, values = layout.read_from([cache], slots)
    k, v = layout.read(cache, slots)
    assert torch.equal(keys[0][0], k.transpose(0, 1))
    assert torch.equal(values[0][0], v.transpose(0, 1))


def test_save_buffers_are_reused_within_their_bound():
    """A save's buffer, given back once it is encoded, serves a later save of a size
    it holds (rounded up to the chunk); past the bound, buffers are dropped."""
    from kvcodec.integrations.vllm.paged_layout import PagedLayout, SaveBuffers

    heads, block, d, layers = 2, 16, 64, 3
    layout = PagedLayout(torch.zeros(4, heads, block, 2 * d), block, True)
    per_chunk = layout.save_numel(layers, 32) * 4  # bytes of a 32-token save, float32
    pool = SaveBuffers(2 * per_chunk, 32)
    a = pool.take(layout, layers, 5)
    assert a.numel() == layout.save_numel(layers, 32)  # rounded up to the chunk
    b = pool.take(layout, layers, 40)
    assert b.numel() == layout.save_numel(layers, 64) and b.data_ptr() != a.data_ptr()
    pool.give(a)
    assert pool.take(layout, layers, 31).data_ptr() == a.data_ptr()  # reused
    assert pool.take(layout, layers, 31).data_ptr() != a.data_ptr()  # taken: a new one
    pool.give(a)
    pool.give(b)  # 3 chunks' worth: past the bound, b is dropped
    assert pool.take(layout, layers, 40).data_ptr() != b.data_ptr()
