"""Bandwidth adaptation: the plan follows the budget; the adaptive cache works on the model."""
import pytest
import torch

from kvcodec.integrations.adapt import RECOMPUTE, load_adaptive, measure_costs, parse_bandwidth, plan
from kvcodec.errors import KVCodecError
from kvcodec.store import ChunkStore


def test_plan_picks_best_level_that_fits():
    sizes = [[1000, 400, 100]] * 4
    assert plan(sizes, 8e6, budget_s=1.0, recompute_s=5.0) == [0, 0, 0, 0]  # 1 ms each
    assert plan(sizes, 8e3, budget_s=2.0, recompute_s=5.0) == [1, 1, 1, 1]  # 0.4 s each
    assert plan(sizes, 8e3, budget_s=0.5, recompute_s=0.05) == [RECOMPUTE] * 4
    # Nothing fits and recompute is slower: the smallest level.
    assert plan(sizes, 8e3, budget_s=0.1, recompute_s=5.0) == [2, 2, 2, 2]
    # Missing levels are skipped; leftover budget flows to later chunks.
    assert plan([[None, 400, 100], [1000, 400, 100]], 8e3, budget_s=1.0, recompute_s=9) == [1, 1]
    assert plan([[100, 40, 10], [1000, 400, 100]], 8e3, budget_s=0.6, recompute_s=9) == [0, 1]


def test_adaptive_load_on_the_model(tmp_path, lm, kv_600):
    hi = ChunkStore(tmp_path / "hi", lm.fingerprint, config="lossless")
    lo = ChunkStore(tmp_path / "lo", lm.fingerprint, config="default")
    hi.put(kv_600)
    lo.put(kv_600)
    ids = kv_600.token_ids[:512]
    size_hi = hi.path(hi.keys(ids)[0]).stat().st_size
    size_lo = lo.path(lo.keys(ids)[0]).stat().st_size
    bw = 8e6  # 1 MB/s: the lossless chunks take too long, the lossy ones fit
    budget = 2 * (size_lo * 8 / bw) * 1.5
    cache, choices = load_adaptive(lm, [hi, lo], ids, bw, budget, recompute_s=10.0)
    assert size_hi * 8 / bw > budget / 2 and choices == [1, 1]
    assert cache.get_seq_length() == 512
    cache2, choices2 = load_adaptive(lm, [hi, lo], ids, bw, budget, recompute_s=0.0)
    assert choices2 == [RECOMPUTE, RECOMPUTE]
    torch.testing.assert_close(cache2.layers[3].keys, kv_600.keys[3][:, :, :512], atol=1e-3, rtol=1e-3)


def test_damaged_level_entry_is_recomputed(tmp_path, lm, kv_600):
    lo = ChunkStore(tmp_path, lm.fingerprint, config="lossless")
    lo.put(kv_600)
    ids = kv_600.token_ids[:512]
    lo.path(lo.keys(ids)[1]).write_bytes(b"KVC damaged")
    cache, choices = load_adaptive(lm, [lo], ids, 1e12, budget_s=10.0, recompute_s=100.0)
    assert choices == [0, RECOMPUTE] and cache.get_seq_length() == 512
    # The recomputed chunk runs on top of the decoded (lossless) one: the full prefill.
    torch.testing.assert_close(cache.layers[7].keys, kv_600.keys[7][:, :, :512], atol=1e-3, rtol=1e-3)


def test_measured_costs_and_bandwidth_parsing(tmp_path, lm, kv_600):
    store = ChunkStore(tmp_path, lm.fingerprint, config="default")
    recompute_s, per_byte = measure_costs(lm, [store], kv_600.token_ids)
    assert recompute_s > 0 and per_byte == 0.0  # nothing cached yet
    store.put(kv_600)
    recompute_s, per_byte = measure_costs(lm, [store], kv_600.token_ids)
    assert recompute_s > 0 and per_byte > 0
    assert parse_bandwidth("1gbps") == 1e9 and parse_bandwidth("200 Mbit/s") == 2e8
    assert parse_bandwidth("5e8") == 5e8
    for bad in ("fast", "0", "-1mbps", "nan"):
        with pytest.raises(KVCodecError):
            parse_bandwidth(bad)
