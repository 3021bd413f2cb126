"""The vLLM worker decoding a step straight into vLLM's paged blocks (:mod:`kvcodec.
integrations.vllm.placed`), against the same step decoded into buffers and written
with vLLM's own op: the same bits in every block, on caches vLLM's CPU backend lays out
(its real cache-writing op, float32 and bfloat16; no engine: the worker is driven as
vLLM drives it, register_kv_caches then start_load_kv)."""
import pytest
import torch

from kvcodec.store import ChunkStore


def _worker(store, lm, block, dtype, blocks, overlap=False):
    from kvcodec.integrations.vllm.worker import ConnectorWorker

    fp = lm.fingerprint
    w = ConnectorWorker(store, fp, block, threads=0, save=False)
    shape = (blocks, fp["num_kv_heads"], block, 2 * fp["head_dim"])
    w.register_kv_caches({f"model.layers.{l}.self_attn.attn": torch.zeros(shape, dtype=dtype)
                          for l in range(fp["num_layers"])})
    w.overlap = overlap  # beside the forward pass: the loader's thread, group by group
    return w


def _step(w, loads):
    from kvcodec.integrations.vllm.scheduler import KVCodecConnectorMetadata

    w.start_load_kv(KVCodecConnectorMetadata(loads=loads), None)
    failed = w.get_block_ids_with_load_errors()
    w.shutdown()
    return failed


@pytest.mark.parametrize("dtype,overlap,block", [
    (torch.float32, False, 16), (torch.bfloat16, False, 16), (torch.float32, True, 16),
    (torch.bfloat16, False, 32)])  # bfloat16 in blocks of 32: the AMX layout on such CPUs
