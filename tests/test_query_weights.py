"""Key steps per channel from the queries that read them (kvcodec.quality.query)."""
import numpy as np
import torch

import kvcodec
from kvcodec.core.config import load_config
from kvcodec.quality.query import SCALE_RANGE, key_channel_scale, query_energy


def test_multipliers_pair_rotary_channels_and_keep_each_heads_mean():
    g = torch.Generator().manual_seed(0)
    energy = (torch.rand(4, 8, generator=g) + 0.05) * 100  # 4 query heads, head_dim 8
    m = np.array(key_channel_scale(energy, kv_heads=2, rotary_dim=8)).reshape(2, 8)
    assert np.array_equal(m[:, :4], m[:, 4:])  # a rotary pair sees one energy
    log = np.log2(m)
    assert np.allclose(log * 4, np.round(log * 4))  # a quarter-octave grid
    assert np.all(np.abs(log.mean(axis=1)) <= 0.125 + 1e-9)  # geometric mean ~1 per head
    assert m.min() >= SCALE_RANGE[0] and m.max() <= SCALE_RANGE[1]
    # The KV head's query group (heads 0-1 for KV head 0): more energy, a finer step.
    group = energy.double().reshape(2, 2, 8).mean(dim=1)
    pair = (group[:, :4] + group[:, 4:]).numpy()
    for h in range(2):
        order = np.argsort(pair[h])
        assert np.all(np.diff(m[h, :4][order]) <= 0)
    # Keys coded after RoPE (or partial rotary dims): channels outside pairs stand alone.
    alone = np.array(key_channel_scale(energy, kv_heads=2, rotary_dim=None)).reshape(2, 8)
    assert not np.array_equal(alone[:, :4], alone[:, 4:])
    partial = np.array(key_channel_scale(energy, kv_heads=2, rotary_dim=4)).reshape(2, 8)
    assert np.array_equal(partial[:, :2], partial[:, 2:4])


def test_multipliers_are_clipped_and_a_flat_energy_gives_ones():
    flat = key_channel_scale(torch.full((2, 4), 3.0), kv_heads=1, rotary_dim=4)
    assert flat == [1.0] * 4
    wild = torch.tensor([[1e-12, 1e12, 1.0, 1.0]])
    m = key_channel_scale(wild, kv_heads=1, rotary_dim=None, alpha=0.5)
    assert max(m) == SCALE_RANGE[1] and min(m) == SCALE_RANGE[0]


def test_query_energy_is_what_the_models_queries_carry(lm, texts):
    """Layer 0's query energy per rotary pair equals that of q_proj's output (before
    RoPE: a rotation keeps each pair's norm); the model's attention kernel is back."""
    ids = kvcodec.models.text_ids(lm.tokenizer, texts["gpl3"])[:200]
    attn = lm.model.model.layers[0].self_attn
    seen = {}
    hook = attn.q_proj.register_forward_hook(lambda m, a, out: seen.setdefault("q", out))
    before = lm.model.config._attn_implementation
    try:
        energy = query_energy(lm, ids)
    finally:
        hook.remove()
    assert lm.model.config._attn_implementation == before
    assert sorted(energy) == list(range(lm.model.config.num_hidden_layers))
    d = attn.head_dim
    q = seen["q"][0].float().reshape(len(ids), -1, d)  # [T, heads, D], before RoPE
    want = q.pow(2).mean(dim=0)
    got = energy[0]
    assert got.shape == want.shape
    half = d // 2
    torch.testing.assert_close(got[:, :half] + got[:, half:], want[:, :half] + want[:, half:],
                               rtol=1e-4, atol=1e-6)


def test_per_channel_key_steps_decode_alike_on_every_cpu_path(kv_600,
                                                            decode_on_every_cpu_path):
    """A config whose key rule carries one step multiplier per channel (what
    calibrate --fast writes) decodes to the same bits on the scalar and SIMD paths, and
    a coarse channel carries more error than a fine one."""
    channels = kv_600.num_kv_heads * kv_600.head_dim
    mult = [4.0 if c % 2 else 0.25 for c in range(channels)]
    cfg = load_config("default")
    cfg["key"][0]["quantizer"]["head_scale"] = mult
    outs = decode_on_every_cpu_path(kvcodec.encode(kv_600, config=cfg))
    # Odd channels coarse, even ones fine: a rotary pair (i, i + D/2) shares a parity, so
    # re-applying RoPE keeps the two kinds apart.
    err = (outs[0].keys[3].float() - kv_600.keys[3].float())[0, :, 1:].abs().mean(dim=(0, 1))
    assert err[1::2].mean() > 4 * err[0::2].mean()