def test_a_step_decodes_straight_into_the_paged_blocks(lm, kv_600, tmp_path, dtype, overlap,
                                                       block, monkeypatch):
    """Two requests of a step (entries of different documents; one starts after the
    blocks vLLM had computed, both end inside their last entry), loaded before the
    forward pass or beside it (doubling layer groups): placed, every loaded token's K/V
    land as the buffered path lands them, bit for bit, nothing else in the cache is
    written, and vLLM's op writes nothing. In every layout vLLM's CPU backend picks
    for the block size and dtype, AMX's paired bfloat16 included where the CPU has it."""
    from kvcodec.integrations.vllm import paged_layout, placed
    from kvcodec.integrations.vllm.scheduler import Load

    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    other = ChunkStore(tmp_path / "b", lm.fingerprint, "default")
    assert store.put(kv_600) == 3 and other.put(kv_600) == 3
    ids = kv_600.token_ids
    blocks = 96 * 16 // block
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist()
    na, nb = 608 // block, -(-560 // block)  # each request's blocks
    b0 = na + 2

    def loads():  # request b reads the same tokens under another salt: its own entries
        return [Load("a", ids, order[:na], 32, 592),
                Load("b", ids, order[b0:b0 + nb], 0, 560, salt="b")]

    store_b = store.with_salt("b")
    assert store_b.put(kv_600) == 3
    got, writes = {}, {}
    for mode in ("placed", "buffered"):
        if mode == "buffered":
            monkeypatch.setattr(placed.Placement, "of", classmethod(lambda *a: None))
        w = _worker(store, lm, block, dtype, blocks, overlap)  # layout learned (op calls)
        calls = []
        write = paged_layout.PagedLayout.write
        monkeypatch.setattr(paged_layout.PagedLayout, "write",
                            lambda self, *a: (calls.append(1), write(self, *a))[1])
        assert _step(w, loads()) == set()
        assert w.tokens_loaded == (592 - 32) + 560
        got[mode], writes[mode] = [c.clone() for c in w.caches.values()], len(calls)
        monkeypatch.undo()
    assert writes == {"placed": 0, "buffered": lm.fingerprint["num_layers"]}
    for a, b in zip(got["placed"], got["buffered"]):
        assert torch.equal(a.view(torch.int16) if dtype == torch.bfloat16 else a.view(torch.int32),
                           b.view(torch.int16) if dtype == torch.bfloat16 else b.view(torch.int32))
    # The loaded slots hold values; every other block is untouched.
    used = set(order[32 // block:-(-592 // block)]) | set(order[b0:b0 + nb])
    rest = [b for b in range(blocks) if b not in used]
    assert all(not c[rest].any() for c in got["placed"])
    assert all(c[sorted(used)].abs().sum() > 0 for c in got["placed"])


def test_a_damaged_entry_in_a_placed_step_is_reported_and_the_ones_before_land(
        lm, kv_600, tmp_path, monkeypatch):
    """A step whose second entry is damaged: its blocks and later ones are reported for
    recomputation, the first entry's blocks land as the buffered path lands them (the
    entries are decoded one by one after the stacked plan failed, placed too)."""
    from kvcodec.integrations.vllm import placed
    from kvcodec.integrations.vllm.scheduler import Load

    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    ids, block, blocks = kv_600.token_ids, 16, 64
    got = {}
    for mode in ("placed", "buffered"):
        if mode == "buffered":
            monkeypatch.setattr(placed.Placement, "of", classmethod(lambda *a: None))
        store.put(kv_600)  # again, after the damaged one was moved aside
        entry = store.lookup(ids)[1]
        data = bytearray(entry.read_bytes())
        data[-40] ^= 0x55  # a payload byte
        entry.write_bytes(bytes(data))
        w = _worker(store, lm, block, torch.float32, blocks)
        failed = _step(w, [Load("a", ids, list(range(37)), 0, 592)])
        got[mode] = (failed, [c[:16].clone() for c in w.caches.values()], w.tokens_loaded)
        monkeypatch.undo()
    assert got["placed"][0] == got["buffered"][0] == set(range(16, 37))
    assert got["placed"][2] == got["buffered"][2] == 256
    assert all(torch.equal(a, b) for a, b in zip(got["placed"][1], got["buffered"][1]))
    assert all(c.abs().sum() > 0 for c in got["placed"][1])


@pytest.mark.parametrize("end_b,dtype,block", [(592, torch.float32, 16),
                                               (590, torch.float32, 16),
                                               (590, torch.bfloat16, 32)])
def test_entries_that_requests_of_a_step_share_are_placed_once_and_copied(
        lm, kv_600, tmp_path, monkeypatch, end_b, dtype, block):
    """Two requests of a step share a document (decoded once) and a third has its own:
    the shared entries are placed in the first request's blocks and copied into the
    second's, the third's go straight into its blocks, and vLLM's op writes nothing.
    Where the second request's load ends inside a block (590: a document loaded whole),
    its last block's rows are copied one by one, the others block by block. Every
    block holds what the buffered path puts there, bit for bit, in float32 and in
    bfloat16 (blocks of 32: AMX's paired layout on such CPUs)."""
    from kvcodec.integrations.vllm import paged_layout, placed
    from kvcodec.integrations.vllm.scheduler import Load

    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    assert store.put(kv_600) == 3 and store.with_salt("c").put(kv_600) == 3
    ids, blocks = kv_600.token_ids, 128 * 16 // block
    n = -(-592 // block)  # each request's blocks
    made, got, writes = [], {}, {}
    of = placed.Placement.of
    for mode in ("placed", "buffered"):
        monkeypatch.setattr(placed.Placement, "of", classmethod(
            lambda cls, *a: made.append(of(*a)) or made[-1] if mode == "placed" else None))
        w = _worker(store, lm, block, dtype, blocks)
        calls = []
        write = paged_layout.PagedLayout.write
        monkeypatch.setattr(paged_layout.PagedLayout, "write",
                            lambda self, *a: (calls.append(1), write(self, *a))[1])
        starts = [0, 40 * 16 // block, 80 * 16 // block]
        assert _step(w, [Load("a", ids, list(range(starts[0], starts[0] + n)), 0, 592),
                         Load("b", ids, list(range(starts[1], starts[1] + n)), 0, end_b),
                         Load("c", ids, list(range(starts[2], starts[2] + n)), 0, 592,
                              salt="c")]) == set()
        assert (w.tokens_loaded, w.tokens_shared) == (2 * 592 + end_b, end_b)
        got[mode], writes[mode] = [c.clone() for c in w.caches.values()], len(calls)
        monkeypatch.undo()
    layers = lm.fingerprint["num_layers"]
    assert writes == {"placed": 0, "buffered": layers}
    assert len(made) == 1 and made[0].placed.sum() == 1200  # 600 rows per document
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert all(torch.equal(a.view(bits), b.view(bits))
               for a, b in zip(got["placed"], got["buffered"]))
    used = starts[2] + n
    assert all(c[:used].abs().sum() > 0 for c in got["placed"])
    assert all(not c[used:].any() for c in got["placed"])


def test_whole_blocks_and_their_copies():
    """A later claim's slots are copied block by block where they and the first claim's
    are whole blocks at the same offsets (in runs of consecutive blocks, any order of
    blocks); the others element by element, where the layout puts each."""
    import numpy as np

    from kvcodec.integrations.vllm.placed import copy_blocks, whole_blocks

    bs = 4
    src = np.r_[np.arange(8, 12), np.arange(20, 24)]  # blocks 2 and 5
    dst = np.r_[np.arange(36, 40), np.arange(0, 4)]  # blocks 9 and 0
    assert whole_blocks(src, dst, bs).all()
    assert not whole_blocks(src[:6], dst[:6], bs)[4:].any()  # half a block: not whole
    assert whole_blocks(src[:6], dst[:6], bs)[:4].all()
    assert not whole_blocks(src + 1, dst + 1, bs).any()  # offsets 1.. (a block and the next)
    assert whole_blocks(src, np.r_[dst[:4], np.arange(40, 44)[::-1]], bs).tolist() == \
        [True] * 4 + [False] * 4  # the second block's slots in another order
    assert not whole_blocks(np.r_[src[:2], 30, 31, src[4:]], dst, bs)[:4].any()

    class Layout:  # one head of 2 channels, 4 slots a block: [keys | values] per block
        block, heads, head_dim = bs, 1, 2
        spans = {"key": (0, 1, None), "value": (0, np.array([0, 1]), None)}

        def starts(self, slots, kind):
            return (slots // bs) * 16 + (slots % bs) * 2 + (8 if kind == "value" else 0)

    cache = torch.arange(12 * 16, dtype=torch.float32).view(12, 16)
    want = cache.clone()
    want[9], want[0], want[10], want[1] = want[2], want[5], want[3], want[6]
    want[11, 2:4], want[11, 10:12] = want[7, 4:6], want[7, 12:14]  # slot 30 -> slot 45

    class Metrics:
        def staged(self, stage, seconds):
            self.stage = stage

    m = Metrics()
    # blocks 3 -> 10 and 6 -> 1 come with 2 -> 9 and 5 -> 0: runs 2,3 -> 9,10 and 5,6 -> 0,1
    copy_blocks({0: cache}, [(src, dst), (np.r_[src + 4, 30], np.r_[dst + 4, 45])], Layout(), m)
    assert torch.equal(cache, want) and m.stage == "write"


def test_entries_a_step_shares_count_once_toward_its_decode_buffers(lm, kv_600, tmp_path,
                                                                      monkeypatch):
    """Before the forward pass the step's layers are split into as few groups as the
    decode buffers' budget holds; an entry two requests share is decoded once, into one
    buffer row, so it counts once: a budget that holds one document's rows for every
    layer decodes two requests of that document in one group (it was two)."""
    from kvcodec.integrations.vllm.scheduler import Load
    from kvcodec.integrations.vllm.worker import ConnectorWorker

    store = ChunkStore(tmp_path, lm.fingerprint, "default")
    assert store.put(kv_600) == 3
    layers = lm.fingerprint["num_layers"]
    w = _worker(store, lm, 16, torch.float32, 96)
    monkeypatch.setattr(w._pool, "max_bytes", w._pool.layer_bytes(600) * layers)
    groups = []
    load_group = ConnectorWorker._load_group
    monkeypatch.setattr(ConnectorWorker, "_load_group",
                        lambda self, g, jobs: (groups.append(g), load_group(self, g, jobs)))
    ids = kv_600.token_ids
    assert _step(w, [Load("a", ids, list(range(0, 37)), 0, 592),
                     Load("b", ids, list(range(40, 77)), 0, 592)]) == set()
    assert groups == [list(range(layers))]
    assert (w.tokens_loaded, w.tokens_shared) == (2 * 592, 592)
    assert all(torch.equal(c[:37], c[40:77]) and c[:37].abs().sum() > 0
               for c in w.caches.values())
